"""Compile every ``proto/**/*.proto`` into the Python packages the project imports.

There is exactly one way generated code comes into being: ``python -m protomesh.codegen``.
``--check`` regenerates into a scratch directory and compares, so CI (and
``tests/test_codegen.py``) can prove the committed files match the ``.proto`` sources.
A protoc failure is reported with protoc's own message (it names file:line:column) and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROTO_ROOT = REPO_ROOT / "proto"
RERUN_HINT = "run: python -m protomesh.codegen"
_GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py")


class CodegenError(Exception):
    """protoc refused the sources; the message is protoc's own diagnostic."""


def _grpc_tools_include() -> Path:
    spec = importlib.util.find_spec("grpc_tools")
    if spec is None or not spec.submodule_search_locations:
        raise CodegenError("grpc_tools is not installed (pip install grpcio-tools)")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "_proto"
        if (candidate / "google" / "protobuf" / "descriptor.proto").is_file():
            return candidate
    raise CodegenError("grpc_tools is installed but its bundled _proto include dir is missing")


def _googleapis_include() -> Path:
    """The site-packages dir that holds google/api/annotations.proto.

    ``google`` is a namespace package spread over several distributions, so every location
    of ``google.api`` is tried rather than trusting the first.
    """
    spec = importlib.util.find_spec("google.api")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / "annotations.proto").is_file():
            return Path(location).parents[1]
    raise CodegenError(
        "google/api/annotations.proto not found; install googleapis-common-protos"
    )


def find_protos(proto_root: Path) -> list[Path]:
    """All .proto files under proto_root, relative to it, in a stable order."""
    return sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))


def _run_protoc(proto_root: Path, protos: list[Path], dest: Path) -> None:
    # A subprocess, not grpc_tools.protoc.main(): protoc writes its diagnostics straight to
    # file descriptor 2, and only a child process lets us capture them for the error.
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={proto_root}",
        f"--proto_path={_googleapis_include()}",
        f"--proto_path={_grpc_tools_include()}",
        f"--python_out={dest}",
        f"--grpc_python_out={dest}",
        *[p.as_posix() for p in protos],
    ]
    result = subprocess.run(cmd, cwd=proto_root, capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"
        raise CodegenError(f"protoc failed (sources under {proto_root}):\n{message}")


def _package_inits(files: list[Path]) -> list[Path]:
    """Every package dir between the output root and a generated module needs __init__.py."""
    inits: set[Path] = set()
    for rel in files:
        for parent in rel.parents:
            if parent != Path("."):
                inits.add(parent / "__init__.py")
    return sorted(inits)


def _compile(proto_root: Path, scratch: Path) -> tuple[dict[Path, bytes], list[Path]]:
    """Run protoc into scratch; return {relative path: content} and the __init__ paths needed."""
    protos = find_protos(proto_root)
    if not protos:
        raise CodegenError(f"no .proto files under {proto_root}")
    _run_protoc(proto_root, protos, scratch)
    generated = {
        p.relative_to(scratch): p.read_bytes()
        for p in sorted(scratch.rglob("*.py"))
        if p.name.endswith(_GENERATED_SUFFIXES)
    }
    # Our own option/extension protos ship inside the meshapi package too, so a user's .proto
    # can `import "meshapi/v1/options.proto"` wherever protomesh is installed.
    pyfiles = list(generated)
    for rel in protos:
        if rel.parts[0] == "meshapi":
            generated[rel] = (proto_root / rel).read_bytes()
    return generated, _package_inits(pyfiles)


def generate(out_dir: Path = REPO_ROOT, proto_root: Path = DEFAULT_PROTO_ROOT) -> list[Path]:
    """Compile proto_root into out_dir; return every generated module and package __init__.

    Files whose content is unchanged are not rewritten, so mtimes stay meaningful. Existing
    __init__.py files are left alone (some packages, like demo/, carry their own).
    """
    out_dir, proto_root = Path(out_dir).resolve(), Path(proto_root).resolve()
    with tempfile.TemporaryDirectory(prefix="protomesh-codegen-") as tmp:
        generated, inits = _compile(proto_root, Path(tmp))
    written: list[Path] = []
    for rel, content in generated.items():
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_file() or target.read_bytes() != content:
            target.write_bytes(content)
        written.append(target)
    for rel in inits:
        target = out_dir / rel
        if not target.exists():
            target.write_bytes(b"")
        written.append(target)
    return sorted(written)


def check(out_dir: Path = REPO_ROOT, proto_root: Path = DEFAULT_PROTO_ROOT) -> list[str]:
    """Problems that make out_dir disagree with proto_root; empty when in sync."""
    out_dir, proto_root = Path(out_dir).resolve(), Path(proto_root).resolve()
    with tempfile.TemporaryDirectory(prefix="protomesh-codegen-") as tmp:
        generated, inits = _compile(proto_root, Path(tmp))
    problems: list[str] = []
    for rel, content in generated.items():
        target = out_dir / rel
        if not target.is_file():
            problems.append(f"missing: {rel.as_posix()}")
        elif target.read_bytes() != content:
            problems.append(f"stale:   {rel.as_posix()}")
    for rel in inits:
        if not (out_dir / rel).is_file():
            problems.append(f"missing: {rel.as_posix()}")
    # Generated modules whose .proto is gone. Only the top-level packages protoc writes are
    # scanned: the output root is the repo root, which also holds .venv and friends.
    top_dirs = sorted({rel.parts[0] for rel in generated})
    for top in top_dirs:
        for path in sorted((out_dir / top).rglob("*.py")):
            rel = path.relative_to(out_dir)
            if path.name.endswith(_GENERATED_SUFFIXES) and rel not in generated:
                problems.append(f"orphan:  {rel.as_posix()} (no .proto produces it)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m protomesh.codegen",
        description="Generate Python protobuf/gRPC modules from proto/**/*.proto.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if the generated files are missing or stale",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT, help="output root (default: the repo root)"
    )
    parser.add_argument(
        "--proto-root",
        type=Path,
        default=DEFAULT_PROTO_ROOT,
        help="where the .proto sources live (default: <repo>/proto)",
    )
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = check(args.out, args.proto_root)
            if problems:
                print("generated code is out of date with the .proto sources:", file=sys.stderr)
                for problem in problems:
                    print(f"  {problem}", file=sys.stderr)
                print(RERUN_HINT, file=sys.stderr)
                return 1
            print("generated code is up to date")
            return 0
        written = generate(args.out, args.proto_root)
    except CodegenError as exc:
        print(exc, file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    for path in written:
        print(path.relative_to(out).as_posix() if path.is_relative_to(out) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
