"""How a producer learns its organization's id: `meterline org list|show` on the data dir, and
`GET /v1/organizations/` (polar-sdk's `organizations.list()`), which shows a token its own
organization only."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import httpx
from polar.v2026_10 import Polar

from tests.inprocess import data_dir_cli, token_cli
from tests.processes import Server, new_org_token


def _org(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return data_dir_cli(data_dir, "org", *args)


def test_the_api_lists_the_tokens_own_organization_only(server: Server) -> None:
    name = f"Acme {uuid.uuid4().hex[:8]}"
    polar = Polar(new_org_token(server.data_dir, name), base_url=server.url)
    new_org_token(server.data_dir, f"other-{uuid.uuid4().hex[:8]}")
    listed = polar.organizations.list()
    assert [o.name for o in listed.items] == [name]
    assert listed.pagination.total_count == 1
    (mine,) = listed.items
    assert polar.organizations.get(mine.id).id == mine.id
    assert polar.organizations.list(slug=mine.slug).items[0].id == mine.id
    assert polar.organizations.list(slug="someone-else").items == []
    assert polar.organizations.list(page=2).items == []


def test_raw_http_answers_and_refusals(server: Server) -> None:
    token = new_org_token(server.data_dir, f"raw-{uuid.uuid4().hex[:8]}")
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/v1/organizations/").status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        found = client.get("/v1/organizations/", headers=auth, params={"sorting": "-name"})
        assert found.status_code == 200
        assert found.json()["pagination"] == {"total_count": 1, "max_page": 1}
        bad = client.get("/v1/organizations/", headers=auth, params={"sorting": "size"})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"] == ["query", "sorting"]


def test_org_list_and_show_name_ids_and_token_counts(server: Server) -> None:
    name = f"counted-{uuid.uuid4().hex[:8]}"
    polar = Polar(new_org_token(server.data_dir, name), base_url=server.url)
    org_id = polar.organizations.list().items[0].id
    new_org_token(server.data_dir, name)
    tokens = token_cli(server.data_dir, "list").stdout.splitlines()
    token_id = next(line.split()[0] for line in tokens if f"  {name}  " in line)
    assert token_cli(server.data_dir, "revoke", token_id).returncode == 0
    listing = _org(server.data_dir, "list")
    assert listing.returncode == 0, listing.stderr
    assert f"{org_id}  {name}  1 active token, 1 revoked" in listing.stdout.splitlines()
    shown = _org(server.data_dir, "show", name)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[:2] == [f"id: {org_id}", f"name: {name}"]
    assert "tokens: 1 active token, 1 revoked" in shown.stdout
    assert _org(server.data_dir, "show", "no-such-org").returncode == 1


def test_org_refuses_a_dir_without_meterline_data(tmp_path: Path) -> None:
    refused = _org(tmp_path, "list")
    assert refused.returncode == 2
    assert "holds no meterline data" in refused.stderr
    assert list(tmp_path.iterdir()) == []  # nothing created there
