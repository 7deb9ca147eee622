"""Tokens, 401 shapes (every /v1 route, before anything else is read), and organizations
that cannot see or touch each other's data."""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
from starlette.routing import Route

from aggregator.api.openapi import ApiRoute
from tests.deadline import wait_for
from tests.inprocess import InProcessCore, token_cli
from tests.processes import Server, new_org_token


def test_missing_and_bad_tokens_get_polars_401_shapes(server: Server) -> None:
    with httpx.Client(base_url=server.url) as anonymous:
        response = anonymous.post("/v1/events/ingest", json={"events": []})
        assert response.status_code == 401
        # Polar's error name; the detail tells a newcomer which header to send, and where
        # tokens come from.
        assert response.json() == {
            "error": "Unauthorized",
            "detail": "Unauthorized: send a token in the header `Authorization: Bearer <token>`."
            " This server's organization tokens are in its data dir (auth.sqlite3): `meterline"
            " token create --org NAME` makes one there, `meterline token list` lists them.",
        }
        assert response.headers["www-authenticate"].startswith("Bearer")

        for header in ("Bearer nope", "Basic abc", "Bearer"):
            response = anonymous.get("/v1/events/", headers={"Authorization": header})
            assert response.status_code == 401, header
            # Polar's (RFC 6750's) shape and words, then where this server's tokens are.
            refused = response.json()
            assert list(refused) == ["error", "error_description"], refused
            assert refused["error"] == "invalid_token"
            assert refused["error_description"].startswith(
                "The access token provided is expired, revoked, malformed, or invalid for other"
                " reasons. This server's organization tokens are in its data dir (auth.sqlite3):"
                " `meterline token create --org NAME` makes one there"
            )


def test_every_v1_route_answers_401_without_a_token(tmp_path: Path) -> None:
    """Whatever else the request gets wrong (its query, its body), and whether or not the
    route's feature is on (forwarding is off here): the missing token is what is answered."""
    hostile = (
        "page=0&limit=x&sorting=zzz&source=bogus&root_events=maybe&is_archived=maybe"
        "&start_timestamp=nope&end_timestamp=nope&interval=aeon&timezone=Mars&units=x"
        "&customer_id=nope&meter_id=nope&group_by=bogus&sort=bogus"
    )
    with InProcessCore(tmp_path) as core:
        routes = [r for r in core.app.routes if isinstance(r, Route) and r.path.startswith("/v1")]
        assert len(routes) > 25

        async def anonymous(method: str, path: str) -> httpx.Response:
            transport = httpx.ASGITransport(app=core.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://m") as client:
                body = b"{" if method in ("POST", "PATCH") else None
                return await client.request(method, f"{path}?{hostile}", content=body)

        answered = []
        for route in routes:
            if isinstance(route, ApiRoute) and route.operation.security == "none":
                continue
            path = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), route.path)
            for method in sorted(set(route.methods or ()) - {"HEAD"}):
                response = core.run(anonymous(method, path))
                answered.append((method, route.path, response.status_code, response.text[:80]))
        assert [a for a in answered if a[2] != 401] == []


def test_organizations_are_isolated(server: Server) -> None:
    tag = uuid.uuid4().hex
    token_a = new_org_token(server.data_dir, f"org-a-{tag}")
    token_b = new_org_token(server.data_dir, f"org-b-{tag}")
    with server.client(token_a) as a, server.client(token_b) as b:
        customer = a.post("/v1/customers/", json={"email": f"{tag}@a.io", "external_id": "shared"})
        assert customer.status_code == 201
        customer_id = customer.json()["id"]
        ingest = a.post(
            "/v1/events/ingest",
            json={"events": [{"name": "a", "external_customer_id": "shared", "external_id": "e1"}]},
        )
        assert ingest.json() == {"inserted": 1, "duplicates": 0}
        event_id = a.get("/v1/events/").json()["items"][0]["id"]

        # B sees nothing of A's.
        assert b.get("/v1/events/").json()["pagination"]["total_count"] == 0
        assert b.get(f"/v1/events/{event_id}").status_code == 404
        assert b.get(f"/v1/customers/{customer_id}").status_code == 404
        assert b.get("/v1/customers/external/shared").status_code == 404
        assert b.get("/v1/customers/").json()["items"] == []
        assert b.patch(f"/v1/customers/{customer_id}", json={"name": "x"}).status_code == 404

        # B cannot write into A: A's customer id is unknown to B, and the same external ids
        # are B's own (no cross-organization dedupe).
        denied = b.post(
            "/v1/events/ingest", json={"events": [{"name": "b", "customer_id": customer_id}]}
        )
        assert denied.status_code == 422
        assert denied.json()["detail"][0]["loc"] == ["body", "events", 0, "customer_id"]
        own = b.post(
            "/v1/events/ingest",
            json={"events": [{"name": "b", "external_customer_id": "shared", "external_id": "e1"}]},
        )
        assert own.json() == {"inserted": 1, "duplicates": 0}
        assert a.get("/v1/events/").json()["pagination"]["total_count"] == 1
        assert a.get(f"/v1/customers/{customer_id}").json()["name"] is None


def test_revoked_token_stops_working_within_seconds(server: Server) -> None:
    token = new_org_token(server.data_dir, f"org-revoke-{uuid.uuid4().hex}")
    with server.client(token) as client:
        assert client.get("/v1/events/").status_code == 200
        listed = token_cli(server.data_dir, "list")
        assert token not in listed.stdout  # never the token text
        token_id = next(
            line.split()[0] for line in listed.stdout.splitlines() if "org-revoke" in line
        )
        assert token_cli(server.data_dir, "revoke", token_id).returncode == 0
        revoked = time.monotonic()
        wait_for("the token to be refused", lambda: client.get("/v1/events/").status_code == 401)
        assert time.monotonic() - revoked < 10  # within seconds: what the test holds it to

    again = token_cli(server.data_dir, "revoke", token_id)
    assert again.returncode == 1


@pytest.mark.processes
def test_tokens_are_stored_only_as_hashes(server: Server) -> None:
    token = new_org_token(server.data_dir, f"org-hash-{uuid.uuid4().hex}")
    # Read by another process: closing a descriptor of the file in this one would drop the
    # POSIX locks the (in-thread) server's SQLite connection holds on it.
    files = [server.data_dir / "auth.sqlite3", server.data_dir / "auth.sqlite3-wal"]
    stored = subprocess.run(
        ["cat", *(str(f) for f in files if f.exists())], capture_output=True, check=True
    ).stdout
    assert token.encode() not in stored
