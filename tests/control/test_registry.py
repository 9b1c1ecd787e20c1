"""Registrations: endpoints live with their streams, plus a grace period; workers count once."""
from control.registry import Registration, Registry


def reg(node, service="users", addr=("127.0.0.1", 7000)):
    return Registration(node_id=node, role="sidecar", flavour="protomesh", service=service, advertise=addr)


def test_endpoint_outlives_its_stream_by_the_grace_period():
    r = Registry(grace_s=5)
    assert r.connect(reg("a"))
    r.disconnect("a", now=100)
    assert [x.node_id for x in r.endpoints("users")] == ["a"]
    assert not r.expire(now=104.9)
    assert r.expire(now=105)
    assert r.endpoints("users") == []


def test_reconnect_within_grace_keeps_the_endpoint():
    r = Registry(grace_s=5)
    r.connect(reg("a"))
    r.disconnect("a", now=100)
    assert not r.connect(reg("a"))  # same registration: nothing changed for peers
    assert not r.expire(now=200)
    assert len(r.endpoints("users")) == 1


def test_two_streams_of_one_node_need_both_gone():
    r = Registry(grace_s=0)
    r.connect(reg("a"))
    r.connect(reg("a"))
    r.disconnect("a", now=1)
    assert not r.expire(now=2)
    r.disconnect("a", now=3)
    assert r.expire(now=3)


def test_workers_sharing_an_address_are_one_endpoint():
    r = Registry()
    r.connect(reg("gw~w0", addr=("127.0.0.1", 8000)))
    r.connect(reg("gw~w1", addr=("127.0.0.1", 8000)))
    r.connect(reg("other", addr=("127.0.0.1", 8001)))
    assert [x.node_id for x in r.endpoints("users")] == ["gw~w0", "other"]
    assert r.endpoints("orders") == []


def test_changed_services_are_reported_once():
    r = Registry(grace_s=0)
    r.connect(reg("a", service="users"))
    r.connect(reg("b", service="orders", addr=("127.0.0.1", 7001)))
    assert r.take_dirty() == {"users", "orders"}
    assert r.take_dirty() == set()
    r.connect(reg("a", service="users"))  # same registration: nothing changed
    assert r.take_dirty() == set()
    r.connect(reg("a", service="orders", addr=("127.0.0.1", 7002)))  # moved: both change
    assert r.take_dirty() == {"users", "orders"}
    assert [x.node_id for x in r.endpoints("orders")] == ["a", "b"] and r.endpoints("users") == []
    r.disconnect("b", now=1)
    r.expire(now=1)
    assert r.take_dirty() == {"orders"}
    assert [x.node_id for x in r.endpoints("orders")] == ["a"]
