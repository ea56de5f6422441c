"""HTTP details (issue 11): HEAD on every GET route, unknown query parameters ignored everywhere,
`retry:` inside the streams' first event, problem+json for every 404 under /docs/assets, and
documentation pages that reference nothing but this server."""

from __future__ import annotations

import asyncio
import re

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from yarl import URL

from imagegen.events import BROADCASTER

from .conftest import create_job, wait_for_status

UNKNOWN = "00000000-0000-4000-8000-000000000000"
PROBLEM = "application/problem+json"


@pytest.fixture
def backend() -> str:
    """Pure HTTP behaviour: one backend is enough."""
    return "sqlite"


async def finished_job(client: TestClient) -> str:
    job_id = await create_job(client)
    await wait_for_status(client, job_id, {"completed"})
    return job_id


def get_routes(job_id: str) -> list[str]:
    """A path of every GET route of the app (the endless /generations/events apart)."""
    return [
        "/",
        "/generations",
        f"/generations/{job_id}",
        f"/generations/{job_id}/events",
        f"/generations/{job_id}/deliveries",
        f"/images/{job_id}/0.png",
        "/openapi.json",
        "/docs",
        "/redoc",
        "/docs/assets/swagger-ui.css",
        "/docs/assets/redoc.standalone.js",
        "/healthz",
        "/readyz",
        "/metrics",
    ]


async def test_the_lists_here_cover_every_get_route(client: TestClient) -> None:
    """A new GET route must be added to get_routes (and so to every test here)."""
    served = {r.resource.canonical for r in client.app.router.routes() if r.method == "GET" and r.resource}
    assert served == {
        "/", "/generations", "/generations/events", "/generations/{jobId}/events", "/generations/{jobId}",
        "/generations/{jobId}/deliveries", "/images/{jobId}/{index}.png", "/openapi.json", "/docs", "/redoc", "/docs/assets/{name}",
        "/healthz", "/readyz", "/metrics",
    }


# The headers that describe the representation, and so must be the same for HEAD as for GET.
SAME_HEADERS = ("Content-Type", "Content-Length", "ETag", "Last-Modified", "Cache-Control", "Content-Security-Policy")


async def test_head_answers_gets_status_and_headers_with_no_body(client: TestClient) -> None:
    job_id = await finished_job(client)
    for path in get_routes(job_id):
        get = await client.get(path)
        get_body = await get.read()
        head = await client.head(path)
        assert head.status == get.status == 200, path
        assert await head.read() == b"", path
        for name in SAME_HEADERS:
            if path.endswith("/events") and name == "Content-Length":
                continue  # a stream has no length: neither answer sends one
            if path == "/metrics" and name == "Content-Length":
                continue  # each scrape counts the one before it: no two are the same length
            assert head.headers.get(name) == get.headers.get(name), (path, name)
        if "Content-Length" in get.headers and path != "/metrics":
            assert int(head.headers["Content-Length"]) == len(get_body), path


async def test_head_on_an_image_revalidates_like_get(client: TestClient) -> None:
    job_id = await finished_job(client)
    etag = (await client.head(f"/images/{job_id}/0.png")).headers["ETag"]
    head = await client.head(f"/images/{job_id}/0.png", headers={"If-None-Match": etag})
    assert head.status == 304 and await head.read() == b""


@pytest.mark.parametrize("path", ["/generations/events", "/generations/{job}/events"])
async def test_head_on_a_stream_answers_its_headers_without_opening_it(make_client, path: str) -> None:
    client = await make_client(provider={"delay_s": 0.5})
    job_id = await create_job(client, numImages=3)  # running: its stream stays open on GET
    path = path.format(job=job_id)
    broadcaster = client.app[BROADCASTER]
    get = await client.get(path)
    try:
        assert get.status == 200
        subscribed = broadcaster.subscriber_count  # the GET's stream
        async with asyncio.timeout(5):  # HEAD must not wait for a stream to end
            head = await client.head(path)
            assert head.status == 200
            assert head.headers["Content-Type"] == get.headers["Content-Type"] == "text/event-stream"
            for name in ("Cache-Control", "X-Accel-Buffering"):
                assert head.headers[name] == get.headers[name]
            assert await head.read() == b""
        assert "Transfer-Encoding" not in head.headers and "Content-Length" not in head.headers
        assert broadcaster.subscriber_count == subscribed, "the HEAD left nothing subscribed"
    finally:
        get.close()


async def test_head_on_a_finished_and_followed_job_stream_is_204_like_get(client: TestClient) -> None:
    job_id = await finished_job(client)
    text = (await (await client.get(f"/generations/{job_id}/events")).read()).decode()
    last_id = re.findall(r"^id: (\d+)$", text, re.M)[-1]
    for method in ("GET", "HEAD"):
        response = await client.request(method, f"/generations/{job_id}/events", headers={"Last-Event-ID": last_id})
        assert response.status == 204, method


@pytest.mark.parametrize(
    ("path", "status"),
    [
        (f"/generations/{UNKNOWN}", 404),
        (f"/generations/{UNKNOWN}/events", 404),
        (f"/images/{UNKNOWN}/0.png", 404),
        ("/docs/assets/nope.js", 404),
        ("/nowhere", 404),
        ("/generations/nope", 422),
        ("/generations?limit=0", 422),
        ("/generations/events?lastEventId=abc", 422),
    ],
)
async def test_head_errors_are_gets_errors(client: TestClient, path: str, status: int) -> None:
    get = await client.get(path)
    head = await client.head(path)
    assert head.status == get.status == status
    assert head.content_type == get.content_type == PROBLEM
    assert head.headers["Content-Length"] == get.headers["Content-Length"]
    assert await head.read() == b""


async def test_405_lists_head_beside_get(client: TestClient) -> None:
    response = await client.put("/generations")
    assert response.status == 405 and response.content_type == PROBLEM
    assert {m.strip() for m in response.headers["Allow"].split(",")} == {"GET", "HEAD", "POST"}
    cancel = await client.head(f"/generations/{UNKNOWN}/cancel")
    assert cancel.status == 405 and cancel.headers["Allow"] == "POST"


# --- unknown query parameters --------------------------------------------------------------------


async def test_an_unknown_query_parameter_is_ignored_on_every_get_route(client: TestClient) -> None:
    job_id = await finished_job(client)
    for path in get_routes(job_id):
        for query in ("_=123", "_=1&_=2", "colour=red"):
            response = await client.get(URL(f"{path}?{query}", encoded=True))
            assert response.status == 200, (path, query, await response.text())
    stream = await client.get("/generations/events?_=123")
    try:
        assert stream.status == 200 and stream.content_type == "text/event-stream"
    finally:
        stream.close()


async def test_known_query_parameters_are_still_checked_beside_unknown_ones(client: TestClient) -> None:
    for query in ("limit=abc&_=1", "limit=1&limit=2&_=1", "status=done&colour=red"):
        response = await client.get(URL(f"/generations?{query}", encoded=True))
        assert response.status == 422 and response.content_type == PROBLEM, query
    for query in ("lastEventId=abc&_=1", "lastEventId=1&lastEventId=2&_=1"):
        response = await client.get(URL(f"/generations/events?{query}", encoded=True))
        assert response.status == 422 and response.content_type == PROBLEM, query
    page = await (await client.get("/generations?limit=1&_=9")).json()
    assert page["jobs"] == [] and page["nextCursor"] is None


async def test_the_document_says_unknown_query_parameters_are_ignored(client: TestClient) -> None:
    document = await (await client.get("/openapi.json")).json()
    assert "not list are ignored" in document["info"]["description"]
    assert "HEAD" in document["info"]["description"]


# --- retry: in the first event ---------------------------------------------------------------------


async def _first_block(response: ClientResponse) -> bytes:
    """The stream's bytes up to its first blank line."""
    data = b""
    async with asyncio.timeout(10):
        while b"\n\n" not in data:
            chunk = await response.content.readany()
            assert chunk, f"the stream ended before a blank line: {data!r}"
            data += chunk
    return data.split(b"\n\n", 1)[0]


def _fields(block: bytes) -> set[str]:
    return {line.split(b":", 1)[0].decode() for line in block.split(b"\n") if line and not line.startswith(b":")}


async def test_every_stream_sends_retry_in_its_first_event(make_client) -> None:
    client = await make_client(events={"retry_ms": 1500})
    job_id = await finished_job(client)
    text = (await (await client.get(f"/generations/{job_id}/events")).read()).decode()
    first_id = re.findall(r"^id: (\d+)$", text, re.M)[0]
    cases = [
        ("/generations/events", {}),  # ready
        ("/generations/events", {"Last-Event-ID": "1"}),  # a replay
        ("/generations/events", {"Last-Event-ID": "999999"}),  # a reset
        (f"/generations/{job_id}/events", {}),  # the job's latest event
        (f"/generations/{job_id}/events", {"Last-Event-ID": str(int(first_id) - 1)}),  # its replay
    ]
    for path, headers in cases:
        response = await client.get(path, headers=headers)
        try:
            assert response.status == 200
            block = await _first_block(response)
        finally:
            response.close()
        assert {"retry", "event", "data"} <= _fields(block), (path, headers, block)
        assert b"retry: 1500\n" in block
        assert block.count(b"retry:") == 1


async def test_retry_is_sent_once_per_stream(client: TestClient) -> None:
    job_id = await finished_job(client)
    body = await (await client.get(f"/generations/{job_id}/events")).read()
    blocks = [block for block in body.split(b"\n\n") if block.strip()]
    assert body.count(b"retry:") == 1 and b"retry:" in blocks[0]
    assert all("data" in _fields(block) for block in blocks), "no block without an event"


# --- documentation assets and external URLs --------------------------------------------------------


async def _raw_get(client: TestClient, target: str) -> tuple[int, str]:
    """GET `target` exactly as written (no client normalises it): the status and Content-Type."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(10):
            raw = await reader.read()
    finally:
        writer.close()
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:])
    return int(head[0].split()[1]), headers.get("Content-Type", "")


@pytest.mark.parametrize(
    "target",
    [
        "/docs/assets/nope.js",
        "/docs/assets/../x",
        "/docs/assets/../../imagegen/api/docs.py",
        "/docs/assets/%2e%2e/x",
        "/docs/assets/..%2Fx",
        "/docs/assets/",
        "/docs/assets/%0A",
        "/docs/assets/swagger-ui.css%0A",
        "/docs/assets/a%0Ab.js",
        "/docs/assets/%00",
        "/nowhere%0A",
    ],
)
async def test_every_404_under_docs_assets_is_problem_json(client: TestClient, target: str) -> None:
    status, content_type = await _raw_get(client, target)
    assert status == 404 and content_type.startswith(PROBLEM), (target, status, content_type)


URL_PATTERN = re.compile(r"https?://[^\s\"'<>)]*")


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
async def test_the_documentation_names_no_other_host(client: TestClient, path: str) -> None:
    text = await (await client.get(path)).text()
    own = str(client.make_url("")).rstrip("/")
    assert [url for url in URL_PATTERN.findall(text) if not url.startswith(own)] == [], path


async def test_redoc_has_no_logo_to_fetch(client: TestClient) -> None:
    # ReDoc draws a logo only from info.x-logo; its options here name no URL either.
    document = await (await client.get("/openapi.json")).json()
    assert not any(key.startswith("x-") for key in document["info"])
    html = await (await client.get("/redoc")).text()
    assert "x-logo" not in html and not URL_PATTERN.search(html)
    assert re.findall(r'src="([^"]+)"', html) == ["docs/assets/redoc.standalone.js"]
