"""LLMStrategy: one event per completion of an OpenAI-compatible client (the `openai` package,
sync or async: `chat.completions.create`/`parse`, `responses.create`/`parse`, streaming
included) or of Anthropic's (`messages.create`, streaming included), with its token counts.

The clients are duck-typed (neither package is imported). The wrapper is a proxy for one
customer: make one per request (it costs one small object); everything the proxy does not
measure passes straight through to the client.

The event's metadata is @polar-sh/ingestion's LLM payload, field for field (its `_llm` as Polar's
server takes it, in snake_case), plus what Polar's leaves out:

    {"vendor": "anthropic.messages", "model": "claude-haiku-4-5", "inputTokens": 27,
     "cachedInputTokens": 3072, "outputTokens": 41, "totalTokens": 68, "strategy": "LLM",
     "_llm": {"vendor": "anthropic.messages", "model": "claude-haiku-4-5", "input_tokens": 27,
              "cached_input_tokens": 3072, "output_tokens": 41, "total_tokens": 68},
     "responseModel": "claude-haiku-4-5-20251001",
     "cacheCreationInputTokens": 1200, "cacheCreation1hInputTokens": 0}

As Polar's: `vendor` names the API (`openai.chat`, `openai.responses`, `anthropic.messages`),
`model` is the model asked for, and the tokens are the vendor's own counts: OpenAI's input
tokens include the cached ones; Anthropic's do not (cache reads are `cachedInputTokens`, cache
writes are left out of input and total). Added: `responseModel`, the model the response names,
and for Anthropic the cache writes (`cacheCreationInputTokens`, of which
`cacheCreation1hInputTokens` went to the 1-hour cache, priced apart), so that cache use can be
billed.

A stream is recorded when it ends, also when it ends early: the usage it has reported by then
(Anthropic reports input tokens when a message starts, so a stream cut short still records them;
OpenAI reports usage only at the end, so such a stream records nothing).

With `reserve()`, each call first holds units of a meter on meterline (`ingest.sdk.holds`) and
its event carries the hold's external_id, which settles it.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Self, TypeVar, cast

from ingest.sdk.failover import Servers
from ingest.sdk.holds import Hold, Reserve, Units, output_cap
from ingest.sdk.strategies.base import AsyncObserved, BaseStrategy, Observed, Use
from ingest.sdk.transports import Token

__all__ = ["LLMStrategy"]

C = TypeVar("C")
# The calls measured, as attribute paths from the client.
_CALLS = frozenset(
    {
        ("chat", "completions", "create"),
        ("chat", "completions", "parse"),
        ("responses", "create"),
        ("responses", "parse"),
        ("messages", "create"),
    }
)
_PREFIXES = frozenset(path[:i] for path in _CALLS for i in range(1, len(path)))
_RESPONSE_DONE = frozenset({"response.completed", "response.incomplete", "response.failed"})


class LLMStrategy(BaseStrategy):
    _reserve: Reserve | None = None

    def reserve(
        self,
        meter_id: str,
        units: Units = output_cap,
        *,
        expires_in_seconds: int = 300,
        base_url: str | Sequence[str] | None = None,
        token: Token = None,
        timeout: float = 10.0,
    ) -> Self:
        """Hold units of the customer's `meter_id` on meterline before each measured call (the
        call's output cap by default, or `units(call_kwargs)`): when meterline refuses,
        InsufficientBalance is raised and the model is not called. The call's usage event
        carries the hold's external_id, which settles the hold; a call that fails releases
        it. `base_url` (one URL or several) and `token` default to the ingestion client's
        (over HTTP), whose order of URLs the holds share. `timeout` bounds each attempt.
        Returns the strategy (chainable)."""
        endpoint = self._ingestion.http_endpoint
        if base_url is not None:
            servers = Servers(base_url)
        elif endpoint is not None:
            servers, token = endpoint[0], token or endpoint[1]
        else:
            raise ValueError("reserve() needs base_url (the client does not send over HTTP)")
        self._reserve = Reserve(meter_id, units, expires_in_seconds, servers, token, timeout)
        return self

    def wrap(
        self,
        client: C,
        *,
        customer_id: str | None = None,
        external_customer_id: str | None = None,
        vendor: str | None = None,
        **metadata: Any,
    ) -> C:
        """`client`, measured for one customer. `vendor` defaults to the client's package and
        the API called (`openai.chat`, `openai.responses`, `anthropic.messages`); a `vendor`
        given is sent as it is. Wrapping a wrapped client replaces the first wrapping."""
        use = self.use(customer_id, external_customer_id, metadata)
        while isinstance(client, _Resource):
            client = client._target
        package = type(client).__module__.partition(".")[0] or "openai"
        return cast(C, _Resource(client, (), _Call(use, vendor, package)))


@dataclass(frozen=True, slots=True)
class _Usage:
    model: str | None
    input_tokens: int
    output_tokens: int
    total_tokens: int
    cached_input_tokens: int
    # Anthropic's cache writes (all, and those to the 1-hour cache); None for other vendors.
    cache_writes: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class _Call:
    use: Use
    vendor: str | None  # as the caller gave it
    package: str

    def hold(self, kwargs: Mapping[str, Any]) -> Hold | None:
        """The hold the call with `kwargs` makes, when the strategy reserves."""
        reserve = cast(LLMStrategy, self.use.strategy)._reserve
        return None if reserve is None else reserve.hold(self.use.customer, kwargs)

    def record(
        self, requested_model: str | None, api: str, hold: str | None, usage: _Usage | None
    ) -> None:
        if usage is None:  # a server that reports no usage: nothing to count
            return
        # As @polar-sh/ingestion names it: the package, then the API (the call's first name).
        vendor = self.vendor or f"{self.package}.{api}"
        model = requested_model or usage.model or "unknown"
        llm = {
            "vendor": vendor,
            "model": model,
            "input_tokens": usage.input_tokens,
            "cached_input_tokens": usage.cached_input_tokens,
            "output_tokens": usage.output_tokens,
            "total_tokens": usage.total_tokens,
        }
        measured: dict[str, Any] = {
            "vendor": vendor,
            "model": model,
            "inputTokens": usage.input_tokens,
            "cachedInputTokens": usage.cached_input_tokens,
            "outputTokens": usage.output_tokens,
            "totalTokens": usage.total_tokens,
            "strategy": "LLM",
            "_llm": llm,
        }
        if usage.model is not None:
            measured["responseModel"] = usage.model
        if usage.cache_writes is not None:
            writes, writes_1h = usage.cache_writes
            measured["cacheCreationInputTokens"] = writes
            measured["cacheCreation1hInputTokens"] = writes_1h
        self.use.record(measured, hold)


class _Resource:
    """The client, or one of its resources (`chat`, `chat.completions`, ...), proxied."""

    __slots__ = ("_call", "_path", "_target")

    def __init__(self, target: Any, path: tuple[str, ...], call: _Call) -> None:
        self._target = target
        self._path = path
        self._call = call

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        path = (*self._path, name)
        if path in _CALLS:
            return _measured(value, path, self._call)
        if path in _PREFIXES:
            return _Resource(value, path, self._call)
        return value

    def __repr__(self) -> str:
        return f"<measured {self._target!r}>"


def _int(value: Any) -> int:
    return value if type(value) is int else 0


def usage_of(response: Any) -> _Usage | None:
    """Token counts of a chat completion, a Responses API response or an Anthropic message."""
    usage = getattr(response, "usage", None)
    if usage is None:
        return None
    model = getattr(response, "model", None)
    model = model if isinstance(model, str) and model else None
    if hasattr(usage, "prompt_tokens"):  # chat completions
        prompt, completion = _int(usage.prompt_tokens), _int(getattr(usage, "completion_tokens", 0))
        details = getattr(usage, "prompt_tokens_details", None)
        cached = _int(getattr(details, "cached_tokens", 0))
        total = _int(getattr(usage, "total_tokens", 0)) or prompt + completion
        return _Usage(model, prompt, completion, total, cached)
    if hasattr(usage, "cache_read_input_tokens"):  # Anthropic
        return _anthropic(model, _anthropic_counts(usage))
    # The Responses API.
    inputs, outputs = (
        _int(getattr(usage, "input_tokens", 0)),
        _int(getattr(usage, "output_tokens", 0)),
    )
    details = getattr(usage, "input_tokens_details", None)
    cached = _int(getattr(details, "cached_tokens", 0))
    total = _int(getattr(usage, "total_tokens", 0)) or inputs + outputs
    return _Usage(model, inputs, outputs, total, cached)


_ANTHROPIC_COUNTS = (
    "input_tokens",  # not cached
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
)
_WRITES_1H = "ephemeral_1h_input_tokens"


def _anthropic_counts(usage: Any, counts: dict[str, int] | None = None) -> dict[str, int]:
    """Anthropic's counts, over `counts`: a stream's `message_delta` repeats them
    cumulatively, with null for those it does not update."""
    counts = dict(counts or {})
    for name in _ANTHROPIC_COUNTS:
        value = getattr(usage, name, None)
        if type(value) is int:
            counts[name] = value
    value = getattr(getattr(usage, "cache_creation", None), _WRITES_1H, None)
    if type(value) is int:
        counts[_WRITES_1H] = value
    return counts


def _anthropic(model: str | None, counts: dict[str, int]) -> _Usage:
    """Polar's reading of Anthropic's counts (ai-sdk's): input and total leave the cache out."""
    inputs, outputs = counts.get("input_tokens", 0), counts.get("output_tokens", 0)
    writes = (counts.get("cache_creation_input_tokens", 0), counts.get(_WRITES_1H, 0))
    return _Usage(
        model, inputs, outputs, inputs + outputs, counts.get("cache_read_input_tokens", 0), writes
    )


# The record of one call: the usage it reported, or None.
Record = Callable[["_Usage | None"], None]


class _Tally:
    """A stream's usage, gathered from its chunks; recorded once, when the stream ends."""

    def __init__(self, record: Record, hide_usage_chunk: bool) -> None:
        self.record = record
        self._hide = hide_usage_chunk
        self._usage: _Usage | None = None
        self._model: str | None = None  # Anthropic's, from message_start
        self._counts: dict[str, int] | None = None  # Anthropic's
        self._done = False

    def observe(self, chunk: Any) -> bool:
        """Take what `chunk` says about usage; False for the usage-only chunk the wrapper asked
        for (`stream_options.include_usage`), which the caller never sees."""
        kind = getattr(chunk, "type", None)
        if kind == "message_start":  # Anthropic
            message = getattr(chunk, "message", None)
            model = getattr(message, "model", None)
            self._model = model if isinstance(model, str) else None
            self._counts = _anthropic_counts(getattr(message, "usage", None))
        elif kind == "message_delta" and getattr(chunk, "usage", None) is not None:
            self._counts = _anthropic_counts(chunk.usage, self._counts)
        elif kind in _RESPONSE_DONE:  # the Responses API
            self._usage = usage_of(getattr(chunk, "response", None)) or self._usage
        elif kind is None and getattr(chunk, "usage", None) is not None:  # chat completions
            self._usage = usage_of(chunk)
            if self._hide and not getattr(chunk, "choices", None):
                return False
        return True

    def finish(self) -> None:
        if not self._done:
            self._done = True
            if self._counts is not None:
                self._usage = _anthropic(self._model, self._counts)
            self.record(self._usage)


def _measured(method: Callable[..., Any], path: tuple[str, ...], call: _Call) -> Callable[..., Any]:
    def measured(*args: Any, **kwargs: Any) -> Any:
        streaming = kwargs.get("stream") is True
        hide = False
        if streaming and path[0] == "chat":
            # Chat streams report usage only when asked; ask, and hide the extra chunk from a
            # caller who did not.
            options = kwargs.get("stream_options")
            options = dict(options) if isinstance(options, Mapping) else {}
            if options.get("include_usage") is not True:
                kwargs["stream_options"] = {**options, "include_usage": True}
                hide = True
        model = kwargs.get("model")
        hold = call.hold(kwargs)
        external_id = None if hold is None else hold.external_id
        record = partial(
            call.record, model if isinstance(model, str) else None, path[0], external_id
        )
        tally = _Tally(record, hide)
        if hold is not None and inspect.iscoroutinefunction(inspect.unwrap(method)):
            return _held(hold, lambda: method(*args, **kwargs), streaming, tally)
        if hold is not None:
            hold.make()  # raises when refused: the model is not called
        try:
            result = method(*args, **kwargs)
        except BaseException:
            if hold is not None:
                hold.release()
            raise
        if inspect.isawaitable(result):
            return _after(result, streaming, tally)
        if streaming:
            return Observed(result, tally)
        record(usage_of(result))
        return result

    return measured


async def _after(awaitable: Awaitable[Any], streaming: bool, tally: _Tally) -> Any:
    result = await awaitable
    if streaming:
        return AsyncObserved(result, tally)
    tally.record(usage_of(result))
    return result


async def _held(
    hold: Hold, call: Callable[[], Awaitable[Any]], streaming: bool, tally: _Tally
) -> Any:
    """An async call after its hold (made without blocking the event loop)."""
    await hold.amake()
    try:
        return await _after(call(), streaming, tally)
    except BaseException:
        await hold.arelease()
        raise
