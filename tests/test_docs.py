"""GET /docs (Swagger UI) and GET /redoc (ReDoc): they render every operation with no internet."""

from __future__ import annotations

import re

import pytest
from aiohttp.test_utils import TestClient

from .browser import HOST, Browser


@pytest.fixture
def backend() -> str:
    """The documentation pages do not touch the job store: one backend is enough."""
    return "sqlite"


async def _operation_ids(client: TestClient) -> set[str]:
    document = await (await client.get("/openapi.json")).json()
    return {operation["operationId"] for item in document["paths"].values() for operation in item.values()}


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
async def test_pages_load_nothing_from_another_host(client: TestClient, path: str) -> None:
    response = await client.get(path)
    assert response.status == 200 and response.content_type == "text/html"
    html = await response.text()
    assert not re.search(r"(src|href)=\"(https?:)?//", html), "a page must not load from another host"
    # The browser itself refuses any other origin, should a script reach for one.
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]


@pytest.mark.parametrize(
    ("name", "content_type"),
    [("swagger-ui-bundle.js", "text/javascript"), ("swagger-ui.css", "text/css"), ("redoc.standalone.js", "text/javascript")],
)
async def test_assets_come_from_the_installed_package(client: TestClient, name: str, content_type: str) -> None:
    response = await client.get(f"/docs/assets/{name}")
    assert response.status == 200 and response.content_type == content_type
    assert len(await response.read()) > 100_000


@pytest.mark.parametrize("name", ["nothing.js", "..%2F..%2Fopenapi.py", "swagger-ui-bundle.js.map"])
async def test_no_other_file_is_served_as_an_asset(client: TestClient, name: str) -> None:
    response = await client.get(f"/docs/assets/{name}")
    assert response.status == 404 and response.content_type == "application/problem+json"


# The operationId of each operation a page shows, read from its DOM. Swagger UI's block ids are
# "operations-<tag>-<operationId>"; ReDoc's section ids are "operation/<operationId>".
SWAGGER_UI_SHOWS = "[...document.querySelectorAll('.opblock')].map(block => block.id.split('-').pop())"
REDOC_SHOWS = """[...document.querySelectorAll('[data-section-id^="operation/"]')]
    .map(section => section.dataset.sectionId.slice('operation/'.length))"""


@pytest.mark.browser
@pytest.mark.parametrize(("path", "shows"), [("/docs", SWAGGER_UI_SHOWS), ("/redoc", REDOC_SHOWS)])
async def test_page_renders_every_operation_with_no_internet(client: TestClient, path: str, shows: str) -> None:
    expected = await _operation_ids(client)
    port = client.server.port
    async with Browser() as browser:
        page = await browser.open(f"http://{HOST}:{port}{path}")
        shown = await page.wait_for(f"({shows}).length >= {len(expected)} && {shows}")
    assert set(shown) == expected
    assert page.outside_requests(port) == []
    assert page.errors == []
