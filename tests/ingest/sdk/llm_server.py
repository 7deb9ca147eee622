"""A local OpenAI- and Anthropic-compatible endpoint for the LLM strategy tests: it answers
`POST /v1/chat/completions`, `/v1/responses` and `/v1/messages` with the responses recorded in
`recorded/` (JSON, or server-sent events when the request asks for a stream), and keeps the
request bodies it got. A request with `x-recorded-cut-after: N` gets only the stream's first N
events, as from a connection that broke off; with `x-recorded-without-total`, usage without
`total_tokens`, as some OpenAI-compatible servers answer."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

RECORDED = Path(__file__).parent / "recorded"
_FILES = {
    "/v1/chat/completions": "openai_chat",
    "/v1/responses": "openai_responses",
    "/v1/messages": "anthropic_messages",
}


def recorded(name: str) -> Any:
    return json.loads((RECORDED / f"{name}.json").read_text())


class RecordedLLM:
    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append((self.path, body))
                name = _FILES.get(self.path)
                if name is None:
                    self.send_error(404)
                    return
                if body.get("stream"):
                    self._stream(name, body)
                    return
                answer = recorded(name)
                if self.headers.get("x-recorded-without-total"):  # a server that omits it
                    del answer["usage"]["total_tokens"]
                self._send("application/json", json.dumps(answer).encode())

            def _stream(self, name: str, body: dict[str, Any]) -> None:
                text = (RECORDED / f"{name}_stream.sse").read_text()
                events = [event for event in text.split("\n\n") if event]
                if name == "openai_chat" and not (body.get("stream_options") or {}).get(
                    "include_usage"
                ):
                    # As OpenAI does: the usage chunk only for those who ask for it.
                    events = [e for e in events if '"choices":[]' not in e]
                cut = self.headers.get("x-recorded-cut-after")
                if cut is not None:  # a stream that breaks off: the connection closes early
                    events = events[: int(cut)]
                self._send("text/event-stream", "".join(f"{e}\n\n" for e in events).encode())

            def _send(self, content_type: str, payload: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
