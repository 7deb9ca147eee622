"""`POST /v1/traces`: OTLP/HTTP trace exports (protobuf or JSON, gzip or not) as usage events.

1. Decode: `Content-Encoding: gzip` is inflated (at most the ingest body limit, else 413);
   `application/x-protobuf` and `application/json` are read (`meters.events.otlp`), only for
   the attributes that matter (the GenAI ones and the customer's); any other type is a 422.
2. Convert: each usage span becomes an event (`meters.events.genai`); usage spans without a
   customer are refused.
3. Check: the events are validated as ingest validates them, and each one a rule refuses is
   left out with its reason, so that one odd span never refuses the export.
4. The rest is published like any ingest body (the same token, limits and durability: no 2xx
   before it is durable), and the answer is OTLP's `ExportTraceServiceResponse` in the
   request's encoding, whose partial success says how many spans were refused and why.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.responses import Response

from ingest.errors import BodyTooLarge
from ingest.settings import OtlpSettings
from meters.errors import FieldError, ValidationFailed
from meters.events import EventRules, decode_json, validate_body
from meters.events.genai import usage_events, wanted_of
from meters.events.otlp import from_json, from_protobuf, partial_success_protobuf
from meters.otlp_rules import effective

OTLP_PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"
JSON_MEDIA = "application/json"
# Span outcomes counted per organization (`/metrics`), each shown from the start.
OUTCOMES = ("event", "no_customer", "invalid", "ignored")
Spans = Counter[tuple[str, str]]  # (outcome, organization id)


class PerOrganization:
    """Each organization's settings: what it stored (`read`: `meters.otlp_rules`, with
    `modified_at_us`; None if it never set any) over the deployment's, parsed once a change."""

    def __init__(
        self,
        deployment: OtlpSettings,
        read: Callable[[str], Awaitable[dict[str, Any] | None]],
        organizations: int = 10_000,
    ) -> None:
        self._deployment, self._read, self._limit = deployment, read, organizations
        self._parsed: dict[str, tuple[int, OtlpSettings]] = {}

    async def __call__(self, organization_id: str) -> OtlpSettings:
        stored = await self._read(organization_id)
        if stored is None:
            return self._deployment
        at = int(stored["modified_at_us"])
        cached = self._parsed.get(organization_id)
        if cached is not None and cached[0] == at:
            return cached[1]
        deployment = self._deployment
        settings = OtlpSettings(*effective(stored, deployment.customers, deployment.prices))
        if len(self._parsed) >= self._limit:
            self._parsed.clear()  # rare; parsing again is all it costs
        self._parsed[organization_id] = (at, settings)
        return settings


class OtlpTraces:
    """One request's conversion (steps 1 to 3) and its answer (step 4)."""

    def __init__(
        self, headers: Headers, settings: OtlpSettings, rules: EventRules, max_bytes: int, now: int
    ) -> None:
        self._now = now
        self._media = headers.get("content-type", "").partition(";")[0].strip().lower()
        self._gzip = headers.get("content-encoding", "").strip().lower() == "gzip"
        self._customers, self._prices = settings.customers, settings.prices
        self._rules, self._max_bytes = rules, max_bytes
        self.rejected = 0
        self._reasons: list[str] = []
        self.letters: list[tuple[str, dict[str, Any]]] = []  # (why, event): each refused span
        self.outcomes: Counter[str] = Counter()

    def convert(self, raw: bytes) -> bytes:
        """Steps 1 to 3: the `{"events": [...]}` body of what is kept."""
        if self._media not in (PROTOBUF, JSON_MEDIA):
            msg = f"Content-Type should be {PROTOBUF} or {JSON_MEDIA}"
            error = FieldError("content_type", ("header", "content-type"), msg, self._media)
            raise ValidationFailed([error])
        data = self._inflated(raw) if self._gzip else raw
        wanted = wanted_of(self._customers)
        resources = (
            from_protobuf(data, wanted)
            if self._media == PROTOBUF
            else from_json(decode_json(data), wanted)
        )
        converted = usage_events(resources, self._customers, self._prices)
        if converted.no_customer:
            why = (
                f"GenAI spans named no customer (attributes"
                f" {', '.join(self._customers.attributes)}, on the span, an ancestor or the"
                " resource)"
            )
            self._refuse(converted.no_customer, f"{converted.no_customer} {why}")
            self.letters += ((f"otlp: {why}", e) for e in converted.unowned)
        events = self._valid(converted.events)
        self.outcomes.update(
            event=len(events),
            no_customer=converted.no_customer,
            invalid=len(converted.events) - len(events),
            ignored=converted.spans - len(converted.events) - converted.no_customer,
        )
        return orjson.dumps({"events": events})

    def relocate(self, exc: ValidationFailed) -> ValidationFailed:
        return exc  # step 3 left out what the rules refuse

    def answer(self) -> Response:
        """Step 4."""
        message = "; ".join(self._reasons)
        if self._media == PROTOBUF:
            body = partial_success_protobuf(self.rejected, message)
            return Response(body, media_type=PROTOBUF)
        partial: dict[str, Any] = {}
        if self.rejected or message:
            partial = {
                "partialSuccess": {"rejectedSpans": str(self.rejected), "errorMessage": message}
            }
        return Response(orjson.dumps(partial), media_type=JSON_MEDIA)

    def _inflated(self, raw: bytes) -> bytes:
        inflate = zlib.decompressobj(wbits=31)  # gzip
        try:
            data = inflate.decompress(raw, self._max_bytes + 1)
        except zlib.error as exc:
            error = FieldError("gzip", ("header", "content-encoding"), f"not gzip: {exc}", None)
            raise ValidationFailed([error]) from None
        if len(data) > self._max_bytes or inflate.unconsumed_tail:
            raise BodyTooLarge(self._max_bytes)
        return data

    def _valid(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Step 3: the events the ingest rules take; each refused one counted with its reason."""
        try:
            validate_body(orjson.dumps({"events": events}), now=self._now, rules=self._rules)
            return events
        except ValidationFailed as exc:
            refused: dict[int, str] = {}
            for error in exc.errors:
                if len(error.loc) > 2 and type(error.loc[2]) is int:
                    place = ".".join(str(p) for p in error.loc[3:])
                    refused.setdefault(error.loc[2], f"{place}: {error.msg}")
            if not refused:  # not an event's: the body's own (its size, its count)
                raise
        kept = [e for i, e in enumerate(events) if i not in refused]
        for i, reason in sorted(refused.items()):
            self._refuse(1, f"span {events[i]['external_id']}: {reason}")
            self.letters.append((f"otlp: {reason}", events[i]))
        return self._valid(kept) if kept else kept

    def _refuse(self, spans: int, reason: str) -> None:
        self.rejected += spans
        if len(self._reasons) < 10:  # enough to act on; the count says the rest
            self._reasons.append(reason)
