"""`protomesh describe`: each rpc's effective policy and where every value came from."""
from pathlib import Path

from protomesh.describe import main

REPO = Path(__file__).resolve().parents[2]


def test_describe_names_proto_lines_overrides_and_defaults(tmp_path, capsys):
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(f"proto_paths: [{REPO / 'proto'}]\n"
                    "services:\n"
                    "  users: { protocol: grpc, proto: demo/users/v1/users.proto, timeout: 5s,\n"
                    "           methods: { ListUsers: { timeout: 30s }, '*': { rate_limit: { requests: 7, per: 1s } } } }\n")
    assert main(str(mesh), "users", False) == 0
    out = capsys.readouterr().out
    blocks = {b.split()[0]: b for b in out.strip().split("\n\n")}
    get = blocks["/demo.users.v1.Users/GetUser"]
    assert "2s" in get and "proto demo/users/v1/users.proto:13 (meshapi.v1.method)" in get
    assert "mesh.yaml services.users.methods.*.rate_limit.requests" in get
    listing = blocks["/demo.users.v1.Users/ListUsers"]
    assert "30s" in listing and "mesh.yaml services.users.methods.ListUsers.timeout" in listing
    chat = blocks["/demo.users.v1.Users/Chat"]
    assert "timeout                none" in chat and "streams get no route timeout" in chat
    assert main(str(mesh), "users/Nope", False) == 2
    assert "no rpc 'Nope'" in capsys.readouterr().err


def test_unknown_method_override_is_a_mesh_error(tmp_path, capsys):
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(f"proto_paths: [{REPO / 'proto'}]\n"
                    "services:\n"
                    "  users: { protocol: grpc, proto: demo/users/v1/users.proto, methods: { GetUsr: { timeout: 1s } } }\n")
    assert main(str(mesh), "users", False) == 2
    err = capsys.readouterr().err
    assert "services.users.methods.GetUsr" in err and "GetUser" in err
