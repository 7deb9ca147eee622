"""A full disk under the data dir: requests are answered 503 `StorageFull` (never 500),
`/healthz` says `degraded` with the reason, nothing acknowledged is lost, and once space is freed
the server takes writes again and restarts cleanly, without a restart in between.

The data dir is a small tmpfs in a mount namespace of its own (held open by a `sleep`), which
the servers and the commands that fill and free it enter with `nsenter` (root, as in CI)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.deadline import wait_for
from tests.processes import MeterlineServer

pytestmark = pytest.mark.processes

# Room, once the filler is gone, for what piled up unstored meanwhile (uncompressed in the WAL)
# and a checkpoint of it: a disk much smaller than that cannot recover without a restart.
TMPFS_MIB = 160


@pytest.fixture
def namespace(tmp_path: Path) -> Iterator[list[str]]:
    """`nsenter` into a mount namespace whose data dir is a TMPFS_MIB tmpfs."""
    data = tmp_path / "data"
    data.mkdir()
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "600"])
    try:
        enter = ["nsenter", "--target", str(holder.pid), "--mount"]
        wait_for("unshare to start", lambda: Path(f"/proc/{holder.pid}/ns/mnt").exists())
        # unshare execs sleep once the namespace is made: wait for that before entering it.
        wait_for(
            "the mount namespace to be made",
            lambda: Path(f"/proc/{holder.pid}/comm").read_text().strip() == "sleep",
        )
        subprocess.run(
            [*enter, "mount", "-t", "tmpfs", "-o", f"size={TMPFS_MIB}m", "tmpfs", str(data)],
            check=True,
        )
        yield enter
    finally:
        holder.kill()
        holder.wait()


def _batch(start: int, count: int) -> dict[str, object]:
    now = datetime.now(UTC).isoformat()
    return {
        "events": [
            {
                "name": "bytes",
                "external_customer_id": "c",
                "external_id": f"e{start + i}",
                "timestamp": now,
                # Incompressible enough that the WAL grows with every request.
                "metadata": {"pad": f"{start + i:x}" * 60},
            }
            for i in range(count)
        ]
    }


def _stored(client: httpx.Client) -> int:
    answer = client.get("/v1/events/", params={"limit": 1})
    assert answer.status_code == 200, answer.text
    total: int = answer.json()["pagination"]["total_count"]
    return total


def test_a_full_disk_answers_503_and_recovers_once_space_is_freed(
    tmp_path: Path, namespace: list[str]
) -> None:
    data = tmp_path / "data"
    filler = data / "filler"
    with MeterlineServer(data, prefix=namespace) as server, server.client() as client:
        free = client.get("/healthz").json()["storage"]["free_bytes"]
        assert 0 < free <= TMPFS_MIB * 2**20
        # Leave about 2 MiB: the next few requests fill it.
        fill = ["fallocate", "-l", str(max(free - 2 * 2**20, 2**20)), str(filler)]
        subprocess.run([*namespace, *fill], check=True)
        acknowledged, statuses = 0, []
        for start in range(0, 200_000, 2_000):
            answer = client.post("/v1/events/ingest", json=_batch(start, 2_000))
            statuses.append(answer.status_code)
            if answer.status_code == 200:
                acknowledged += answer.json()["inserted"]
                continue
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"] == "StorageFull"
            assert "No space left on device" in answer.json()["detail"]
            assert answer.headers["Retry-After"] == "30"
            break
        assert statuses[-1] == 503, statuses
        health = client.get("/healthz").json()
        assert health["status"] == "degraded"
        assert "No space left on device" in health["storage"]["reason"]
        assert 500 not in statuses
        subprocess.run([*namespace, "rm", str(filler)], check=True)
        # The events refused were not stored; sent again, they are (once the events taken
        # before the disk filled are stored: 503 until then, as the client was told).
        wait_for(
            "a batch accepted once space is freed",
            lambda: client.post("/v1/events/ingest", json=_batch(10**6, 100)).status_code == 200,
        )
        acknowledged += 100
        wait_for("/healthz to say ok", lambda: client.get("/healthz").json()["status"] == "ok")

        stored = client.get("/v1/events/", params={"limit": 1})
        assert stored.status_code == 200, (stored.text, "\n".join(server.output[-60:]))
        assert stored.json()["pagination"]["total_count"] == acknowledged
    assert server.exit_code == 0, server.output[-30:]
    # No checkpoint met the full disk (it would have invalidated the database).
    assert not any("invalidated" in line for line in server.output), server.output[-30:]
    with MeterlineServer(data, prefix=namespace) as again, again.client() as client:
        assert _stored(client) == acknowledged
    assert again.exit_code == 0, again.output[-30:]
