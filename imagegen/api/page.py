"""GET /: the live page, a single static file with the configured animals filled in."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from ..config import SETTINGS
from .access import access
from .openapi import Reply, operation

PAGE_PATH = Path(__file__).resolve().parent / "static" / "index.html"

PAGE = web.AppKey("page", str)


async def page_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: read and fill in the page once, at start-up."""
    settings = app[SETTINGS].jobs
    template = await asyncio.to_thread(PAGE_PATH.read_text, encoding="utf-8")
    config = {
        "animals": list(settings.animals),
        "maxImagesPerJob": settings.max_images_per_job,
        "auth": app[SETTINGS].auth.enabled,
    }
    # json.dumps output is a valid JS literal; "</" is escaped so no value can close the script.
    app[PAGE] = template.replace("__IMAGEGEN_CONFIG__", json.dumps(config).replace("</", "<\\/"))
    yield


@operation(
    "The live page",
    description="Ask for pictures and watch them arrive (one EventSource on /generations/events).",
    tags=("page",),
    replies={200: Reply(str, "The page.", "text/html")},
)
@access("public")  # the shell only: it asks for a key before it touches the API
async def index(request: web.Request) -> web.Response:
    """GET /: the page that submits jobs and shows them live."""
    return web.Response(text=request.app[PAGE], content_type="text/html")
