"""Which mesh edits are endpoint-only (cheap EDS push) and which rebuild every view."""
from control.app import only_endpoints_differ
from control.model import parse_mesh

BASE = {"services": {"products": {"protocol": "http", "endpoints": ["127.0.0.1:1"]},
                     "billing": {"protocol": "http"}},
        "gateway": {"http": "127.0.0.1:8080", "routes": [{"match": {"path_prefix": "/"}, "to": "products"}]}}


def mesh(**edits):
    import copy
    doc = copy.deepcopy(BASE)
    for path, value in edits.items():
        node = doc
        *parents, last = path.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return parse_mesh(doc, "mesh.yaml", __import__("pathlib").Path("."))


def test_endpoint_edit_is_endpoint_only():
    assert only_endpoints_differ(mesh(), mesh(services__products__endpoints=["127.0.0.1:2", "127.0.0.1:3"]))
    assert only_endpoints_differ(mesh(), mesh())


def test_other_edits_rebuild():
    assert not only_endpoints_differ(mesh(), mesh(services__products__lb="least_request"))
    assert not only_endpoints_differ(mesh(), mesh(gateway__http="127.0.0.1:9090"))
    assert not only_endpoints_differ(mesh(), mesh(services__billing={"protocol": "http", "timeout": "2s"}))
