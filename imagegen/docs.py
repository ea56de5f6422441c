"""The API documentation: GET /openapi.json."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from aiohttp import web

from .openapi import Reply, build_document, operation

DESCRIPTION = """\
Ask for images, get a job id at once, and follow the job until its images are stored.

Every error is `application/problem+json` (RFC 9457). A method a path does not accept is
answered 405 with an `Allow` header.
"""

OPENAPI = web.AppKey("openapi", dict)


@operation(
    "This API's OpenAPI 3.0 document",
    tags=("documentation",),
    replies={200: Reply(dict[str, Any], "The document Swagger UI and ReDoc render.")},
)
async def openapi_json(request: web.Request) -> web.Response:
    """GET /openapi.json: the document, built once at start-up."""
    return web.json_response(request.app[OPENAPI])


async def _build_document(app: web.Application) -> None:
    # At start-up every route is registered (the router is frozen), whichever module added it.
    app[OPENAPI] = build_document(
        app, title="imagegen", version=metadata.version("imagegen"), description=DESCRIPTION
    )


def add_docs(app: web.Application) -> None:
    """Register the documentation routes, and build the document when the app starts."""
    app.router.add_get("/openapi.json", openapi_json, allow_head=False)
    app.on_startup.append(_build_document)
