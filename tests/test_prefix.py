"""Under a path prefix behind a proxy (server.public_url = http://<proxy>/imagegen, the proxy
trusted): the page, Swagger UI and ReDoc load and work in Chromium through a real reverse proxy
that strips the prefix, the document's `servers` names it, and every URL the API returns
carries it."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer

from .browser import HOST, Browser
from .proxy import PrefixProxy
from .test_docs import REDOC_SHOWS, SWAGGER_UI_SHOWS
from .test_page import IMAGES_LOADED, submit

PREFIX = "/imagegen"


@pytest.fixture
def backend() -> str:
    """The prefix is about URLs and the HTTP layer: one backend is enough."""
    return "sqlite"


class Proxied:
    """The service behind the proxy: its test client, the proxy, and the public base URL."""

    def __init__(self, client: TestClient, proxy: PrefixProxy, server: TestServer) -> None:
        self.client = client
        self.proxy = proxy
        self.port = server.port
        self.public = f"http://{HOST}:{server.port}{PREFIX}"

    def outside(self, requests: list[str]) -> list[str]:
        """The requests a page made that were not under the public prefix (or inline)."""
        inline = ("data:", "blob:", "about:")
        return [url for url in requests if not url.startswith((self.public + "/", *inline))]


@pytest.fixture
async def proxied(make_client: Any, aiohttp_server: Any) -> Proxied:
    proxy = PrefixProxy(PREFIX)
    server = await aiohttp_server(proxy.app())
    public = f"http://{HOST}:{server.port}{PREFIX}"
    client = await make_client(
        server={"public_url": public, "trusted_proxies": ["127.0.0.1"]},
        provider={"delay_s": 0.2, "image_size": 96},
    )
    proxy.upstream = f"http://127.0.0.1:{client.port}"
    return Proxied(client, proxy, server)


async def test_the_api_answers_with_urls_under_the_prefix(proxied: Proxied) -> None:
    # The test client reaches the proxy by 127.0.0.1, the browser by HOST: both are the proxy.
    base = f"http://127.0.0.1:{proxied.port}{PREFIX}"
    async with ClientSession() as session:
        waited = {"Prefer": "wait=20"}
        async with session.post(f"{base}/generations", json={"numImages": 2}, headers=waited) as created:
            assert created.status == 201, await created.text()
            job = await created.json()
            assert created.headers["Location"] == f"{proxied.public}/generations/{job['jobId']}"
        assert job["imageUrls"] == [f"{proxied.public}/images/{job['jobId']}/{i}.png" for i in range(2)]
        async with session.get(f"{base}/images/{job['jobId']}/1.png") as image:
            assert image.status == 200 and image.content_type == "image/png"
        async with session.get(f"{base}/openapi.json") as document:
            assert (await document.json())["servers"] == [{"url": proxied.public}]
        async with session.get(base, allow_redirects=False) as bare:  # as nginx answers it
            assert bare.status == 301 and bare.headers["Location"] == PREFIX + "/"
    assert proxied.proxy.forwarded[0] == "/generations"  # the service saw the path without the prefix


@pytest.mark.browser
async def test_the_page_works_under_the_prefix(proxied: Proxied) -> None:
    async with Browser() as browser:
        page = await browser.open(f"{proxied.public}/")
        await page.wait_for("document.getElementById('live').textContent === 'live'")
        await submit(page, 2, "fox")
        # The card follows the job from its events (through the proxy's stream) to its images.
        widths = await page.wait_for(IMAGES_LOADED.format(status="completed", count=2))
        assert widths == [96, 96]
        # The page's cancel and delete go under the prefix too.
        await page.evaluate("document.querySelector('#jobs li .job-action').click()")
        await page.wait_for("document.querySelectorAll('#jobs li').length === 0")
        assert proxied.outside(page.requests) == []
        assert any(url.startswith(f"{proxied.public}/generations/events") for url in page.requests)
        assert page.errors == []
    assert "/generations/events" in proxied.proxy.forwarded


@pytest.mark.browser
@pytest.mark.parametrize(("path", "shows"), [("/docs", SWAGGER_UI_SHOWS), ("/redoc", REDOC_SHOWS)])
async def test_the_documentation_works_under_the_prefix(proxied: Proxied, path: str, shows: str) -> None:
    document = await (await proxied.client.get("/openapi.json")).json()
    expected = {op["operationId"] for item in document["paths"].values() for op in item.values()}
    async with Browser() as browser:
        page = await browser.open(proxied.public + path)
        shown = await page.wait_for(f"({shows}).length >= {len(expected)} && {shows}")
    assert set(shown) == expected
    assert proxied.outside(page.requests) == []
    assert f"{proxied.public}/openapi.json" in page.requests
    assert page.errors == []
