"""Every strategy's events, as a real `meterline up` stored them over HTTP, with the documented
payloads: the LLM strategy with the real `openai` and `anthropic` clients against a local
endpoint serving recorded responses (streaming included), PydanticAI with a real agent run, S3
with real boto3 against moto's S3 server, streams, and elapsed time with a fake clock."""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anthropic
import botocore.exceptions
import openai
import pytest
from pydantic_ai import Agent
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from ingest.sdk import Ingestion, NotRecorded
from ingest.sdk.strategies import (
    DeltaTimeStrategy,
    LLMStrategy,
    PydanticAIStrategy,
    S3Strategy,
    StreamStrategy,
)
from tests.deadline import seconds_left
from tests.ingest.sdk.conftest import Reports, stored
from tests.ingest.sdk.llm_server import RecordedLLM
from tests.processes import Server

pytestmark = pytest.mark.slow
ANTHROPIC_MODEL = "claude-haiku-4-5-20251001"


@pytest.fixture
def ingestion(meterline: Server) -> Iterator[Ingestion]:
    with Ingestion(meterline.token, base_url=meterline.url, flush_interval=60) as client:
        yield client


def metadata_by_step(server: Server, customer: str) -> list[dict[str, Any]]:
    """The stored metadata of the customer's events, ordered by their `step` (and without it)."""
    events = stored(server, customer)
    for e in events:
        assert e["name"] in ("llm", "ai.run", "s3.upload", "stream.bytes", "compute")
    found = sorted((e["metadata"] for e in events), key=lambda m: m["step"])
    for metadata in found:
        del metadata["step"]
    return found


def llm_payload(
    vendor: str, model: str, inputs: int, cached: int, outputs: int, **extra: Any
) -> dict[str, Any]:
    """The documented LLM payload, as meterline stores it (`_llm.prompt`/`response`: null)."""
    total = inputs + outputs
    return {
        "vendor": vendor,
        "model": model,
        "inputTokens": inputs,
        "cachedInputTokens": cached,
        "outputTokens": outputs,
        "totalTokens": total,
        "strategy": "LLM",
        "_llm": {
            "vendor": vendor,
            "model": model,
            "prompt": None,
            "response": None,
            "input_tokens": inputs,
            "cached_input_tokens": cached,
            "output_tokens": outputs,
            "total_tokens": total,
        },
        **extra,
    }


# As @polar-sh/ingestion: the API as vendor, the model asked for, the vendor's own token counts
# (Anthropic's input leaves the cache out); plus the model the response names and cache writes.
CHAT = llm_payload(
    "openai.chat", "gpt-4o-mini", 812, 512, 194, responseModel="gpt-4o-mini-2024-07-18"
)
CHAT_STREAM = llm_payload(
    "openai.chat", "gpt-4o-mini", 41, 0, 7, responseModel="gpt-4o-mini-2024-07-18"
)
RESPONSES = llm_payload(
    "openai.responses", "gpt-4.1-mini", 1320, 1024, 58, responseModel="gpt-4.1-mini-2025-04-14"
)
RESPONSES_STREAM = llm_payload(
    "openai.responses", "gpt-4.1-mini", 230, 0, 12, responseModel="gpt-4.1-mini-2025-04-14"
)
ANTHROPIC = {"responseModel": ANTHROPIC_MODEL, "cacheCreation1hInputTokens": 0}
MESSAGES = llm_payload(
    "anthropic.messages", ANTHROPIC_MODEL, 27, 3072, 41, cacheCreationInputTokens=1200, **ANTHROPIC
)
MESSAGES_STREAM = llm_payload(
    "anthropic.messages", ANTHROPIC_MODEL, 19, 2048, 9, cacheCreationInputTokens=0, **ANTHROPIC
)
ASK = [{"role": "user", "content": "What is usage-based billing?"}]


def test_llm_openai_sync_with_streams(
    meterline: Server, llm: RecordedLLM, ingestion: Ingestion, customer: str
):
    strategy = ingestion.strategy(LLMStrategy, "llm", app="demo")
    client = strategy.wrap(
        openai.OpenAI(api_key="k", base_url=f"{llm.url}/v1"), external_customer_id=customer
    )
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=ASK)
    assert answer.choices[0].message.content.startswith("Usage-based billing")
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=ASK, stream=True))
    # The wrapper asked for usage and hid the extra chunk from a caller who did not.
    assert llm.requests[-1][1]["stream_options"] == {"include_usage": True}
    assert all(chunk.choices for chunk in chunks) and len(chunks) == 8
    asked = client.chat.completions.create(
        model="gpt-4o-mini", messages=ASK, stream=True, stream_options={"include_usage": True}
    )
    with asked:
        assert next(iter(asked)).choices[0].delta.role == "assistant"
        assert list(asked)[-1].usage.total_tokens == 48  # asked for: kept
    client.responses.create(model="gpt-4.1-mini", input="Explain meters.")
    events = [e.type for e in client.responses.create(model="gpt-4.1-mini", input="?", stream=True)]
    assert events[-1] == "response.completed"
    assert ingestion.flush(seconds_left())
    found = [e["metadata"] for e in stored(meterline, customer)]
    expected = [CHAT, CHAT_STREAM, CHAT_STREAM, RESPONSES, RESPONSES_STREAM]
    canonical = partial(json.dumps, sort_keys=True)
    assert sorted(map(canonical, found)) == sorted(
        canonical({**m, "app": "demo"}) for m in expected
    )


def test_llm_openai_async(meterline: Server, llm: RecordedLLM, ingestion: Ingestion, customer: str):
    strategy = ingestion.strategy(LLMStrategy, "llm")

    async def main() -> None:
        client = strategy.wrap(
            openai.AsyncOpenAI(api_key="k", base_url=f"{llm.url}/v1"),
            external_customer_id=customer,
            step=0,
        )
        await client.chat.completions.create(model="gpt-4o-mini", messages=ASK)
        client = strategy.wrap(client, external_customer_id=customer, step=1)  # replaces
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=ASK, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        assert text == "Metering counts usage as events."
        client = strategy.wrap(client, external_customer_id=customer, step=2)
        async with await client.responses.create(
            model="gpt-4.1-mini", input="?", stream=True
        ) as events:
            assert [e.type async for e in events][-1] == "response.completed"

    asyncio.run(main())
    assert ingestion.flush(seconds_left())
    assert metadata_by_step(meterline, customer) == [CHAT, CHAT_STREAM, RESPONSES_STREAM]


def test_llm_anthropic(meterline: Server, llm: RecordedLLM, ingestion: Ingestion, customer: str):
    strategy = ingestion.strategy(LLMStrategy, "llm")
    sync = anthropic.Anthropic(api_key="k", base_url=llm.url)
    client = strategy.wrap(sync, external_customer_id=customer, step=0)
    message = client.messages.create(model=ANTHROPIC_MODEL, max_tokens=256, messages=ASK)
    assert message.content[0].text.startswith("A meter")
    client = strategy.wrap(sync, external_customer_id=customer, step=1)
    stream = client.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=256, messages=ASK, stream=True
    )
    assert [e.type for e in stream][-1] == "message_stop"

    async def main() -> None:
        aclient = strategy.wrap(
            anthropic.AsyncAnthropic(api_key="k", base_url=llm.url),
            external_customer_id=customer,
            step=2,
        )
        events = await aclient.messages.create(
            model=ANTHROPIC_MODEL, max_tokens=256, messages=ASK, stream=True
        )
        types = [e.type async for e in events]
        assert types[0] == "message_start"

    asyncio.run(main())
    assert ingestion.flush(seconds_left())
    assert metadata_by_step(meterline, customer) == [MESSAGES, MESSAGES_STREAM, MESSAGES_STREAM]


def test_llm_cost_and_what_a_failing_cost_does(meterline: Server, llm: RecordedLLM, customer: str):
    reports = Reports()
    with Ingestion(
        meterline.token, base_url=meterline.url, flush_interval=60, on_error=reports
    ) as ingestion:
        # $0.15 / $0.60 per million tokens, in cents; float arithmetic, rounded to 12 places.
        strategy = ingestion.strategy(LLMStrategy, "llm").cost(
            lambda m: m["_llm"]["input_tokens"] * 0.000015 + m["_llm"]["output_tokens"] * 0.00006
        )
        openai_client = openai.OpenAI(api_key="k", base_url=f"{llm.url}/v1")
        client = strategy.wrap(openai_client, customer_id=None, external_customer_id=customer)
        client = strategy.wrap(client, external_customer_id=customer, step=0)  # once, not twice
        client.chat.completions.create(model="gpt-4o-mini", messages=ASK)
        strategy.cost(lambda m: 10**9)  # over Polar's per-event limit: not recordable
        answer = strategy.wrap(openai_client, external_customer_id=customer, step=1)
        assert answer.chat.completions.create(model="gpt-4o-mini", messages=ASK).usage
        assert ingestion.flush(seconds_left())
    [found] = metadata_by_step(meterline, customer)
    assert found == {**CHAT, "_cost": {"amount": "0.02382", "currency": "usd"}}
    [failed] = reports.errors
    assert isinstance(failed, NotRecorded) and "5 digits" in str(failed)
    assert failed.events[0]["metadata"]["_llm"]["total_tokens"] == 1006
    with pytest.raises(ValueError, match="exactly one"):
        strategy.wrap(openai_client)


def test_pydantic_ai_agent_run(
    meterline: Server, llm: RecordedLLM, ingestion: Ingestion, customer: str
):
    model = OpenAIChatModel(
        "gpt-4o-mini", provider=OpenAIProvider(base_url=f"{llm.url}/v1", api_key="k")
    )
    result = Agent(model).run_sync("What is usage-based billing?")
    strategy = ingestion.strategy(PydanticAIStrategy, "ai.run", app="demo")
    strategy.ingest(customer, result, step=0)  # polar-sdk's call
    assert ingestion.flush(seconds_left())
    [found] = metadata_by_step(meterline, customer)
    assert found == {
        "request_tokens": 812,
        "response_tokens": 194,
        "total_tokens": 1006,
        "requests": 1,
        "app": "demo",
        "_llm": {
            "vendor": "openai",
            "model": "gpt-4o-mini-2024-07-18",
            "prompt": None,
            "response": None,
            "input_tokens": 812,
            "cached_input_tokens": 512,
            "output_tokens": 194,
            "total_tokens": 1006,
        },
    }


def test_s3_uploads(
    meterline: Server, s3_client: Any, ingestion: Ingestion, customer: str, tmp_path: Path
):
    raw = s3_client
    raw.create_bucket(Bucket="media")
    strategy = ingestion.strategy(S3Strategy, "s3.upload")
    s3 = strategy.wrap(raw, external_customer_id=customer, step=0)
    s3.put_object(Bucket="media", Key="a.txt", Body=b"x" * 1000, ContentType="text/plain")
    s3 = strategy.wrap(
        strategy.wrap(raw, external_customer_id="someone else"),
        external_customer_id=customer,
        step=1,
    )  # wrapped twice: one event
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(9 * 1024 * 1024))  # over boto3's multipart threshold
    s3.upload_file(str(big), "media", "big.bin", ExtraArgs={"ContentType": "application/zip"})
    s3 = strategy.wrap(raw, external_customer_id=customer, step=2)
    s3.upload_fileobj(io.BytesIO(b"p" * 12345), "media", "c.png")
    s3 = strategy.wrap(raw, external_customer_id=customer, step=3)
    upload = s3.create_multipart_upload(Bucket="media", Key="d.bin", ContentType="video/mp4")
    parts = []
    for number, size in ((1, 5 * 1024 * 1024), (2, 1000), (2, 777)):  # part 2 sent again
        answer = s3.upload_part(
            Bucket="media",
            Key="d.bin",
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=b"m" * size,
        )
        parts = [p for p in parts if p["PartNumber"] != number]
        parts.append({"PartNumber": number, "ETag": answer["ETag"]})
    s3.complete_multipart_upload(
        Bucket="media", Key="d.bin", UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    with pytest.raises(botocore.exceptions.ClientError):  # failed: not an upload
        s3.put_object(Bucket="no-such-bucket", Key="x", Body=b"x")
    assert s3.head_object(Bucket="media", Key="d.bin")["ContentLength"] == 5 * 1024 * 1024 + 777
    assert ingestion.flush(seconds_left())
    assert metadata_by_step(meterline, customer) == [
        {
            "bytes": 1000,
            "strategy": "S3",
            "bucket": "media",
            "key": "a.txt",
            "contentType": "text/plain",
        },
        {
            "bytes": 9 * 1024 * 1024,
            "strategy": "S3",
            "bucket": "media",
            "key": "big.bin",
            "contentType": "application/zip",
        },
        {"bytes": 12345, "strategy": "S3", "bucket": "media", "key": "c.png"},
        {
            "bytes": 5 * 1024 * 1024 + 777,
            "strategy": "S3",
            "bucket": "media",
            "key": "d.bin",
            "contentType": "video/mp4",
        },
    ]
    assert stored(meterline, "someone else") == []


def test_streams(meterline: Server, ingestion: Ingestion, customer: str):
    strategy = ingestion.strategy(StreamStrategy, "stream.bytes")

    def wrap(stream: Any, step: int) -> Any:
        return strategy.wrap(stream, external_customer_id=customer, step=step)

    reader = wrap(io.BytesIO(b"r" * 1000), 0)
    while reader.read(300):
        pass
    reader.close()  # after the end: still one event
    with wrap(io.BytesIO(), 1) as writer:
        writer.write(b"w" * 10)
        writer.writelines([b"w" * 5, b"w" * 5])
    text = wrap(wrap(io.StringIO("héllo\nwörld\n"), 99), 2)  # wrapped twice: counted once
    assert list(text) == ["héllo\n", "wörld\n"]
    assert sum(len(chunk) for chunk in wrap(iter([b"ab", b"cde", bytearray(5)]), 3)) == 10

    async def produce() -> AsyncIterator[bytes]:
        for size in (100, 200):
            yield b"a" * size

    async def consume() -> int:
        return sum([len(chunk) async for chunk in wrap(produce(), 4)])

    assert asyncio.run(consume()) == 300
    assert ingestion.flush(seconds_left())
    assert metadata_by_step(meterline, customer) == [
        {"bytes": n, "strategy": "Stream"} for n in (1000, 20, 14, 10, 300)
    ]


def test_delta_time(meterline: Server, ingestion: Ingestion, customer: str):
    ticks = iter([10.0, 10.5, 20.0, 21.25, 30.0, 33.0, 40.0, 40.125, 50.0, 50.75])
    timer = ingestion.strategy(DeltaTimeStrategy, "compute").clock(lambda: next(ticks))
    with timer.measure(external_customer_id=customer, step=0):
        pass

    @timer.measure(external_customer_id=customer, step=1)
    def work(x: int) -> int:
        return x * 2

    @timer.measure(external_customer_id=customer, step=2)
    async def async_work() -> str:
        return "done"

    assert work(21) == 42
    assert asyncio.run(async_work()) == "done"
    stop = timer.start(external_customer_id=customer, step=3)
    stop()
    stop()  # once
    with pytest.raises(RuntimeError), timer.measure(external_customer_id=customer, step=4):
        raise RuntimeError("the time was spent all the same")
    assert ingestion.flush(seconds_left())
    assert metadata_by_step(meterline, customer) == [
        {"deltaTime": d, "strategy": "DeltaTime"} for d in (0.5, 1.25, 3.0, 0.125, 0.75)
    ]
