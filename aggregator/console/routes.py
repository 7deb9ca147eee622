"""The console's routes: its two pages and their static files, all outside the API schema.

The pages are plain files: everything they show comes from the JSON API, called by their scripts
with a token kept in the browser's session storage, so the server renders nothing and stores
no session. Scripts and styles load only from this origin (the Content-Security-Policy below):
no CDN, and no inline script for injected markup to hide in."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self';"
    " connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self';"
    " frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _page(name: str) -> Route:
    async def page(request: Request) -> FileResponse:
        return FileResponse(STATIC / f"{name}.html", headers=PAGE_HEADERS)

    return Route("/" if name == "index" else f"/{name}", page, include_in_schema=False)


def routes() -> list[BaseRoute]:
    return [
        _page("index"),
        _page("portal"),
        Mount("/console", StaticFiles(directory=STATIC), name="console"),
    ]
