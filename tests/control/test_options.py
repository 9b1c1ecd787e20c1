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
