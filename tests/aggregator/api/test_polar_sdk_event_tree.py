"""Parent links and `depth` through polar-sdk: a child names its parent by event id or external
id, before or after the parent arrives; reads answer the parent's event id once it exists, and
`depth` (0..5, with or without a `parent_id` anchor) selects by the resolved tree."""

from __future__ import annotations

import uuid

import pytest
from polar.v2026_10 import Polar
from polar.v2026_10.errors import HTTPValidationError

from tests.processes import Server, new_org_token


def _names(polar: Polar, **params: object) -> list[str]:
    listed = polar.events.list(limit=100, sorting=["timestamp"], **params)  # type: ignore[arg-type]
    assert listed.pagination.total_count == len(listed.items)
    return sorted(e.name for e in listed.items)


def test_parents_resolve_in_any_order_and_depth_follows(server: Server) -> None:
    polar = Polar(new_org_token(server.data_dir, f"tree-{uuid.uuid4().hex}"), base_url=server.url)

    def send(name: str, **fields: str) -> None:
        event = {"name": name, "external_customer_id": "c", "external_id": name, **fields}
        polar.events.ingest(events=[event])

    # Children first: the grandchild names its parent, which names the root, by external id.
    send("grandchild", parent_id="child")
    send("child", parent_id="root")
    send("orphan", parent_id="never-sent")
    (waiting,) = polar.events.list(name="child").items
    assert waiting.parent_id is None  # the root has not arrived
    assert _names(polar, depth=0) == []  # nor is the child a root
    send("root")
    root = polar.events.list(name="root").items[0]
    send("by-id", parent_id=root.id)  # a parent named by its event id

    by_name = {e.name: e for e in polar.events.list(limit=100).items}
    assert by_name["child"].parent_id == root.id
    assert by_name["by-id"].parent_id == root.id
    assert by_name["grandchild"].parent_id == by_name["child"].id
    assert by_name["orphan"].parent_id is None
    assert (by_name["root"].child_count, by_name["child"].child_count) == (2, 1)
    assert polar.events.get(by_name["grandchild"].id).parent_id == by_name["child"].id

    assert _names(polar, depth=0) == ["root"]
    assert _names(polar, depth=1) == ["by-id", "child", "root"]
    assert _names(polar, depth=5) == ["by-id", "child", "grandchild", "root"]
    assert _names(polar, parent_id=root.id, depth=1) == ["by-id", "child"]
    assert _names(polar, parent_id=root.id, depth=2) == ["by-id", "child", "grandchild"]
    assert _names(polar, parent_id=root.id) == ["by-id", "child"]  # direct children
    assert _names(polar, parent_id=by_name["grandchild"].id, depth=3) == []
    # Every event is listed (and metered) without `depth`, the orphan included.
    assert len(_names(polar)) == 5


def test_a_reference_cycle_ends_at_the_depth_bound(server: Server) -> None:
    polar = Polar(new_org_token(server.data_dir, f"cycle-{uuid.uuid4().hex}"), base_url=server.url)
    polar.events.ingest(
        events=[
            {"name": "a", "external_customer_id": "c", "external_id": "a", "parent_id": "b"},
            {"name": "b", "external_customer_id": "c", "external_id": "b", "parent_id": "a"},
        ]
    )
    a = polar.events.list(name="a").items[0]
    assert _names(polar, depth=5) == []  # no root
    assert _names(polar, parent_id=a.id, depth=5) == ["a", "b"]


@pytest.mark.parametrize("depth", [-1, 6])
def test_depth_out_of_range_is_422(server: Server, depth: int) -> None:
    polar = Polar(new_org_token(server.data_dir, f"tree-{uuid.uuid4().hex}"), base_url=server.url)
    with pytest.raises(HTTPValidationError) as raised:
        polar.events.list(depth=depth)
    assert [d.loc for d in raised.value.error.detail or []] == [["query", "depth"]]
