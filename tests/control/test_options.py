"""Per-rpc policy from proto options, layered with defaults and mesh.yaml, with sources."""
from pathlib import Path

import pytest

from control.errors import MeshError
from control.model import parse_duration
from control.sources.options import Value, flatten_override, rpc_policies
from control.sources.protos import compile_descriptor_set

PROTOS = Path(__file__).parent / "protos"


@pytest.fixture(scope="module")
def fds():
    return compile_descriptor_set(["policy.proto"], [str(PROTOS)], "mesh.yaml")


def test_layers_and_sources(fds):
    pol = rpc_policies(fds, ["policytest.v1.Shop"])
    get = pol["/policytest.v1.Shop/Get"]
    assert get.get("timeout") == 0.25 and "policy.proto:13" in get.values["timeout"].source
    assert get.get("idempotent") is True
    assert get.get("rate_limit.requests") == 10 and get.get("rate_limit.per") == 1.0
    assert get.get("retry.attempts") == 2  # from the service defaults
    assert "meshapi.v1.defaults" in get.values["retry.attempts"].source
    assert "policy.proto:7" in get.values["retry.attempts"].source
    watch = pol["/policytest.v1.Shop/Watch"]
    assert watch.server_streaming and watch.get("timeout") == 5.0
    assert watch.get("idempotent") is False and watch.values["idempotent"].source == "default"
    buy = pol["/policytest.v1.Shop/Buy"]
    assert buy.get("auth.scopes") == ("shop.write",) and buy.get("auth.required") is True


def test_mesh_yaml_overrides_win_and_say_so(fds):
    src = "mesh.yaml services.shop.methods"
    overrides = {
        "*": {k: Value(v, src + ".*") for k, v in flatten_override({"retry": {"attempts": 4}}, "m", "x", parse_duration).items()},
        "Get": {k: Value(v, src + ".Get") for k, v in flatten_override({"timeout": "2s"}, "m", "x", parse_duration).items()},
    }
    get = rpc_policies(fds, ["policytest.v1.Shop"], overrides=overrides)["/policytest.v1.Shop/Get"]
    assert get.get("timeout") == 2.0 and get.values["timeout"].source == src + ".Get"
    assert get.get("retry.attempts") == 4 and get.values["retry.attempts"].source == src + ".*"
    assert get.get("rate_limit.burst") == 5  # untouched fields keep their proto value


def test_bad_override_names_field_and_fix():
    with pytest.raises(MeshError) as info:
        flatten_override({"retry": {"tries": 3}}, "mesh.yaml", "services.shop.methods.Get", parse_duration)
    assert info.value.field == "services.shop.methods.Get.retry.tries"
    assert "retry.attempts" in info.value.fix


def test_retries_only_what_is_safe(fds):
    from control.model import Retries
    from control.sources.options import SAFE_RETRY_ON, rpc_retries
    pol = rpc_policies(fds, ["policytest.v1.Shop"])
    service = Retries(on=("5xx", "unavailable"), attempts=3)
    # Get: the proto's service defaults declare retry {attempts: 2 on: UNAVAILABLE}: exactly that.
    get = rpc_retries(pol["/policytest.v1.Shop/Get"], service)
    assert get.attempts == 1 and get.on == SAFE_RETRY_ON + ("unavailable",)
    # An rpc with no retry of its own: idempotent ones get the service's, others only safe ones.
    plain = rpc_policies(fds, ["policytest.v1.Shop"], overrides={"*": {"retry.attempts": Value(1, "mesh.yaml x")}})
    watch = plain["/policytest.v1.Shop/Watch"]
    assert rpc_retries(watch, service).on == SAFE_RETRY_ON and rpc_retries(watch, service).attempts == 3
    idem = rpc_policies(fds, ["policytest.v1.Shop"], overrides={
        "Watch": {"idempotent": Value(True, "mesh.yaml services.shop.methods.Watch")},
        "*": {"retry.attempts": Value(1, "mesh.yaml x")}})["/policytest.v1.Shop/Watch"]
    assert rpc_retries(idem, service) == service
    assert rpc_retries(watch, None) is None


def test_declared_auth_fails_closed_and_bad_retry_codes_are_refused(fds):
    from control.model import GrpcService, Service
    from control.sources.options import check_policies
    svc = Service("shop", "grpc", grpc_services=(GrpcService("policytest.v1.Shop", (), "policy.proto", fds),))
    with pytest.raises(MeshError) as info:
        check_policies(svc, "mesh.yaml")
    assert "Buy auth" in info.value.field and "cannot enforce" in info.value.reason
    bad = Service("shop", "grpc", grpc_services=svc.grpc_services, method_overrides=(
        ("Buy", (("auth.required", Value(False, "mesh.yaml")), ("auth.scopes", Value((), "mesh.yaml")))),
        ("Get", (("retry.on", Value(("NOT_FOUND",), "mesh.yaml services.shop.methods.Get")),))))
    with pytest.raises(MeshError, match="NOT_FOUND"):
        check_policies(bad, "mesh.yaml")
