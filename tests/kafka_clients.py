"""Stand-ins for aiokafka clients, for failures injected between two steps of a start or into a
stop, which a real broker cannot be made to do on cue. The pipeline tests run the same code
against the Tansu broker."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.errors import KafkaError

from ingest.kafka import KafkaSettings

BOUND = 0.3  # seconds: every stop and send of these tests


def settings() -> KafkaSettings:
    return KafkaSettings("unused:9092", stop_timeout_seconds=BOUND, send_timeout_seconds=BOUND)


async def no_topics(settings: KafkaSettings) -> int:
    return settings.partitions


class Client:
    """An aiokafka client stand-in: `fail` names the call that raises, `hang` the one that
    never returns."""

    def __init__(self, fail: str | None = None, hang: str | None = None) -> None:
        self.calls: list[str] = []
        self._fail, self._hang = fail, hang

    async def _call(self, name: str) -> Any:
        self.calls.append(name)
        if name == self._hang:
            await asyncio.Event().wait()
        if name == self._fail:
            raise KafkaError(f"{name} failed") if name != "start" else RuntimeError("refused")
        return {0, 1} if name == "partitions_for" else None

    async def start(self) -> None:
        await self._call("start")

    async def stop(self) -> None:
        await self._call("stop")

    async def partitions_for(self, topic: str) -> Any:
        return await self._call("partitions_for")

    async def send(self, *args: Any, **kwargs: Any) -> Any:
        await self._call("send")
        return asyncio.sleep(0)

    def subscribe(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append("subscribe")

    def assign(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append("assign")
