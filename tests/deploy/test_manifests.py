"""Static checks of deploy/: Kubernetes manifests, the compose file, the Dockerfile, mesh.yaml.

Docker is not runnable on the machine these tests were written on (no container engine), so
nothing here builds or starts a container.  Instead the files are checked for the mistakes that
would make `docker compose up` or `kubectl apply` fail: schema errors (kubernetes_validate,
offline, strict), paths that do not exist, ports out of range, dangling references between
services, and process commands that do not match the `protomesh` CLI.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.37.0"  # newest schema set shipped by kubernetes-validate 1.37
IMAGE = "protomesh:dev"
JAEGER_IMAGE = re.compile(r"^jaegertracing/all-in-one(:[\w.-]+)?$")

# The CLI surface the manifests may use (see protomesh/cli.py and demo/services/).
ALLOWED = {
    "control": {"--mesh", "--xds", "--admin"},
    "sidecar": {"--service", "--app", "--control", "--inbound", "--outbound-http", "--outbound-grpc",
                "--admin", "--otlp", "--gateway", "--advertise", "--state-dir", "--drain-delay",
                "--drain-timeout", "--access-log"},
    "run": {"--ready-timeout", "--stop-timeout"},
    "service": {"--listen", "--replica", "--otlp"},
    "service orders": {"--listen", "--replica", "--otlp", "--users", "--products"},
}
REQUIRED = {
    "control": {"--mesh"},
    "sidecar": {"--service", "--app", "--control"},
    "gateway": {"--gateway", "--control", "--admin"},
    "service": {"--listen", "--replica"},
    "run": {"--service", "--app", "--control", "--admin"},
}


def _flags(args: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            if "=" in arg:
                key, value = arg.split("=", 1)
                out[key] = value
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                out[arg] = args[i + 1]
                i += 1
            else:
                out[arg] = None
        i += 1
    return out


def _hostport(value: str, where: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    assert sep and host and port.isdigit(), f"{where}: expected HOST:PORT, got {value!r}"
    assert 1 <= int(port) <= 65535, f"{where}: port out of range in {value!r}"
    return host, int(port)


def check_command(args: list[str], where: str) -> dict[str, str | None]:
    """Check one `protomesh ...` argv (entrypoint excluded) against the CLI; returns its flags."""
    assert args, f"{where}: empty command"
    sub = args[0]
    flags = _flags(args[1:])
    if sub == "service":
        assert len(args) > 1 and args[1] in {"users", "orders", "products"}, f"{where}: unknown service {args[1:2]}"
        allowed = ALLOWED["service orders" if args[1] == "orders" else "service"]
        required = REQUIRED["service"] | ({"--users", "--products"} if args[1] == "orders" else set())
        flags = _flags(args[2:])
    elif sub == "sidecar":
        allowed = ALLOWED["sidecar"]
        required = REQUIRED["gateway" if "--gateway" in flags else "sidecar"]
    elif sub == "control":
        allowed, required = ALLOWED["control"], REQUIRED["control"]
    elif sub == "run":
        # protomesh run [run flags] <sidecar flags> -- <app command…>
        assert "--" in args and args.index("--") < len(args) - 1, f"{where}: run needs -- <app command>"
        ours = args[1:args.index("--")]
        flags = _flags(ours)
        allowed, required = ALLOWED["run"] | ALLOWED["sidecar"], REQUIRED["run"]
        admin_port = _hostport(flags.get("--admin") or "", f"{where} --admin")[1]
        assert admin_port != 0, f"{where}: protomesh run polls /ready on --admin: it needs a fixed port"
        from protomesh.run import parse
        opts = parse(ours + ["--", *args[args.index("--") + 1:]])  # the run command's own parser
        assert opts.app_argv == args[args.index("--") + 1:]
    else:
        pytest.fail(f"{where}: unknown protomesh subcommand {sub!r}")
    assert set(flags) <= allowed, f"{where}: flags not in the CLI: {sorted(set(flags) - allowed)}"
    assert required <= set(flags), f"{where}: missing flags {sorted(required - set(flags))}"
    for key in ("--app", "--listen", "--xds", "--admin", "--inbound", "--outbound-http", "--outbound-grpc",
                "--users", "--products", "--advertise"):
        if flags.get(key):
            _hostport(flags[key], f"{where} {key}")
    for target in (flags.get("--control") or "").split(","):
        if target:
            _hostport(target, f"{where} --control")
    if sub == "service" and args[1] == "orders":
        # orders reaches users/products through its own sidecar's outbound listeners.
        assert flags["--users"] == "127.0.0.1:15002", f"{where}: --users must be the sidecar's outbound gRPC"
        assert flags["--products"] == "127.0.0.1:15001", f"{where}: --products must be the sidecar's outbound HTTP"
    if sub in ("sidecar", "control"):
        try:
            from protomesh.cli import build_parser
        except ImportError:
            pass  # the static table above is the check
        else:
            _, rest = build_parser().parse_known_args(args)
            assert not rest, f"{where}: protomesh CLI rejects {rest}"
    return flags


# --- Kubernetes ------------------------------------------------------------------------------

K8S_FILES = sorted((DEPLOY / "k8s").glob("*.yaml"))
K8S_DOCS = [(f, i, d) for f in K8S_FILES for i, d in enumerate(yaml.safe_load_all(f.read_text())) if d]


def test_k8s_manifests_exist():
    kinds = {(d["kind"], d["metadata"]["name"]) for _, _, d in K8S_DOCS}
    assert {("Deployment", "protomesh-control"), ("Service", "protomesh-control"),
            ("ConfigMap", "protomesh-mesh"), ("Deployment", "users"), ("Service", "users")} <= kinds


@pytest.mark.parametrize("path,index,doc", K8S_DOCS,
                         ids=[f"{f.name}#{i}-{d.get('kind')}" for f, i, d in K8S_DOCS])
def test_k8s_manifest_is_valid_strict(path, index, doc):
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError, all_versions

    assert K8S_VERSION in all_versions(), f"kubernetes-validate has no schemas for {K8S_VERSION}"
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        pytest.fail(f"{path.name} document {index} ({doc.get('kind')}): {where}: {exc.message}")


def _pod_specs(kinds=("Deployment", "Job")):
    for path, _, doc in K8S_DOCS:
        if doc["kind"] in kinds:
            yield path, doc


def _containers(pod: dict) -> list[dict]:
    """Main containers and init containers (native sidecars are init containers)."""
    return list(pod.get("initContainers", [])) + list(pod["containers"])


def test_k8s_references_resolve():
    configmaps = {d["metadata"]["name"]: d for _, _, d in K8S_DOCS if d["kind"] == "ConfigMap"}
    pod_labels = []
    for path, dep in _pod_specs():
        spec, name = dep["spec"], dep["metadata"]["name"]
        labels = spec["template"]["metadata"]["labels"]
        if "selector" in spec:  # a Job's selector is generated
            assert spec["selector"]["matchLabels"].items() <= labels.items(), f"{name}: selector does not match pod labels"
        pod = spec["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        port_names = set()
        for c in _containers(pod):
            where = f"{path.name} {name}/{c['name']}"
            assert c["image"] == IMAGE, f"{where}: image {c['image']!r}"
            assert "command" not in c, f"{where}: keep the image ENTRYPOINT (protomesh); use args"
            check_command(c["args"], where)
            names = {p["name"] for p in c.get("ports", [])}
            port_names |= names | {p["containerPort"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if probe in c:
                    assert c[probe]["httpGet"]["port"] in names, f"{where}: {probe} uses an unknown port"
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{where}: mounts undefined volume {m['name']}"
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, f"{name}: unknown ConfigMap {v['configMap']['name']}"
        pod_labels.append((labels, port_names))
    for _, _, svc in K8S_DOCS:
        if svc["kind"] != "Service":
            continue
        matches = [ports for labels, ports in pod_labels if svc["spec"]["selector"].items() <= labels.items()]
        assert matches, f"Service {svc['metadata']['name']} selects no pods"
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in matches[0], \
                f"Service {svc['metadata']['name']}: targetPort {p['targetPort']} is no container's port"


def test_users_pod_has_app_and_native_sidecar_with_admin_probes():
    """The app starts only once the sidecar is ready: the sidecar is a native sidecar (an init
    container with restartPolicy Always) whose startupProbe is /ready on its admin port."""
    dep = next(d for _, d in _pod_specs() if d["metadata"]["name"] == "users")
    pod = dep["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["users"]
    inits = {c["name"]: c for c in pod.get("initContainers", [])}
    assert set(inits) == {"sidecar"}
    app, sidecar = pod["containers"][0], inits["sidecar"]
    assert sidecar.get("restartPolicy") == "Always", "the sidecar must be a native sidecar container"
    assert app["args"][:2] == ["service", "users"]
    flags = _flags(sidecar["args"][1:])
    assert sidecar["args"][0] == "sidecar" and flags["--service"] == "users"
    assert flags["--app"] == _flags(app["args"][2:])["--listen"], "sidecar --app must be the app's --listen"
    admin_port = _hostport(flags.get("--admin") or "0.0.0.0:15000", "sidecar --admin")[1]
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    for probe, path in (("startupProbe", "/ready"), ("readinessProbe", "/ready"), ("livenessProbe", "/healthz")):
        get = sidecar[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports[get["port"]] == admin_port, f"{probe} must hit the sidecar admin port"
    startup = sidecar["startupProbe"]
    assert startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 30, \
        "give the sidecar time to reach the control server before the kubelet restarts it"
    drain = float(flags.get("--drain-delay") or 0) + float(flags.get("--drain-timeout") or 10)
    assert drain < pod.get("terminationGracePeriodSeconds", 30), "the drain must fit the grace period"


def test_job_runs_its_app_under_protomesh_run():
    """A Job completes with its app: `protomesh run` starts the app after /ready and exits with
    the app's code after draining the sidecar, so no container is left running."""
    jobs = [d for _, d in _pod_specs(("Job",))]
    assert jobs, "deploy/k8s has no Job example"
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        assert pod["restartPolicy"] in ("Never", "OnFailure")
        assert not any(c.get("restartPolicy") == "Always" for c in pod.get("initContainers", [])), \
            "use protomesh run (one container) here, not a native sidecar"
        (c,) = pod["containers"]
        assert c["args"][0] == "run"
        app = c["args"][c["args"].index("--") + 1:]
        assert app, "the app command follows --"
        run_flags = _flags(c["args"][1:c["args"].index("--")])
        grace = float(run_flags.get("--stop-timeout") or 30) + float(run_flags.get("--drain-timeout") or 10)
        assert grace <= pod.get("terminationGracePeriodSeconds", 30) + 10


def test_configmap_carries_the_same_mesh_yaml():
    cm = next(d for _, _, d in K8S_DOCS if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "protomesh-mesh")
    assert yaml.safe_load(cm["data"]["mesh.yaml"]) == yaml.safe_load((DEPLOY / "mesh.yaml").read_text()), \
        "deploy/k8s/control-plane.yaml ConfigMap differs from deploy/mesh.yaml"
    control = next(d for _, d in _pod_specs() if d["metadata"]["name"] == "protomesh-control")
    c = control["spec"]["template"]["spec"]["containers"][0]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "mesh")
    assert _flags(c["args"][1:])["--mesh"] == f"{mount['mountPath']}/mesh.yaml"
    # proto_paths are relative to mesh.yaml; the image keeps protos at /app/proto.
    assert mount["mountPath"] == "/app/deploy"


# --- docker compose ----------------------------------------------------------------------------

COMPOSE_PATH = DEPLOY / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    doc = yaml.safe_load(COMPOSE_PATH.read_text())  # resolves the x-* anchors / merge keys
    assert isinstance(doc.get("services"), dict) and doc["services"]
    return doc["services"]


def test_compose_builds_and_images(compose):
    for name, svc in compose.items():
        if "build" in svc:
            ctx = (COMPOSE_PATH.parent / svc["build"]["context"]).resolve()
            assert ctx == ROOT, f"{name}: build context must be the repo root, got {ctx}"
            assert (ctx / svc["build"]["dockerfile"]).is_file(), f"{name}: missing dockerfile"
            assert svc.get("image") == IMAGE, f"{name}: built image must be named {IMAGE}"
        else:
            assert JAEGER_IMAGE.match(svc.get("image", "")), f"{name}: unexpected image {svc.get('image')!r}"
    assert any(JAEGER_IMAGE.match(s.get("image", "")) for s in compose.values()), "no Jaeger service"


def test_compose_ports_and_mounts(compose):
    for name, svc in compose.items():
        for spec in svc.get("ports", []):
            parts = str(spec).split("/")[0].split(":")
            assert 1 <= len(parts) <= 3, f"{name}: bad port mapping {spec!r}"
            for part in parts[-2:]:
                assert part.isdigit() and 1 <= int(part) <= 65535, f"{name}: bad port {part!r} in {spec!r}"
        for vol in svc.get("volumes", []):
            source = str(vol).split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE_PATH.parent / source).exists(), f"{name}: mounted path {source} does not exist"
    gateway = compose["gateway"]
    published = {str(p).split(":")[-1] for p in gateway["ports"]}
    assert {"8080", "8443"} <= published
    jaeger = next(s for s in compose.values() if JAEGER_IMAGE.match(s.get("image", "")))
    assert {"16686", "4317"} <= {str(p).split(":")[-1] for p in jaeger["ports"]}
    assert str(jaeger.get("environment", {}).get("COLLECTOR_OTLP_ENABLED")).lower() == "true"


def test_compose_sidecars_share_their_apps_network_and_use_the_cli(compose):
    sidecars = 0
    for name, svc in compose.items():
        for dep in svc.get("depends_on", {}):
            assert dep in compose, f"{name}: depends_on unknown service {dep}"
        if "command" not in svc:
            continue
        cmd = svc["command"] if isinstance(svc["command"], list) else shlex.split(svc["command"])
        flags = check_command(cmd, f"compose {name}")
        mode = svc.get("network_mode")
        if mode:
            assert mode.startswith("service:"), f"{name}: network_mode {mode!r}"
            app_name = mode.split(":", 1)[1]
            assert app_name in compose, f"{name}: network_mode names unknown service {app_name}"
            assert not svc.get("ports"), f"{name}: publish ports on {app_name}, not on a network_mode service"
        if cmd[0] == "sidecar" and "--gateway" not in flags:
            sidecars += 1
            assert mode, f"{name}: a sidecar must share its app's network namespace"
            app_cmd = compose[app_name]["command"]
            assert app_cmd[:2] == ["service", flags["--service"]], f"{name}: paired with {app_name}, a different service"
            assert flags["--app"] == _flags(app_cmd[2:])["--listen"], f"{name}: --app differs from {app_name}'s --listen"
            assert flags["--control"].split(":")[0] in compose, f"{name}: --control host is not a compose service"
    assert sidecars >= 4  # users-1, users-2, orders, products: none silently dropped
    users = [s for s in compose.values() if s.get("command", [])[:2] == ["service", "users"]]
    assert len(users) >= 2 or any(s.get("deploy", {}).get("replicas", 1) >= 2 for s in users)


# --- Dockerfile ------------------------------------------------------------------------------

def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_copies_existing_paths_and_every_package():
    instructions = _dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert ("ENTRYPOINT", '["protomesh"]') in instructions
    users = [rest for op, rest in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the image must run as a non-root user"
    copied = set()
    for op, rest in instructions:
        if op != "COPY" or "--from" in rest:
            continue
        *sources, _dest = [p for p in shlex.split(rest) if not p.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist in the repo"
            copied.add(src.rstrip("/"))
    assert {"proto", "deploy/mesh.yaml", "pyproject.toml"} <= copied
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    wanted = {p for p in packages if any(re.fullmatch(pat.replace("*", ".*"), p) for pat in patterns)}
    assert wanted <= copied, f"packages missing from the image: {sorted(wanted - copied)}"


# --- mesh.yaml -------------------------------------------------------------------------------

def test_mesh_yaml_protos_exist_and_routes_resolve():
    mesh_path = DEPLOY / "mesh.yaml"
    mesh = yaml.safe_load(mesh_path.read_text())
    include = [(mesh_path.parent / p).resolve() for p in mesh["proto_paths"]]
    assert include == [ROOT / "proto"], "the image only carries the repo's proto/ (as /app/proto)"
    declared = {}
    for name, svc in mesh["services"].items():
        assert svc["protocol"] in {"grpc", "http"}, f"services.{name}.protocol"
        if "proto" not in svc:
            continue
        found = [d / svc["proto"] for d in include if (d / svc["proto"]).is_file()]
        assert found, f"services.{name}.proto: {svc['proto']} not found under {[str(d) for d in include]}"
        text = found[0].read_text()
        package = re.search(r"^package\s+([\w.]+)\s*;", text, re.M).group(1)
        for svc_name in re.findall(r"^service\s+(\w+)", text, re.M):
            declared[f"{package}.{svc_name}"] = name
    for i, route in enumerate(mesh["gateway"]["routes"]):
        assert route["to"] in mesh["services"], f"gateway.routes[{i}].to: unknown service {route['to']}"
        grpc_service = route["match"].get("grpc_service")
        if grpc_service:
            assert declared.get(grpc_service) == route["to"], f"gateway.routes[{i}]: {grpc_service} is not in {route['to']}'s proto"
    for key in ("http", "grpc"):
        _hostport(mesh["gateway"][key], f"gateway.{key}")
    assert 0.0 <= mesh["telemetry"]["sampling"] <= 1.0


def test_mesh_yaml_loads_with_the_control_server():
    model = pytest.importorskip("control.model", reason="control server not importable")
    mesh = model.load_mesh(DEPLOY / "mesh.yaml")
    assert set(mesh.services) == {"users", "orders", "products"}
