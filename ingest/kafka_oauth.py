"""An OAUTHBEARER token read from its file (`ingest.settings.KafkaSecurity`). A module of its
own: the provider's base class is aiokafka's, which the settings import only where a client is
made."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiokafka.abc import AbstractTokenProvider

from ingest.errors import TokenUnreadable


class TokenFile(AbstractTokenProvider):  # type: ignore[misc]
    """An OAUTHBEARER token, read from its file at each authentication: the file's owner renews
    it, and a token read once would expire with the connection that needs it next."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)

    async def token(self) -> str:
        try:
            token = (await asyncio.to_thread(self._path.read_text)).strip()
        except OSError as exc:
            raise TokenUnreadable(f"OAUTHBEARER token file {self._path}: {exc.strerror}") from None
        if not token:
            raise TokenUnreadable(f"OAUTHBEARER token file {self._path} is empty")
        return token
