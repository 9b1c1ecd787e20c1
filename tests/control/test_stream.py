"""The ADS send decisions: order, one outstanding push per type, ACK/NACK, stale nonces."""
from google.protobuf import any_pb2, wrappers_pb2

from control.stream import StreamState
from protomesh.xdstypes import CLUSTER, ENDPOINT, LISTENER, ROUTE


def res(value: str) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(wrappers_pb2.StringValue(value=value))
    return a


def view(clusters=("a",), listeners=("l",), routes=("r",), tag="1"):
    return {
        CLUSTER: {c: res(c + tag) for c in clusters},
        ENDPOINT: {c: res("eps" + c + tag) for c in clusters},
        LISTENER: {n: res(n + tag) for n in listeners},
        ROUTE: {n: res(n + tag) for n in routes},
    }


def subscribe_all(s: StreamState):
    s.on_request(CLUSTER, [], "", "", None)
    s.on_request(LISTENER, [], "", "", None)


def send_and_ack(s: StreamState, v):
    """Send what the state wants, ACK it (same subscription), return the types sent."""
    sent = []
    for type_url, version, resources in s.next_sends(v):
        nonce = s.mark_sent(type_url, version)
        sent.append((type_url, sorted(resources)))
        names = s.types[type_url].names
        s.on_request(type_url, sorted(names) if names is not None else [], nonce, version, None)
    return sent


def test_types_go_out_in_order_and_wait_for_acks():
    s, v = StreamState(), view()
    subscribe_all(s)
    first = s.next_sends(v)
    assert [t for t, _, _ in first] == [CLUSTER]  # LDS waits for CDS's ACK
    nonce = s.mark_sent(CLUSTER, first[0][1])
    assert s.next_sends(v) == []  # one outstanding push per type; later types wait too
    s.on_request(CLUSTER, [], nonce, first[0][1], None)
    # CDS ACKed but EDS not yet subscribed to cluster "a": LDS still waits? EDS isn't subscribed
    # at all, so the ordering check skips it and LDS may go.
    assert [t for t, _, _ in s.next_sends(v)] == [LISTENER]


def test_listener_waits_until_eds_covers_every_cluster():
    s, v = StreamState(), view(clusters=("a", "b"))
    subscribe_all(s)
    s.on_request(ENDPOINT, ["a"], "", "", None)  # the client subscribed to "a" only so far
    assert send_and_ack(s, v) == [(CLUSTER, ["a", "b"])]
    assert send_and_ack(s, v) == [(ENDPOINT, ["a"])]
    assert s.next_sends(v) == []  # "b" is not subscribed yet: listeners must wait
    s.on_request(ENDPOINT, ["a", "b"], s.types[ENDPOINT].sent_nonce, s.types[ENDPOINT].acked_version, None)
    assert [t for t, _, _ in s.next_sends(v)] == [ENDPOINT]


def test_nacked_version_is_not_resent_and_blocks_later_types():
    s, v1 = StreamState(), view()
    subscribe_all(s)
    s.on_request(ENDPOINT, ["a"], "", "", None)
    s.on_request(ROUTE, ["r"], "", "", None)
    for _ in range(4):
        send_and_ack(s, v1)
    assert all(t.acked_version for t in s.types.values())
    v2 = view(tag="2")
    (type_url, version, _), = s.next_sends(v2)
    nonce = s.mark_sent(type_url, version)
    assert s.on_request(type_url, [], nonce, s.types[CLUSTER].acked_version, "bad cluster") == "nack"
    assert s.types[CLUSTER].error == "bad cluster"
    assert s.next_sends(v2) == []  # not resent, and nothing after it goes out
    v3 = view(tag="3")  # new content: worth a new try
    assert [t for t, _, _ in s.next_sends(v3)] == [CLUSTER]


def test_stale_nonce_is_ignored():
    s, v = StreamState(), view()
    subscribe_all(s)
    (t, version, _), = s.next_sends(v)
    s.mark_sent(t, version)
    assert s.on_request(CLUSTER, [], "not-the-nonce", "x", None) == "stale"
    assert s.types[CLUSTER].pending


def test_unchanged_content_is_not_pushed_again():
    s, v = StreamState(), view()
    subscribe_all(s)
    s.on_request(ENDPOINT, ["a"], "", "", None)
    s.on_request(ROUTE, ["r"], "", "", None)
    for _ in range(4):
        send_and_ack(s, v)
    assert s.next_sends(view()) == []


# ---- EDS/RDS responses carry only what the client lacks ------------------------------------------
def synced(clusters=("a", "b", "c")):
    s, v = StreamState(), view(clusters=clusters)
    subscribe_all(s)
    s.on_request(ENDPOINT, sorted(clusters), "", "", None)
    s.on_request(ROUTE, ["r"], "", "", None)
    for _ in range(4):
        send_and_ack(s, v)
    return s, v


def with_endpoints(v, **changed):
    out = {t: dict(r) for t, r in v.items()}
    for name, value in changed.items():
        out[ENDPOINT][name] = res(value)
    return out


def test_an_endpoint_change_sends_only_the_changed_assignment_at_the_full_version():
    from control.snapshot import version_of
    s, v = synced()
    v2 = with_endpoints(v, b="eps-b-new")
    (type_url, version, resources), = s.next_sends(v2)
    assert (type_url, sorted(resources)) == (ENDPOINT, ["b"])
    assert version == version_of(v2[ENDPOINT])  # the version names the whole set the client will hold


def test_after_a_nack_the_next_change_carries_everything_changed_since_the_last_ack():
    s, v = synced()
    v2 = with_endpoints(v, b="eps-b-bad")
    (_, version, _), = s.next_sends(v2)
    nonce = s.mark_sent(ENDPOINT, version)
    assert s.on_request(ENDPOINT, ["a", "b", "c"], nonce, s.types[ENDPOINT].acked_version, "bad") == "nack"
    v3 = with_endpoints(v2, c="eps-c-new")
    (_, _, resources), = s.next_sends(v3)
    assert sorted(resources) == ["b", "c"]


def test_a_partial_ack_counts_as_holding_the_whole_set():
    s, v = synced()
    v2 = with_endpoints(v, b="eps-b-new")
    assert send_and_ack(s, v2) == [(ENDPOINT, ["b"])]
    assert s.next_sends(v2) == []
    v3 = with_endpoints(v2, a="eps-a-new")
    assert send_and_ack(s, v3) == [(ENDPOINT, ["a"])]


def test_a_rerequest_and_a_new_stream_get_the_full_set():
    s, v = synced()
    eds = s.types[ENDPOINT]
    assert s.on_request(ENDPOINT, ["a", "b", "c"], eds.sent_nonce, eds.acked_version, None) == "rerequest"
    (_, _, resources), = s.next_sends(v)
    assert sorted(resources) == ["a", "b", "c"]
    fresh = StreamState()
    subscribe_all(fresh)
    fresh.on_request(ENDPOINT, ["a", "b", "c"], "", "", None)
    send_and_ack(fresh, v)  # CDS
    assert send_and_ack(fresh, with_endpoints(v, b="x")) == [(ENDPOINT, ["a", "b", "c"])]


def test_a_new_subscription_name_is_sent_with_what_changed():
    s, v = synced(clusters=("a", "b"))
    v2 = view(clusters=("a", "b", "c"))
    assert send_and_ack(s, v2) == [(CLUSTER, ["a", "b", "c"])]  # CDS is always complete
    s.on_request(ENDPOINT, ["a", "b", "c"], "", s.types[ENDPOINT].acked_version, None)
    (_, _, resources), = s.next_sends(v2)
    assert sorted(resources) == ["c"]


def test_a_caller_supplied_nonce_is_the_one_acked():
    s, v = StreamState(), view()
    subscribe_all(s)
    (t, version, _), = s.next_sends(v)
    assert s.mark_sent(t, version, "shared-7") == "shared-7"
    assert s.on_request(CLUSTER, [], "shared-7", version, None) == "ack"
