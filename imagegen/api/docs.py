"""The API documentation: GET /openapi.json, Swagger UI at /docs and ReDoc at /redoc.

Both readers run from scripts installed with the drf-spectacular-sidecar package (Swagger UI 5
and ReDoc 2, which sends no telemetry), served from here: no page loads anything from another
host, so the documentation works with no internet.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field

from .access import access
from .problems import problem_errors
from .openapi import Reply, build_document, operation

HTML = "text/html"

DESCRIPTION = """\
Ask for images, get a job id at once, and follow the job until its images are stored.

Every error is `application/problem+json` (RFC 9457). A method a path does not accept is
answered 405 with an `Allow` header.

Every GET operation also answers HEAD (RFC 9110): the same status and headers, no body. HEAD on
an event stream answers its headers without opening the stream.

Query parameters an operation does not list are ignored, on every operation alike (a
cache-buster such as `?_=1700000000` is harmless). A listed parameter given twice, or with an
invalid value, is refused with 422.
"""

# The only files under /docs/assets, with where the package keeps them: a name from the URL
# is a key here, never a file path.
ASSETS: dict[str, tuple[str, str]] = {
    "swagger-ui-bundle.js": ("swagger-ui-dist/swagger-ui-bundle.js", "text/javascript"),
    "swagger-ui.css": ("swagger-ui-dist/swagger-ui.css", "text/css"),
    "redoc.standalone.js": ("redoc/bundles/redoc.standalone.js", "text/javascript"),
}


@functools.cache
def _assets_dir() -> Path:
    # Located, not imported: the package's __init__ imports Django, which nothing here needs.
    spec = importlib.util.find_spec("drf_spectacular_sidecar")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("drf-spectacular-sidecar is not installed")
    return Path(spec.submodule_search_locations[0]) / "static" / "drf_spectacular_sidecar"


# The pages name the document and their files relative to themselves (docs/assets/..., not
# /docs/assets/...): /docs and /redoc sit at the root of the API, so the same pages work
# directly and behind a proxy that serves the API under a path prefix (server.public_url).
SWAGGER_UI_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>imagegen API: Swagger UI</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="docs/assets/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/assets/swagger-ui-bundle.js"></script>
<script>
// validatorUrl null: by default Swagger UI sends the document's URL to an online validator.
window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
  deepLinking: true,
  validatorUrl: null,
});
</script>
</body>
</html>
"""

REDOC_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>imagegen API: ReDoc</title>
<link rel="icon" href="data:,">
</head>
<body>
<div id="redoc"></div>
<script src="docs/assets/redoc.standalone.js"></script>
<script>
Redoc.init("openapi.json", {}, document.getElementById("redoc"));
</script>
</body>
</html>
"""

# Every page may load only from this origin (and inline code and data: images): a script
# that reached for a CDN or sent telemetry would be refused by the browser itself.
_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'"
)

OPENAPI = web.AppKey("openapi", dict)


def _page(html: str) -> web.Response:
    return web.Response(text=html, content_type=HTML, headers={"Content-Security-Policy": _CSP})


class AssetPath(BaseModel):
    """Path parameters of /docs/assets/{name}."""

    name: Literal[tuple(ASSETS)] = Field(description="A script or style sheet of the documentation pages.")


@operation(
    "This API's OpenAPI 3.0 document",
    tags=("documentation",),
    replies={200: Reply(dict[str, Any], "The document Swagger UI and ReDoc render.")},
)
@access("public")
async def openapi_json(request: web.Request) -> web.Response:
    """GET /openapi.json: the document, built once at start-up."""
    return web.json_response(request.app[OPENAPI])


@operation(
    "The API documentation in Swagger UI",
    tags=("documentation",),
    replies={200: Reply(str, "An interactive page: try each operation from the browser.", HTML)},
)
@access("public")
async def swagger_ui(request: web.Request) -> web.Response:
    """GET /docs: Swagger UI over /openapi.json."""
    return _page(SWAGGER_UI_PAGE)


@operation(
    "The API documentation in ReDoc",
    tags=("documentation",),
    replies={200: Reply(str, "A reference page of every operation and model.", HTML)},
)
@access("public")
async def redoc(request: web.Request) -> web.Response:
    """GET /redoc: ReDoc over /openapi.json."""
    return _page(REDOC_PAGE)


@operation(
    "A script or style sheet of the documentation pages",
    tags=("documentation",),
    path=AssetPath,
    replies={200: Reply(str, "The file, from the installed package.", ("text/javascript", "text/css"))},
    errors=(404,),
)
@access("public")
async def docs_asset(request: web.Request) -> web.FileResponse:
    """GET /docs/assets/{name}: one of ASSETS."""
    relative, content_type = ASSETS[request.match_info["name"]]
    return web.FileResponse(_assets_dir() / relative, headers={"Content-Type": content_type})


async def _build_document(app: web.Application) -> None:
    # At start-up every route is registered (the router is frozen), whichever module added it.
    app[OPENAPI] = build_document(app, title="imagegen", version=_version(), description=DESCRIPTION)


def _version() -> str:
    # The installed distribution's version; a bare source checkout (not pip-installed) has none.
    try:
        return metadata.version("imagegen")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def add_docs(app: web.Application) -> None:
    """Register the documentation routes, and build the document when the app starts."""
    router = app.router
    router.add_get("/openapi.json", problem_errors(openapi_json))
    router.add_get("/docs", problem_errors(swagger_ui))
    router.add_get("/redoc", problem_errors(redoc))
    names = "|".join(map(re.escape, ASSETS))
    router.add_get(f"/docs/assets/{{name:{names}}}", problem_errors(docs_asset))
    app.on_startup.append(_build_document)
