"""Secrets in write records are sealed on the control topic: unreadable there, opened only with
the same cluster secret, and only in the record they were sealed for."""

from __future__ import annotations

from dataclasses import replace

import pytest

from aggregator.intake.sealed import Sealer, Unsealable
from meters.commands import Command, command, decode, encode


def _record(request_id: str = "r1") -> Command:
    drawn = {"endpoint_id": "e1", "secret": "whsec_abc123", "limits": {"meters": 1}}
    return command("webhook.create", "org-1", request_id, 1, drawn, data={"url": "https://x"})


def test_a_sealed_secret_travels_unreadable_and_opens_as_it_was() -> None:
    sealer = Sealer(b"k" * 32)
    record = _record()
    on_topic = encode(sealer.seal(record))
    assert b"whsec_abc123" not in on_topic
    assert sealer.open(decode(on_topic)) == record
    # What is not a secret travels as it is.
    assert b'"endpoint_id":"e1"' in on_topic


def test_another_cluster_secret_or_another_record_does_not_open_it() -> None:
    sealed = Sealer(b"k" * 32).seal(_record())
    with pytest.raises(Unsealable, match=r"drawn\.secret"):
        Sealer(b"j" * 32).open(sealed)
    moved = replace(sealed, request_id="r2")
    with pytest.raises(Unsealable):
        Sealer(b"k" * 32).open(moved)
