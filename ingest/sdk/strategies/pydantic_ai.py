"""PydanticAIStrategy: one event per agent run, from the run result's usage (polar-sdk's
strategy, same call and same metadata keys, plus `_llm` when the result names its model).

    {"request_tokens": 53, "response_tokens": 15, "total_tokens": 68, "requests": 1,
     "_llm": {"vendor": "openai", "model": "gpt-4o-mini", "input_tokens": 53,
              "cached_input_tokens": 0, "output_tokens": 15, "total_tokens": 68}}

pydantic-ai is duck-typed: both its current usage fields (`input_tokens`, `output_tokens`,
`result.usage` a property) and the older ones (`request_tokens`, `result.usage()`) work.
"""

from __future__ import annotations

from typing import Any

from ingest.sdk.strategies.base import BaseStrategy

__all__ = ["PydanticAIStrategy"]


def _has(usage: Any, name: str) -> bool:
    # Looked up without reading it: reading a deprecated alias warns.
    return hasattr(type(usage), name) or name in getattr(usage, "__dict__", {})


def _count(usage: Any, *names: str) -> int:
    """The first of `names` that `usage` has (the newer name first, so a deprecated alias is
    never read when the new one exists)."""
    for name in names:
        if _has(usage, name):
            value = getattr(usage, name)
            return value if type(value) is int else 0
    return 0


def _model(result: Any) -> tuple[str | None, str | None]:
    """(provider, model) of the run's last model response, if it says."""
    try:
        messages = result.all_messages()
    except (AttributeError, TypeError, ValueError):
        return None, None
    for message in reversed(messages):
        name = getattr(message, "model_name", None)
        if isinstance(name, str) and name:
            provider = getattr(message, "provider_name", None)
            return (provider if isinstance(provider, str) and provider else None), name
    return None, None


class PydanticAIStrategy(BaseStrategy):
    def ingest(
        self,
        external_customer_id: str | None,
        result: Any,
        *,
        customer_id: str | None = None,
        **metadata: Any,
    ) -> str | None:
        """Record the usage of one agent run (`AgentRunResult`); the event's external_id, or
        None if it could not be recorded (then reported to on_error). polar-sdk's call:
        `strategy.ingest("cust_1", result)`; by Polar customer id:
        `strategy.ingest(None, result, customer_id=...)`."""
        use = self.use(customer_id, external_customer_id, metadata)
        usage = result.usage
        # A method before pydantic-ai 1.0; since, a property whose value is also callable (with
        # a deprecation warning), so call only what is not a usage already.
        if not (_has(usage, "input_tokens") or _has(usage, "request_tokens")) and callable(usage):
            usage = usage()
        inputs = _count(usage, "input_tokens", "request_tokens")
        outputs = _count(usage, "output_tokens", "response_tokens")
        total = _count(usage, "total_tokens") or inputs + outputs
        measured: dict[str, Any] = {
            "request_tokens": inputs,
            "response_tokens": outputs,
            "total_tokens": total,
            "requests": _count(usage, "requests"),
        }
        vendor, model = _model(result)
        if model is not None:
            measured["_llm"] = {
                "vendor": vendor or "pydantic_ai",
                "model": model,
                "input_tokens": inputs,
                "cached_input_tokens": _count(usage, "cache_read_tokens"),
                "output_tokens": outputs,
                "total_tokens": total,
            }
        return use.record(measured)
