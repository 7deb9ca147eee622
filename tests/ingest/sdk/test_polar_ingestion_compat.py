"""meterline's strategies against Polar's own (`@polar-sh/ingestion`, run under Node by
`polar_ingestion/run.mjs`), side by side on the same recorded LLM endpoint, the same S3 server
and the same streams. Both send to one capture server; each scenario is a customer
(`polar:<scenario>`, `meterline:<scenario>`).

Where the "Where they differ" table of docs/sdk/polar-ingestion.md has no row, the two sides'
events are equal (meterline adds only the documented extra fields); where it has one, each side
sends exactly the events written here.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import threading
from collections import defaultdict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from ingest.sdk import Ingestion
from ingest.sdk.strategies import DeltaTimeStrategy, LLMStrategy, S3Strategy, StreamStrategy
from meters.events import EventRules, parse_ingest_body
from meters.times import now_us
from tests.deadline import seconds_left
from tests.ingest.sdk.llm_server import RecordedLLM

pytestmark = pytest.mark.processes
NODE_PROJECT = Path(__file__).parent / "polar_ingestion"
PAGE = Path(__file__).parents[3] / "docs" / "sdk" / "polar-ingestion.md"
ASK = [{"role": "user", "content": "What is usage-based billing?"}]
ANTHROPIC_MODEL = "claude-haiku-4-5"  # asked for; the response names claude-haiku-4-5-20251001
# What meterline adds to Polar's LLM payload (docs/sdk/strategies.md, LLMStrategy).
LLM_EXTRAS = ("responseModel", "cacheCreationInputTokens", "cacheCreation1hInputTokens")


class Capture:
    """A `/v1/events/ingest` that keeps every event, by customer."""

    def __init__(self) -> None:
        self.events: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.bodies: list[Any] = []
        capture = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                capture.bodies.append(body)
                for event in body["events"]:
                    capture.events[event["external_customer_id"]].append(event)
                answer = json.dumps({"inserted": len(body["events"]), "duplicates": 0}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def metadata(self, side: str) -> dict[str, list[dict[str, Any]]]:
        prefix = f"{side}:"
        return {
            customer.removeprefix(prefix): [e.get("metadata", {}) for e in events]
            for customer, events in self.events.items()
            if customer.startswith(prefix)
        }


@pytest.fixture(scope="module")
def capture() -> Iterator[Capture]:
    server = Capture()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture(scope="module")
def polar(capture: Capture, llm: RecordedLLM, s3_url: str) -> dict[str, list[dict[str, Any]]]:
    urls = {"ingest": capture.url, "llm": llm.url, "s3": s3_url}
    subprocess.run(
        ["node", "run.mjs", json.dumps(urls)], cwd=NODE_PROJECT, check=True, timeout=seconds_left()
    )
    return capture.metadata("polar")


def _meterline_llm(ingestion: Ingestion, llm: RecordedLLM) -> None:
    strategy = ingestion.strategy(LLMStrategy, "llm")
    oai = openai.OpenAI(api_key="k", base_url=f"{llm.url}/v1")

    def client(scenario: str) -> Any:
        return strategy.wrap(oai, external_customer_id=f"meterline:{scenario}")

    client("llm.openai.chat").chat.completions.create(model="gpt-4o-mini", messages=ASK)
    client("llm.openai.chat.no_total").chat.completions.create(
        model="gpt-4o-mini", messages=ASK, extra_headers={"x-recorded-without-total": "1"}
    )
    for _ in client("llm.openai.chat.stream").chat.completions.create(
        model="gpt-4o-mini", messages=ASK, stream=True
    ):
        pass
    client("llm.openai.responses").responses.create(model="gpt-4.1-mini", input="?")
    for _ in client("llm.openai.responses.stream").responses.create(
        model="gpt-4.1-mini", input="?", stream=True
    ):
        pass
    claude = anthropic.Anthropic(api_key="k", base_url=llm.url)

    def messages(scenario: str, **kwargs: Any) -> Any:
        wrapped = strategy.wrap(claude, external_customer_id=f"meterline:{scenario}")
        return wrapped.messages.create(
            model=ANTHROPIC_MODEL, max_tokens=256, messages=ASK, **kwargs
        )

    messages("llm.anthropic")
    assert [e.type for e in messages("llm.anthropic.stream", stream=True)][-1] == "message_stop"
    cut = messages("llm.anthropic.cut", stream=True, extra_headers={"x-recorded-cut-after": "2"})
    assert [e.type for e in cut] == ["message_start", "content_block_start"]


def _meterline_s3(ingestion: Ingestion, raw: Any) -> None:
    raw.create_bucket(Bucket="meterline")
    strategy = ingestion.strategy(S3Strategy, "s3.upload")

    def client(scenario: str) -> Any:
        return strategy.wrap(raw, external_customer_id=f"meterline:{scenario}")

    client("s3.put").put_object(
        Bucket="meterline", Key="a.txt", Body=b"x" * 1000, ContentType="text/plain"
    )
    client("s3.get").get_object(Bucket="meterline", Key="a.txt")["Body"].read()
    client("s3.head").head_object(Bucket="meterline", Key="a.txt")
    s3 = client("s3.multipart")
    upload = s3.create_multipart_upload(Bucket="meterline", Key="d.bin", ContentType="video/mp4")
    parts = []
    for number, size in ((1, 5 * 1024 * 1024), (2, 1000)):
        answer = s3.upload_part(
            Bucket="meterline",
            Key="d.bin",
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=b"m" * size,
        )
        parts.append({"PartNumber": number, "ETag": answer["ETag"]})
    s3.complete_multipart_upload(
        Bucket="meterline",
        Key="d.bin",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": parts},
    )
    client("s3.stream_body").put_object(
        Bucket="meterline", Key="s.bin", Body=io.BytesIO(b"s" * 5000), ContentLength=5000
    )
    client("s3.other_request")  # a client made first for another customer, as in Polar's run
    client("s3.client_twice").put_object(Bucket="meterline", Key="t.txt", Body=b"t" * 10)


def _meterline_streams_and_time(ingestion: Ingestion) -> None:
    streams = ingestion.strategy(StreamStrategy, "stream.bytes")

    def wrap(stream: Any, scenario: str) -> Any:
        return streams.wrap(stream, external_customer_id=f"meterline:{scenario}")

    reader = wrap(io.BytesIO(b"r" * 1000), "stream.binary")
    while reader.read(300):
        pass
    reader.close()
    assert list(wrap(io.StringIO("héllo\nwörld 😀\n"), "stream.text")) == ["héllo\n", "wörld 😀\n"]
    with wrap(io.BytesIO(), "stream.writable") as writer:
        writer.write(b"w" * 20)
    ticks = iter([1000, 1250.5])
    fake = ingestion.strategy(DeltaTimeStrategy, "compute").clock(lambda: next(ticks))
    with fake.measure(external_customer_id="meterline:delta.fake_clock"):
        pass
    timer = ingestion.strategy(DeltaTimeStrategy, "compute")  # the default clock
    with timer.measure(external_customer_id="meterline:delta.documented_clock"):
        threading.Event().wait(0.05)


@pytest.fixture(scope="module")
def meterline(
    capture: Capture, llm: RecordedLLM, s3_client: Any
) -> dict[str, list[dict[str, Any]]]:
    with Ingestion("token", base_url=capture.url, flush_interval=60) as ingestion:
        _meterline_llm(ingestion, llm)
        _meterline_s3(ingestion, s3_client)
        _meterline_streams_and_time(ingestion)
        assert ingestion.flush(seconds_left())
    return capture.metadata("meterline")


def _llm(
    vendor: str,
    model: str,
    inputs: int,
    cached: int,
    outputs: int,
    total: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    total = inputs + outputs if total is None else total
    counts = {"input": inputs, "cached_input": cached, "output": outputs, "total": total}
    return {
        "vendor": vendor,
        "model": model,
        **{f"{_camel(name)}Tokens": n for name, n in counts.items()},
        "strategy": "LLM",
        "_llm": {"vendor": vendor, "model": model, **{f"{k}_tokens": n for k, n in counts.items()}},
        **extra,
    }


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _s3(size: int, key: str, **extra: Any) -> dict[str, Any]:
    return {"bytes": size, "strategy": "S3", "key": key, **extra}


# Equal on both sides (meterline adds the documented LLM extras).
EQUAL = [
    "llm.openai.chat",
    "llm.openai.chat.stream",
    "llm.openai.responses",
    "llm.openai.responses.stream",
    "llm.anthropic",
    "llm.anthropic.stream",
    "s3.put",
    "s3.client_twice",
    "stream.binary",
    "delta.fake_clock",
]

# scenario -> (Polar's events, meterline's), the bucket left out: one row each in the page.
CHAT_MODEL = "gpt-4o-mini-2024-07-18"
CLAUDE = {"responseModel": "claude-haiku-4-5-20251001", "cacheCreation1hInputTokens": 0}
DIFFERENT: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {
    "llm.openai.chat.no_total": (
        [_llm("openai.chat", "gpt-4o-mini", 812, 512, 194, total=0)],
        [_llm("openai.chat", "gpt-4o-mini", 812, 512, 194, responseModel=CHAT_MODEL)],
    ),
    "llm.anthropic.cut": (
        [],
        [
            _llm(
                "anthropic.messages",
                ANTHROPIC_MODEL,
                19,
                2048,
                1,
                cacheCreationInputTokens=0,
                **CLAUDE,
            )
        ],
    ),
    "s3.get": ([_s3(0, "a.txt")], []),
    "s3.head": ([_s3(0, "a.txt")], []),
    "s3.multipart": (
        [
            _s3(0, "d.bin", contentType="video/mp4"),
            _s3(5 * 1024 * 1024, "d.bin"),
            _s3(1000, "d.bin"),
            _s3(329, "d.bin"),  # the CompleteMultipartUpload request's XML
        ],
        [_s3(5 * 1024 * 1024 + 1000, "d.bin", contentType="video/mp4")],
    ),
    "s3.stream_body": ([_s3(0, "s.bin")], [_s3(5000, "s.bin")]),
    # One upload, counted once for each client() made from the S3 client: for another customer.
    "s3.other_request": ([_s3(10, "t.txt")], []),
    "stream.text": (  # "héllo\nwörld 😀\n": 15 UTF-16 code units, 19 UTF-8 bytes
        [{"bytes": 15, "strategy": "Stream"}],
        [{"bytes": 19, "strategy": "Stream"}],
    ),
    "stream.writable": ([], [{"bytes": 20, "strategy": "Stream"}]),
}


def _without_bucket(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k != "bucket"} for e in events]


@pytest.mark.parametrize("scenario", EQUAL)
def test_equal_where_the_meters_must_agree(
    polar: dict[str, list[dict[str, Any]]],
    meterline: dict[str, list[dict[str, Any]]],
    scenario: str,
) -> None:
    theirs = _without_bucket(polar[scenario])
    ours = [{k: v for k, v in e.items() if k not in LLM_EXTRAS} for e in meterline[scenario]]
    assert len(theirs) == 1
    assert _without_bucket(ours) == theirs


def test_the_llm_extras_are_what_polar_leaves_out(
    meterline: dict[str, list[dict[str, Any]]],
) -> None:
    [chat] = meterline["llm.openai.chat"]
    assert chat["responseModel"] == "gpt-4o-mini-2024-07-18"
    assert "cacheCreationInputTokens" not in chat  # OpenAI has no cache writes
    [claude] = meterline["llm.anthropic"]
    assert claude == _llm(
        "anthropic.messages", ANTHROPIC_MODEL, 27, 3072, 41, cacheCreationInputTokens=1200, **CLAUDE
    )


@pytest.mark.parametrize("scenario", sorted(DIFFERENT))
def test_different_exactly_as_documented(
    polar: dict[str, list[dict[str, Any]]],
    meterline: dict[str, list[dict[str, Any]]],
    scenario: str,
) -> None:
    theirs, ours = DIFFERENT[scenario]
    assert _without_bucket(polar.get(scenario, [])) == theirs
    assert _without_bucket(meterline.get(scenario, [])) == ours


def test_every_scenario_ran_and_every_difference_is_in_the_page(
    polar: dict[str, list[dict[str, Any]]], meterline: dict[str, list[dict[str, Any]]]
) -> None:
    ran = set(polar) | set(meterline)
    assert ran == set(EQUAL) | set(DIFFERENT) | {"delta.documented_clock"}
    section = PAGE.read_text().split("\n## Where they differ\n", 1)[1]
    table = section.split("\n#", 1)[0]
    documented = set(re.findall(r"^\| `([a-z0-9_.]+)` \|", table, re.MULTILINE))
    assert documented == set(DIFFERENT)


def test_both_clocks_count_milliseconds(
    polar: dict[str, list[dict[str, Any]]], meterline: dict[str, list[dict[str, Any]]]
) -> None:
    """50 ms measured with each side's default (Polar's documented `performance.now()`)."""
    for side in (polar, meterline):
        [event] = side["delta.documented_clock"]
        assert 45 <= event["deltaTime"] < 2_000, side


def test_meterline_accepts_what_both_sides_send(
    capture: Capture, polar: dict[str, Any], meterline: dict[str, Any]
) -> None:
    for body in capture.bodies:
        parse_ingest_body(body, now=now_us(), rules=EventRules())
