"""Checking the ingest log of a stopped store, and moving what does not read back aside
(`meterline ingest-log check|repair`).

`check` surveys the log as the store's open does (`ingest_log.survey`), changing nothing. On
damage, it sorts each segment's bytes out as a repair does (`_sorted_out`): every whole record
(magic, lengths, CRC-32) whose seqs follow the last one kept is kept, wherever it lies (the
reader resyncs to the next whole record past bytes that do not read back); every other byte is
dropped. It counts what a repair keeps (the requests not yet stored, exactly) and what it loses:
the acknowledged bytes dropped or missing, as at most the events whose seqs lie between the kept
records around them, or before the witnessed last seq (other writes take seqs too).

`repair`, on damage:

1. A segment that drops nothing stays as it is; one that keeps nothing is moved into
   `damaged/<UTC time>/` in the log's directory; any other is linked there whole and replaced
   by its kept records, in order. A segment whose requests are all stored is moved there if
   it does not read back (its requests are in the store). A seal that no longer says the size
   (or does not read) goes there too, and so does the old witness, with a note of what was
   found. Nothing is deleted.
2. A new witness says where the kept log ends, so the store opens: it applies the kept requests
   after its stored mark with the seqs they took (no seq is drawn twice: the next is past every
   logged one), in order, after what it stored.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from aggregator.errors import AggregatorError
from aggregator.store.engine.ingest_log import (
    WITNESS,
    Damage,
    Logged,
    Mark,
    Segment,
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
from aggregator.store.engine.segments import read_only

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
    """What a repair loses: `unreadable` acknowledged bytes that it drops (they do not read
    back as a request following the last one kept) or that are missing, which held `at_most`
    events not yet stored (None: not known, the witness being gone)."""

    unreadable: int
    at_most: int | None


@dataclass(frozen=True, slots=True)
class Checked:
    """A log as `check` finds it: its `damage` (and the `loss` a repair means), else a write
    cut short that the next start cuts off (`cut`: the segment and the bytes past the kept
    end); `pending` requests (with `pending_events`) are applied again at the next start (after
    a repair, if damaged: the ones it keeps)."""

    directory: Path
    damage: Damage | None
    loss: Loss | None
    cut: tuple[Path, int] | None
    pending: int
    pending_events: int


class RepairFailed(AggregatorError):
    """A repaired log that still does not read back whole (a bug: said, never ignored)."""


def log_directory(database: Path) -> Path:
    """Where the store at `database` keeps its ingest log."""
    return Path(f"{database}.ingest")


def check(database: Path) -> Checked:
    """The ingest log of the store at `database` (not open elsewhere: DuckDB's lock says so),
    changing nothing."""
    return _checked(*_survey(database))


def repair(database: Path) -> tuple[Checked, Path | None]:
    """`check`, then, if the log is damaged, keep every whole request in order and move the
    rest aside (the module's steps); returns what was found and where it was moved (None:
    nothing was)."""
    found, stored, floor = _survey(database)
    checked = _checked(found, stored, floor)
    if found.damage is None:
        return checked, None
    directory = found.directory
    aside = _aside(directory)
    kept: list[Path] = []
    for segment in found.segments:
        if not segment.stored:
            continue
        # Its requests are stored: kept if it reads back, else moved aside whole (with it
        # kept, a later segment moved aside would leave it last, read as not stored).
        if any(record is None for record, _, _ in _pieces(segment.path.read_bytes())):
            os.rename(segment.path, aside / segment.path.name)
            seal = seal_path(segment.path)
            if seal.exists():
                os.rename(seal, aside / seal.name)
        else:
            kept.append(segment.path)
    last = (0, 0)
    for part in _sorted_out(found):  # step 1
        path, seal = part.segment.path, seal_path(part.segment.path)
        records = part.kept
        if part.drops and not records:
            os.rename(path, aside / path.name)
        elif part.drops:
            os.link(path, aside / path.name)  # the original, whole
            _replace(path, b"".join(part.data[at:end] for _, at, end in records))
        # A seal says the size a segment was left at: not the size of a part kept, nor (cut
        # short) more than is there.
        sealed = read_seal(path) if seal.exists() else None
        if sealed is not None and (part.drops or not 0 <= sealed <= len(part.data)):
            os.rename(seal, aside / seal.name)
        if records or not part.drops:
            kept.append(path)
        if records:
            last = (records[-1][0].id, records[-1][0].last_seq)
    witness = directory / WITNESS
    if witness.exists():
        os.rename(witness, aside / WITNESS)
    (aside / "repair.txt").write_text(_note(checked))
    kept.sort()
    if kept:  # step 2
        names = [int(p.stem) for p in kept]
        mark = Mark(names[0], len(names), names[-1], kept[-1].stat().st_size, *last)
    else:
        mark = Mark(0, 0, 0, 0, *last)
    Witness.open(witness, mark).close()
    fsync_directory(aside)
    fsync_directory(directory)
    again = survey(directory, stored, witnessed=True)
    if again.damage is not None:
        raise RepairFailed(f"the repaired ingest log is still damaged: {again.damage.what}")
    return checked, aside


def describe(loss: Loss) -> str:
    """What a repair loses, in a sentence."""
    said = f"{loss.unreadable:,} bytes that do not read back" if loss.unreadable else ""
    if loss.at_most is None:
        unknown = "how far the log was acknowledged is recorded nowhere else"
        return f"an unknown number of acknowledged events ({said}{'; ' if said else ''}{unknown})"
    if loss.at_most:
        where = said or "in files that are missing"
        return f"at most {loss.at_most:,} acknowledged events ({where})"
    if said:
        return f"no acknowledged event not yet stored ({said} held none)"
    return "nothing"


@dataclass(frozen=True, slots=True)
class _Sorted:
    """A segment's bytes sorted out, in order: each whole record kept and each run of bytes
    dropped (None), with the bytes it spans."""

    segment: Segment
    data: bytes
    pieces: list[tuple[Logged | None, int, int]]

    @property
    def kept(self) -> list[tuple[Logged, int, int]]:
        return [(r, at, end) for r, at, end in self.pieces if r is not None]

    @property
    def drops(self) -> bool:
        return any(r is None for r, _, _ in self.pieces)


def _sorted_out(found: Survey) -> Iterator[_Sorted]:
    """The segments not wholly stored, in order, sorted out: a whole record is kept if its id
    and seqs follow the last one kept (a copy, or a record out of order, would give a seq to
    two events)."""
    last_id = last_seq = 0
    for segment in found.segments:
        if segment.stored:
            continue
        data = segment.path.read_bytes()
        pieces: list[tuple[Logged | None, int, int]] = []
        for record, at, end in _pieces(data):
            if record is not None and record.id > last_id and record.first_seq > last_seq:
                last_id, last_seq = record.id, record.last_seq
                pieces.append((record, at, end))
            else:
                pieces.append((None, at, end))
        yield _Sorted(segment, data, pieces)


def _survey(database: Path) -> tuple[Survey, int, int]:
    """The log surveyed, the store's stored mark, and the last seq of a stored user event."""
    con = duckdb.connect(str(database), read_only=True)
    try:
        stored, witnessed = stored_marks(con)
        events = read_only(con, database, "events")
        floor = int(
            con.execute(
                f"SELECT coalesce(max(seq), 0) FROM {events} WHERE source = 'user'"  # noqa: S608 - fixed text
            ).fetchall()[0][0]
        )
    finally:
        con.close()
    return survey(log_directory(database), stored, witnessed), stored, floor


def _checked(found: Survey, stored: int, floor: int) -> Checked:
    if found.damage is None:
        cut = None
        if found.cut is not None:
            last = found.segments[-1]
            cut = (last.path, last.size - found.cut)
        logged = found.pending(stored)
        events = sum(r.last_seq - r.first_seq + 1 for r in logged)
        return Checked(found.directory, None, None, cut, len(logged), events)
    loss, pending, events = _loss(found, stored, floor)
    return Checked(found.directory, found.damage, loss, None, pending, events)


def _loss(found: Survey, stored: int, floor: int) -> tuple[Loss, int, int]:
    """What a repair loses, and the requests not yet stored (and their events) it keeps."""
    assert found.damage is not None
    mark = found.mark
    previous, last_id = floor, 0  # the last seq, and the last request, read back
    unreadable = at_most = requests = events = 0
    gap = False  # acknowledged bytes not read since `previous`
    for part in _sorted_out(found):
        segment = part.segment
        # A segment the witness counts is missing: perhaps the one before this.
        gap = gap or found.damage.missing
        stop = _acknowledged(segment.path, segment.size, segment.first, mark)
        for record, at, end in part.pieces:
            if record is None:
                if at < stop:  # past it: a write cut short, never acknowledged
                    unreadable += min(end, stop) - at
                    gap = True
                continue
            last_id = record.id
            if record.id <= stored:  # stored already: not lost
                previous, gap = max(previous, record.last_seq), False
                continue
            if gap:
                at_most += max(0, record.first_seq - 1 - previous)
                gap = False
            requests += 1
            events += record.last_seq - record.first_seq + 1
            previous = max(previous, record.last_seq)
        if stop > len(part.data):
            unreadable += stop - len(part.data)
            gap = True
    if mark is None:
        return Loss(unreadable, None), requests, events
    if mark.last_id > max(stored, last_id):  # the last acknowledged request is not read back
        at_most += max(0, mark.last_seq - previous)
    return Loss(unreadable, at_most), requests, events


def _acknowledged(path: Path, size: int, first: int, mark: Mark | None) -> int:
    """How many bytes of a segment were acknowledged, as far as the witness and seals say
    (without a witness: what is there)."""
    sealed = max(read_seal(path) or 0, 0)
    if mark is None or first < mark.segment:
        return max(size, sealed)
    if first == mark.segment:
        return max(mark.end, sealed)
    return 0


def _pieces(data: bytes) -> Iterator[tuple[Logged | None, int, int]]:
    """Each whole record of `data`, and each run of bytes that is none (up to the next whole
    record: the reader resyncs there), with the bytes it spans."""
    at = 0
    while at < len(data):
        found = frame_at(data, at)
        if found is not None:
            yield found[0], at, found[1]
            at = found[1]
            continue
        later = resync(data, at)
        end = len(data) if later is None else later
        yield None, at, end
        at = end


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


def _replace(path: Path, data: bytes) -> None:
    """`path` becomes a new file holding `data` (the old one stays, linked aside)."""
    new = path.with_name(path.name + ".new")
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
