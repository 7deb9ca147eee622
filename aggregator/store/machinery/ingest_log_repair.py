"""Checking the ingest log of a stopped store, and moving a damaged tail aside
(`meterline ingest-log check|repair`).

`check` surveys the log as the store's open does (`ingest_log.survey`), changing nothing, and
counts what a repair loses: the acknowledged requests not yet stored that read back after the
damage (exactly), and the acknowledged bytes that do not (as at most the events whose seqs lie
between the records around them, or before the witnessed last seq: other writes take seqs
too). `repair` keeps what reads back before the damage and moves the rest aside, into
`damaged/<UTC time>/` in the log's directory, with a note of what was found: a segment cut
there is linked aside whole and replaced by the part kept, later segments and the old witness
are moved. Nothing is deleted. The new witness says where the kept log ends, so the store opens.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from aggregator.store.machinery.ingest_log import (
    WITNESS,
    Damage,
    Logged,
    Mark,
    Survey,
    Witness,
    frame_at,
    fsync_directory,
    read_seal,
    resync,
    seal_path,
    stored_marks,
    survey,
    write_all,
)

__all__ = [
    "Checked",
    "check",
    "describe",
    "log_directory",
    "repair",
]

ASIDE = "damaged"  # where a repair moves what it does not keep, in the log's directory


@dataclass(frozen=True, slots=True)
class Loss:
    """What a repair loses: `requests` acknowledged and not yet stored that read back after
    the damage (`events` in them), and `unreadable` acknowledged bytes that do not (or are
    missing), which held `at_most` events (None: not known, the witness being gone)."""

    requests: int
    events: int
    unreadable: int
    at_most: int | None


@dataclass(frozen=True, slots=True)
class Checked:
    """A log as `check` finds it: its `damage` (and the `loss` a repair means), else a write
    cut short that the next start cuts off (`cut`: the segment and the bytes past the kept
    end); `pending` requests (with `pending_events`) are applied again at the next start."""

    directory: Path
    damage: Damage | None
    loss: Loss | None
    cut: tuple[Path, int] | None
    pending: int
    pending_events: int


def log_directory(database: Path) -> Path:
    """Where the store at `database` keeps its ingest log."""
    return Path(f"{database}.ingest")


def check(database: Path) -> Checked:
    """The ingest log of the store at `database` (not open elsewhere: DuckDB's lock says so),
    changing nothing."""
    return _checked(*_survey(database))


def repair(database: Path) -> tuple[Checked, Path | None]:
    """`check`, then, if the log is damaged, keep what reads back before the damage and move
    the rest aside; returns what was found and where it was moved (None: nothing was)."""
    found, stored, floor = _survey(database)
    checked = _checked(found, stored, floor)
    if found.damage is None:
        return checked, None
    directory = found.directory
    aside = _aside(directory)
    index, offset = found.damage.keep
    kept = list(found.segments[:index])
    for i, segment in enumerate(found.segments[index:], start=index):
        seal = seal_path(segment.path)
        if i == index and offset >= segment.size > 0:  # whole, but shorter than acknowledged
            kept.append(segment)
        elif i == index and offset > 0:
            os.link(segment.path, aside / segment.path.name)  # the original, whole
            _replace_with_prefix(segment.path, offset)
            kept.append(segment)
        else:
            os.rename(segment.path, aside / segment.path.name)
        if seal.exists():  # a kept part is not the size it was sealed at
            os.rename(seal, aside / seal.name)
    witness = directory / WITNESS
    if witness.exists():
        os.rename(witness, aside / WITNESS)
    (aside / "repair.txt").write_text(_note(checked))
    last = _last_kept(found, index, offset)
    if kept:
        names = [int(s.path.stem) for s in kept]
        end = offset if len(kept) > index else kept[-1].path.stat().st_size
        mark = Mark(names[0], len(names), names[-1], end, *last)
    else:
        mark = Mark(0, 0, 0, 0, *last)
    Witness.open(witness, mark).close()
    fsync_directory(aside)
    fsync_directory(directory)
    return checked, aside


def describe(loss: Loss) -> str:
    """What a repair loses, in a sentence."""
    parts = []
    if loss.requests:
        requests = "1 request" if loss.requests == 1 else f"{loss.requests:,} requests"
        parts.append(f"{loss.events:,} in {requests} that read back after the damage")
    if loss.unreadable:
        parts.append(f"{loss.unreadable:,} bytes that do not read back")
    said = ", ".join(parts) or "in files that are missing"
    if loss.at_most is None:
        head = f"{loss.events:,} acknowledged events and an unknown number more"
        if not loss.requests:
            head = "an unknown number of acknowledged events"
        return f"{head} ({said}; how far the log was acknowledged is recorded nowhere else)"
    if not loss.unreadable and not loss.at_most:
        return f"{loss.events:,} acknowledged events ({said})" if loss.requests else "nothing"
    total = loss.events + loss.at_most
    return f"at most {total:,} acknowledged events ({said}: at most {loss.at_most:,} there)"


def _survey(database: Path) -> tuple[Survey, int, int]:
    """The log surveyed, the store's stored mark, and the last seq of a stored user event."""
    con = duckdb.connect(str(database), read_only=True)
    try:
        stored, witnessed = stored_marks(con)
        floor = int(
            con.execute(
                "SELECT coalesce(max(seq), 0) FROM events WHERE source = 'user'"
            ).fetchall()[0][0]
        )
    finally:
        con.close()
    return survey(log_directory(database), stored, witnessed), stored, floor


def _checked(found: Survey, stored: int, floor: int) -> Checked:
    pending = found.pending(stored)
    events = sum(r.last_seq - r.first_seq + 1 for r in pending)
    cut = None
    if found.damage is None and found.cut is not None:
        last = found.segments[-1]
        cut = (last.path, last.size - found.cut)
    loss = None if found.damage is None else _loss(found, stored, floor)
    return Checked(found.directory, found.damage, loss, cut, len(pending), events)


def _loss(found: Survey, stored: int, floor: int) -> Loss:
    assert found.damage is not None
    index, offset = found.damage.keep
    mark = found.mark
    previous = _last_kept(found, index, offset)[1] or floor
    requests = events = unreadable = at_most = 0
    gap = found.damage.missing  # acknowledged bytes not read since `previous`
    for i, segment in enumerate(found.segments[index:], start=index):
        start = offset if i == index else 0
        stop = _acknowledged(segment.path, segment.size, segment.first, mark)
        data = segment.path.read_bytes()
        for record, at, end in _pieces(data, start, min(stop, len(data))):
            if record is None:
                unreadable += end - at
                gap = True
                continue
            if record.id <= stored:  # stored already: not lost
                previous, gap = max(previous, record.last_seq), False
                continue
            if gap:
                at_most += max(0, record.first_seq - 1 - previous)
                gap = False
            requests += 1
            events += record.last_seq - record.first_seq + 1
            previous = max(previous, record.last_seq)
        if stop > len(data):
            unreadable += stop - len(data)
            gap = True
    if mark is None:
        return Loss(requests, events, unreadable, None)
    if gap and mark.last_id > stored:
        at_most += max(0, mark.last_seq - previous)
    return Loss(requests, events, unreadable, at_most)


def _acknowledged(path: Path, size: int, first: int, mark: Mark | None) -> int:
    """How many bytes of a segment were acknowledged, as far as the witness and seals say
    (without a witness: what is there)."""
    sealed = max(read_seal(path) or 0, 0)
    if mark is None or first < mark.segment:
        return max(size, sealed)
    if first == mark.segment:
        return max(mark.end, sealed)
    return 0


def _pieces(data: bytes, start: int, stop: int) -> Iterator[tuple[Logged | None, int, int]]:
    """From byte `start` to `stop`: each whole record, and each run of bytes that is none."""
    at = start
    while at < stop:
        found = frame_at(data, at)
        if found is not None:
            yield found[0], at, found[1]
            at = found[1]
            continue
        later = resync(data, at)
        end = stop if later is None else min(later, stop)
        yield None, at, end
        at = end


def _last_kept(found: Survey, index: int, offset: int) -> tuple[int, int]:
    """The last request a repair keeps (id, last seq); (0, 0) if none is known."""
    if index < len(found.segments) and offset > 0:
        data = found.segments[index].path.read_bytes()
        records = [r for r, _, end in _pieces(data, 0, offset) if r is not None and end <= offset]
        if records:
            return records[-1].id, records[-1].last_seq
    for segment in reversed(found.segments[:index]):
        if segment.records:
            return segment.records[-1].id, segment.records[-1].last_seq
    return 0, 0


def _aside(directory: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    base = directory / ASIDE
    base.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        aside = base / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            aside.mkdir()
        except FileExistsError:
            continue
        return aside
    raise FileExistsError(base / stamp)


def _replace_with_prefix(path: Path, size: int) -> None:
    """`path` becomes a new file holding its first `size` bytes (the old one stays linked)."""
    new = path.with_name(path.name + ".new")
    with path.open("rb") as old:
        data = old.read(size)
    fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(new, path)


def _note(checked: Checked) -> str:
    assert checked.damage is not None and checked.loss is not None
    damage = checked.damage
    return (
        f"moved aside by `meterline ingest-log repair` at {datetime.now(UTC).isoformat()}\n"
        f"damage: {damage.path} at byte {damage.offset}: {damage.what}\n"
        f"lost: {describe(checked.loss)}\n"
    )
