"""protomesh.codegen: the committed generated code matches proto/, and protoc errors are reported
with file and line, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from protomesh import codegen

REPO_ROOT = Path(__file__).resolve().parents[1]

GOOD_PROTO = """\
syntax = "proto3";
package meshapi.v1;
import "google/api/annotations.proto";
message Ping { string text = 1; }
service Echo {
  rpc Say(Ping) returns (Ping) { option (google.api.http) = { post: "/v1/say" body: "*" }; }
}
"""


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_committed_generated_code_is_in_sync():
    assert codegen.check() == [], "generated code is stale; run: python -m protomesh.codegen"


def test_check_command_exits_zero_on_the_repo():
    result = subprocess.run(
        [sys.executable, "-m", "protomesh.codegen", "--check"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout


def test_generate_writes_modules_and_package_inits(tmp_path):
    protos, out = tmp_path / "proto", tmp_path / "out"
    write(protos, "meshapi/v1/echo.proto", GOOD_PROTO)
    written = codegen.generate(out, proto_root=protos)
    rel = sorted(p.relative_to(out).as_posix() for p in written)
    assert rel == [
        "meshapi/__init__.py",
        "meshapi/v1/__init__.py",
        "meshapi/v1/echo.proto",  # meshapi's own .proto sources ship inside the package
        "meshapi/v1/echo_pb2.py",
        "meshapi/v1/echo_pb2_grpc.py",
    ]
    assert (out / "meshapi/v1/__init__.py").read_text() == ""
    assert (out / "meshapi/v1/echo.proto").read_text() == GOOD_PROTO
    assert codegen.check(out, proto_root=protos) == []


def test_check_reports_stale_missing_and_orphaned_files(tmp_path, capsys):
    protos, out = tmp_path / "proto", tmp_path / "out"
    write(protos, "meshapi/v1/echo.proto", GOOD_PROTO)
    codegen.generate(out, proto_root=protos)
    (out / "meshapi/v1/echo_pb2.py").write_text("# edited by hand\n")
    (out / "meshapi/v1/echo_pb2_grpc.py").unlink()
    write(out, "meshapi/v1/gone_pb2.py", "# its .proto was deleted\n")

    problems = codegen.check(out, proto_root=protos)
    assert problems == [
        "stale:   meshapi/v1/echo_pb2.py",
        "missing: meshapi/v1/echo_pb2_grpc.py",
        "orphan:  meshapi/v1/gone_pb2.py (no .proto produces it)",
    ]
    rc = codegen.main(["--check", "--out", str(out), "--proto-root", str(protos)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "meshapi/v1/echo_pb2.py" in err
    assert "run: python -m protomesh.codegen" in err


@pytest.mark.parametrize(
    ("body", "line"),
    [
        # A syntax error: the missing ';' is noticed on the next line.
        ('syntax = "proto3";\npackage demo.bad.v1;\n\nmessage Bad {\n  string id = 1\n}\n', 6),
        # A semantic error: an unknown type.
        ('syntax = "proto3";\npackage demo.bad.v1;\nmessage Bad {\n  Nope id = 1;\n}\n', 4),
    ],
)
def test_broken_proto_is_reported_with_file_and_line(tmp_path, capsys, body, line):
    protos, out = tmp_path / "proto", tmp_path / "out"
    write(protos, "meshapi/v1/echo.proto", GOOD_PROTO)
    write(protos, "demo/bad/v1/bad.proto", body)

    with pytest.raises(codegen.CodegenError) as info:
        codegen.generate(out, proto_root=protos)
    assert f"demo/bad/v1/bad.proto:{line}:" in str(info.value)
    assert not (out / "meshapi").exists(), "a failed run must not leave partial output"

    rc = codegen.main(["--out", str(out), "--proto-root", str(protos)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"demo/bad/v1/bad.proto:{line}:" in err
    assert "Traceback" not in err


def test_broken_proto_via_the_command_line_exits_2_without_traceback(tmp_path):
    protos = tmp_path / "proto"
    write(protos, "demo/bad/v1/bad.proto", 'syntax = "proto3";\nmessage {\n')
    result = subprocess.run(
        [sys.executable, "-m", "protomesh.codegen", "--proto-root", str(protos), "--out", str(tmp_path / "out")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "demo/bad/v1/bad.proto:2:" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_protos_is_an_error_not_a_crash(tmp_path, capsys):
    (tmp_path / "proto").mkdir()
    rc = codegen.main(["--proto-root", str(tmp_path / "proto"), "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "no .proto files" in capsys.readouterr().err
