"""Secrets in write records, sealed while they travel on the control topic.

A write record carries the secrets its write creates (a webhook endpoint's signing secret, in
`drawn`): anyone who can read the control topic must not read them. They are sealed with
AES-GCM under a key derived from the cluster secret (the data dir's `secret.key`, which every
core applying the topic shares), bound to the record's organization, kind and request id, so a
sealed value cannot be moved to another record. Records applied in the process that made them
(embedded mode) never leave it and are not sealed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import replace

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aggregator.errors import AggregatorError
from meters.commands import Command

# The `drawn` values that are secrets: webhook secrets, token hashes.
SECRET_VALUES = ("secret", "token_hash")
_NONCE_BYTES = 12


class Unsealable(AggregatorError):
    """A sealed value that does not open: sealed under another cluster secret, or altered."""


class Sealer:
    def __init__(self, cluster_secret: bytes) -> None:
        key = hmac.new(cluster_secret, b"meterline control records", hashlib.sha256).digest()
        self._aead = AESGCM(key)

    def seal(self, command: Command) -> Command:
        drawn = dict(command.drawn)
        for name in SECRET_VALUES:
            if isinstance(drawn.get(name), str):
                nonce = os.urandom(_NONCE_BYTES)
                sealed = self._aead.encrypt(nonce, drawn[name].encode(), _bound(command, name))
                drawn[name] = {"sealed": base64.b64encode(nonce + sealed).decode()}
        return replace(command, drawn=drawn)

    def open(self, command: Command) -> Command:
        drawn = dict(command.drawn)
        for name in SECRET_VALUES:
            value = drawn.get(name)
            if isinstance(value, dict) and isinstance(value.get("sealed"), str):
                data = base64.b64decode(value["sealed"])
                try:
                    opened = self._aead.decrypt(
                        data[:_NONCE_BYTES], data[_NONCE_BYTES:], _bound(command, name)
                    )
                except InvalidTag:
                    raise Unsealable(
                        f"drawn.{name} does not open: sealed under another cluster secret"
                    ) from None
                drawn[name] = opened.decode()
        return replace(command, drawn=drawn)


def _bound(command: Command, name: str) -> bytes:
    return "\n".join((command.organization_id, command.kind, command.request_id, name)).encode()
