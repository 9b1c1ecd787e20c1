"""Delta ADS send decisions: per-resource diffs, removals, subscriptions, initial versions, NACKs,
the same CDS → EDS → LDS → RDS ordering as SotW, and endpoints pushed after a cluster change."""
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, wrappers_pb2
from google.rpc import status_pb2

from control.delta import DeltaState, resource_version
from protomesh.xdstypes import CLUSTER, ENDPOINT, LISTENER, ROUTE


def res(value: str) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(wrappers_pb2.StringValue(value=value))
    return a


def view(clusters=("a", "b"), tag="1", eps_tag="1", routes=("r",)):
    return {CLUSTER: {c: res(c + tag) for c in clusters},
            ENDPOINT: {c: res("eps" + c + eps_tag) for c in clusters},
            LISTENER: {"l": res("l" + tag)}, ROUTE: {r: res(r + tag) for r in routes}}


def req(type_url, sub=(), unsub=(), nonce="", error=None, initial=None):
    r = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=list(sub),
                                            resource_names_unsubscribe=list(unsub), response_nonce=nonce,
                                            initial_resource_versions=initial or {})
    if error:
        r.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return r


def ack(s: DeltaState, resp, error=None):
    return s.on_request(req(resp.type_url, nonce=resp.nonce, error=error))


def names(resp):
    return sorted(r.name for r in resp.resources)


def converge(s, v):
    """Send and ACK until nothing is left to send; returns [(type, names, removed)]."""
    out = []
    for _ in range(20):
        sends = s.next_responses(v)
        if not sends:
            return out
        for resp in sends:
            out.append((resp.type_url, names(resp), list(resp.removed_resources)))
            ack(s, resp)
    raise AssertionError("did not converge")


def subscribe(s, clusters=("a", "b")):
    s.on_request(req(CLUSTER))
    s.on_request(req(LISTENER, sub=["*"]))
    s.on_request(req(ENDPOINT, sub=clusters))
    s.on_request(req(ROUTE, sub=["r"]))


def test_first_exchange_is_ordered_and_complete():
    s, v = DeltaState(), view()
    subscribe(s)
    assert converge(s, v) == [(CLUSTER, ["a", "b"], []), (ENDPOINT, ["a", "b"], []),
                              (LISTENER, ["l"], []), (ROUTE, ["r"], [])]
    assert s.next_responses(v) == []


def test_one_outstanding_response_per_type_and_later_types_wait():
    s, v = DeltaState(), view()
    subscribe(s)
    cds, eds = s.next_responses(v)  # endpoints of freshly sent clusters go along at once
    assert (cds.type_url, eds.type_url) == (CLUSTER, ENDPOINT)
    assert s.next_responses(v) == []  # both unacknowledged: nothing else goes out
    ack(s, eds)
    assert s.next_responses(v) == []  # listeners wait for the clusters' ACK
    ack(s, cds)
    assert [r.type_url for r in s.next_responses(v)] == [LISTENER]


def test_only_changed_resources_and_removals_travel():
    s = DeltaState()
    subscribe(s)
    converge(s, view())
    v2 = view(eps_tag="2")  # endpoints of both clusters changed
    assert converge(s, v2) == [(ENDPOINT, ["a", "b"], [])]
    v3 = view(clusters=("a",), eps_tag="2")  # cluster b is gone
    sent = converge(s, v3)
    assert sent[0] == (CLUSTER, [], ["b"])
    assert (ENDPOINT, [], ["b"]) in sent


def test_cluster_change_pushes_its_assignment_without_waiting_for_the_cds_ack():
    s = DeltaState()
    subscribe(s)
    converge(s, view())
    v2 = view(tag="2")  # clusters change, endpoints do not
    sends = s.next_responses(v2)
    assert [(r.type_url, names(r)) for r in sends] == [(CLUSTER, ["a", "b"]), (ENDPOINT, ["a", "b"])]
    # Envoy ACKs the clusters only after their endpoints came: nothing else is owed meanwhile.
    ack(s, sends[1])
    ack(s, sends[0])
    assert [r.type_url for r in s.next_responses(v2)] == [LISTENER]


def test_nack_keeps_what_the_client_held_and_is_not_resent():
    s = DeltaState()
    subscribe(s)
    converge(s, view())
    v2 = view(tag="2")
    cds, eds = s.next_responses(v2)
    ack(s, eds)
    assert ack(s, cds, error="bad cluster") == "nack"
    t = s.types[CLUSTER]
    assert t.known["a"] == resource_version(view()[CLUSTER]["a"])
    assert s.next_responses(v2) == []  # not resent; listeners do not go out past a NACK
    status = {(tu, n): st for tu, n, _, st, _, _ in s.resource_status(v2)}
    assert status[(CLUSTER, "a")] == "NACKED" and status[(ENDPOINT, "a")] == "ACKED"
    assert status[(ROUTE, "r")] == "REQUESTED"  # changed, held back behind the NACK
    v3 = view(tag="3")
    assert [r.type_url for r in s.next_responses(v3)][0] == CLUSTER  # new content: a new try


def test_initial_versions_mean_only_differences_are_sent():
    s, v = DeltaState(), view()
    held = {n: resource_version(r) for n, r in v[CLUSTER].items()}
    s.on_request(req(CLUSTER, initial={**held, "gone": "x"}))
    (resp,) = s.next_responses(v)
    assert names(resp) == [] and list(resp.removed_resources) == ["gone"]


def test_subscribe_and_unsubscribe_named_resources():
    s, v = DeltaState(), view(routes=("r", "q"))
    s.on_request(req(ROUTE, sub=["r"]))
    assert converge(s, v) == [(ROUTE, ["r"], [])]
    s.on_request(req(ROUTE, sub=["q"], unsub=["r"]))
    assert converge(s, v) == [(ROUTE, ["q"], [])]  # r is dropped by the client itself
    assert set(s.types[ROUTE].known) == {"q"}


def test_stale_nonce_still_changes_subscriptions():
    s, v = DeltaState(), view(routes=("r", "q"))
    s.on_request(req(ROUTE, sub=["r"]))
    (resp,) = s.next_responses(v)
    assert s.on_request(req(ROUTE, sub=["q"], nonce="999")) == "stale"
    ack(s, resp)
    assert converge(s, v) == [(ROUTE, ["q"], [])]


# ---- state of the world: Envoy's repeated EDS request after a Cluster change -----------------
def test_sotw_eds_rerequest_is_answered_while_cds_awaits_its_ack():
    from control.stream import StreamState
    s, v1 = StreamState(), view()
    s.on_request(CLUSTER, [], "", "", None)
    s.on_request(ENDPOINT, ["a", "b"], "", "", None)
    for _ in range(2):
        for type_url, version, _ in s.next_sends(v1):
            nonce = s.mark_sent(type_url, version)
            s.on_request(type_url, ["a", "b"] if type_url == ENDPOINT else [], nonce, version, None)
    eds_nonce, eds_version = s.types[ENDPOINT].sent_nonce, s.types[ENDPOINT].acked_version
    v2 = view(tag="2")  # clusters change, endpoints do not
    ((type_url, version, _),) = s.next_sends(v2)
    s.mark_sent(type_url, version)
    # Envoy repeats its EDS request (same nonce and version) and holds the CDS ACK back.
    assert s.on_request(ENDPOINT, ["a", "b"], eds_nonce, eds_version, None) == "rerequest"
    ((type_url, version, _),) = s.next_sends(v2)
    assert (type_url, version) == (ENDPOINT, eds_version)
