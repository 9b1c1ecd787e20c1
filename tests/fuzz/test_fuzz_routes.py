"""Fuzz route matching against a reference written here from the documented semantics (Envoy's
RouteMatch subset: prefix / exact path with case sensitivity, header and query conditions,
`grpc`, first matching route wins).  The alphabets are tiny on purpose, so random paths and
headers often do match and both branches of every condition are exercised."""
from __future__ import annotations

import re

from hypothesis import given, strategies as st

from sidecar.config.model import HeaderMatch, PathMatch, Route, RouteTable, StringMatch, VirtualHost, WeightedCluster
from tests.fuzz.fuzzsettings import fuzz_settings

PIECES = ["/", "a", "A", "b", "/a", "/A", "?", "&", "=", "+", " ", "x=1", "%20", ""]
texts = st.lists(st.sampled_from(PIECES), max_size=6).map("".join)
names = st.sampled_from(["x-a", "x-b", "content-type"])
qnames = st.sampled_from(["a", "b", "x"])


# ---- the reference ----------------------------------------------------------------------------------
def ref_string(kind: str, value: str, ignore_case: bool, text: str) -> bool:
    if kind == "regex":
        return re.fullmatch(value, text) is not None
    if ignore_case:
        value, text = value.casefold(), text.casefold()
    return {"exact": text == value, "prefix": text[:len(value)] == value,
            "suffix": len(value) <= len(text) and text[len(text) - len(value):] == value,
            "contains": text.find(value) >= 0}[kind]


def ref_condition(spec: dict, value: str | None) -> bool:
    """spec: {kind, value, ignore_case, present, invert}; kind 'present' checks presence only."""
    if spec["kind"] == "present":
        result = (value is not None) is spec["present"]
    else:
        result = value is not None and ref_string(spec["kind"], spec["value"], spec["ignore_case"], value)
    return result is not spec["invert"]


def ref_query(query: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in query.split("&"):
        if pair == "":
            continue
        if "=" in pair:
            k, v = pair.split("=", 1)
        else:
            k, v = pair, ""
        if k not in out:
            out[k] = " ".join(v.split("+"))
    return out


def ref_route(spec: dict, path: str, headers: dict[str, str]) -> bool:
    if "?" in path:
        bare, query = path.split("?", 1)
    else:
        bare, query = path, ""
    want, kind = spec["path"], spec["path_kind"]
    if not spec["case_sensitive"]:
        want, bare_cmp = want.lower(), bare.lower()
    else:
        bare_cmp = bare
    if kind == "prefix" and not bare_cmp.startswith(want):
        return False
    if kind == "path" and bare_cmp != want:
        return False
    if spec["grpc"] and not headers.get("content-type", "").startswith("application/grpc"):
        return False
    if not all(ref_condition(h, headers.get(h["name"])) for h in spec["headers"]):
        return False
    params = ref_query(query)
    return all(ref_condition(q, params.get(q["name"])) for q in spec["query"])


# ---- strategies: a spec, and the model objects built from it ------------------------------------------
def condition(name_strategy):
    return st.fixed_dictionaries({
        "name": name_strategy,
        "kind": st.sampled_from(["exact", "prefix", "suffix", "contains", "present"]),
        "value": texts, "ignore_case": st.booleans(), "present": st.booleans(), "invert": st.booleans()})


route_specs = st.fixed_dictionaries({
    "path_kind": st.sampled_from(["prefix", "path"]), "path": texts.map(lambda t: "/" + t.lstrip("/")),
    "case_sensitive": st.booleans(), "grpc": st.booleans(),
    "headers": st.lists(condition(names), max_size=2), "query": st.lists(condition(qnames), max_size=2)})


def build_match(spec: dict) -> HeaderMatch:
    if spec["kind"] == "present":
        return HeaderMatch(spec["name"], None, spec["present"], spec["invert"])
    return HeaderMatch(spec["name"], StringMatch(spec["kind"], spec["value"], spec["ignore_case"]), True,
                       spec["invert"])


def build_route(spec: dict, name: str = "r") -> Route:
    return Route(name, PathMatch(spec["path_kind"], spec["path"], spec["case_sensitive"]),
                 tuple(build_match(h) for h in spec["headers"]), tuple(build_match(q) for q in spec["query"]),
                 spec["grpc"], (WeightedCluster("c", 1),))


requests = st.tuples(
    texts.map(lambda t: "/" + t),
    st.dictionaries(names, texts | st.sampled_from(["application/grpc", "application/grpc+proto", "text/plain"]),
                    max_size=3))


@fuzz_settings(quick=1500)
@given(route_specs, requests)
def test_route_matches_like_the_reference(spec, request):
    path, headers = request
    assert build_route(spec).matches(path, headers) == ref_route(spec, path, headers)


@fuzz_settings(quick=500)
@given(st.lists(route_specs, min_size=1, max_size=4), requests)
def test_first_matching_route_wins(specs, request):
    path, headers = request
    table = RouteTable("t", (VirtualHost("vh", ("*",), tuple(build_route(s, f"r{i}") for i, s in enumerate(specs))),))
    chosen = table.select("example.com", path, headers)
    expected = next((f"r{i}" for i, s in enumerate(specs) if ref_route(s, path, headers)), None)
    assert (chosen.name if chosen else None) == expected


@fuzz_settings(quick=500)
@given(st.sampled_from(["exact", "prefix", "suffix", "contains"]), texts, texts, st.booleans())
def test_string_matchers_like_the_reference(kind, value, text, ignore_case):
    assert StringMatch(kind, value, ignore_case).matches(text) == ref_string(kind, value, ignore_case, text)


DOMAINS = ["*", "a.com", "*.a.com", "*.com", "api.*", "b.a.com", "A.COM"]


def ref_vhost(domain_sets: list[list[str]], authority: str) -> int | None:
    """Envoy's order: exact host, then the longest suffix wildcard, then the longest prefix
    wildcard, then '*'.  The port is ignored when nothing matches with it."""
    host = authority.lower()
    for candidate in (host, host.rsplit(":", 1)[0] if ":" in host else None):
        if candidate is None:
            continue
        for i, ds in enumerate(domain_sets):
            if candidate in [d.lower() for d in ds]:
                return i
    bare = host.rsplit(":", 1)[0] if ":" in host else host
    best, best_len = None, -1
    for i, ds in enumerate(domain_sets):
        for d in ds:
            if d != "*" and d.startswith("*") and bare.endswith(d[1:]) and len(d) > best_len:
                best, best_len = i, len(d)
    if best is None:
        for i, ds in enumerate(domain_sets):
            for d in ds:
                if d != "*" and d.endswith("*") and bare.startswith(d[:-1]) and len(d) > best_len:
                    best, best_len = i, len(d)
    if best is not None:
        return best
    return next((i for i, ds in enumerate(domain_sets) if "*" in ds), None)


@fuzz_settings(quick=500)
@given(st.lists(st.lists(st.sampled_from(DOMAINS), min_size=1, max_size=3, unique=True), min_size=1, max_size=3),
       st.sampled_from(["a.com", "A.com", "x.a.com", "b.a.com", "api.x", "api.a.com", "z.org", "a.com:80", "b.a.com:8"]))
def test_virtual_host_selection(domain_sets, authority):
    table = RouteTable("t", tuple(VirtualHost(f"v{i}", tuple(ds), ()) for i, ds in enumerate(domain_sets)))
    vh = table.virtual_host(authority)
    expected = ref_vhost(domain_sets, authority)
    assert (int(vh.name[1:]) if vh else None) == expected


def test_suffix_wildcard_beats_prefix_wildcard_like_envoy():
    table = RouteTable("t", (VirtualHost("prefix", ("api.*",), ()), VirtualHost("suffix", ("*.com",), ())))
    assert table.virtual_host("api.a.com").name == "suffix"
