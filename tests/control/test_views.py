"""Views are snapshots: registrations reach them at the push (`refresh`), and a refresh rebuilds
only the assignments of services that changed."""
from envoy.config.endpoint.v3 import endpoint_pb2

from control.model import parse_mesh
from control.registry import Registration, Registry
from control.views import Views
from protomesh.xdstypes import CLUSTER, ENDPOINT

DOC = {"services": {"users": {"protocol": "http"}, "orders": {"protocol": "http", "endpoints": ["127.0.0.1:1"]}}}


def mesh(doc=DOC):
    return parse_mesh(doc, "mesh.yaml", __import__("pathlib").Path("."))


def sidecar(node, service, port):
    return Registration(node_id=node, role="sidecar", flavour="protomesh", service=service,
                        advertise=("127.0.0.1", port), outbound_http=("127.0.0.1", 15001))


def ports(view, service):
    cla = endpoint_pb2.ClusterLoadAssignment()
    view[ENDPOINT][service].Unpack(cla)
    return sorted(lb.endpoint.address.socket_address.port_value for g in cla.endpoints for lb in g.lb_endpoints)


def test_a_registration_reaches_every_view_at_refresh_and_only_its_service_is_rebuilt():
    registry = Registry()
    views = Views(mesh(), registry)
    a = sidecar("a", "users", 7000)
    registry.connect(a)
    before = views.for_node(a)
    assert ports(before, "users") == [7000]
    b = sidecar("b", "users", 7001)
    registry.connect(b)
    views.invalidate(registrations_only=True)
    assert views.for_node(a) is before  # the snapshot until the push
    views.refresh()
    after = views.for_node(a)
    assert ports(after, "users") == [7000, 7001] and ports(views.for_node(b), "users") == [7000, 7001]
    assert after[ENDPOINT]["orders"] is before[ENDPOINT]["orders"]  # untouched: same object
    assert after[CLUSTER] is before[CLUSTER]  # per-node parts are kept


def test_a_static_endpoint_edit_rebuilds_the_services_named():
    registry = Registry()
    views = Views(mesh(), registry)
    a = sidecar("a", "users", 7000)
    registry.connect(a)
    before = views.for_node(a)
    doc = {"services": {**DOC["services"], "orders": {"protocol": "http", "endpoints": ["127.0.0.1:2"]}}}
    views.mesh = mesh(doc)
    views.invalidate(endpoints_only=True, services={"orders"})
    views.refresh()
    after = views.for_node(a)
    assert ports(after, "orders") == [2]
    assert after[ENDPOINT]["users"] is before[ENDPOINT]["users"]


def test_a_mesh_change_rebuilds_at_once():
    registry = Registry()
    views = Views(mesh(), registry)
    a = sidecar("a", "users", 7000)
    registry.connect(a)
    before = views.for_node(a)
    stamp = views.stamp()
    doc = {"services": {**DOC["services"], "billing": {"protocol": "http"}}}
    views.invalidate(mesh(doc))
    assert views.stamp() != stamp
    after = views.for_node(a)
    assert "billing" in after[CLUSTER] and "billing" not in before[CLUSTER]
