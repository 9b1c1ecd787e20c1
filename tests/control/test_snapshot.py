"""Selections and their versions are memoised per (dict, names); what changed is computed by content."""
from google.protobuf import any_pb2, wrappers_pb2

from control.snapshot import changed_since, select, selection, version_of


def res(value):
    a = any_pb2.Any()
    a.Pack(wrappers_pb2.StringValue(value=value))
    return a


def test_selection_is_select_plus_version_and_is_shared():
    d = {"a": res("a"), "b": res("b")}
    names = frozenset({"a"})
    chosen, version = selection(d, names)
    assert chosen == select(d, names) and version == version_of(select(d, names))
    assert selection(d, frozenset({"a"}))[0] is chosen  # equal names: the same object
    assert selection(d, None)[0] is d


def test_changed_since_compares_content_not_identity():
    held = {"a": res("a"), "b": res("b")}
    current = {"a": res("a"), "b": res("b2"), "c": res("c")}
    assert sorted(changed_since(held, current)) == ["b", "c"]
    assert changed_since(held, current) is changed_since(held, current)


def test_forgotten_dicts_are_no_longer_held():
    import control.snapshot as snap
    d = {"a": res("a")}
    selection(d, None)
    selection(d, frozenset({"a"}))
    assert any(hit[0] is d for hit in snap._SELECTIONS.values())
    snap.forget(d)
    assert not any(hit[0] is d for hit in snap._SELECTIONS.values())
