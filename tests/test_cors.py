"""Cross-origin access ([server] cors_origins): preflights, headers on every kind of answer
(errors, streams, images, a middleware's refusal), and in Chromium a page of a listed origin
that POSTs and follows a stream while a page of another origin is blocked."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from imagegen.api.cors import ALLOW_HEADERS, EXPOSE_HEADERS
from imagegen.api.problems import problem_response
from imagegen.app import create_app

from .browser import HOST, Browser
from .conftest import create_job, make_settings, wait_for_status

PAGE = "http://page.example"
OTHER = "http://other.example"
UNKNOWN = "00000000-0000-4000-8000-000000000000"
PROBLEM = "application/problem+json"
# What a page sends with its POST: the headers the issue names.
REQUESTED = "content-type, authorization, idempotency-key, prefer"


@pytest.fixture
def backend() -> str:
    """CORS is HTTP alone: one backend is enough."""
    return "sqlite"


@pytest.fixture
async def cors_client(make_client) -> TestClient:
    return await make_client(server={"cors_origins": [PAGE]})


def preflight(origin: str, method: str = "POST", headers: str = REQUESTED) -> dict[str, str]:
    return {
        "Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers
    }


def names(value: str | None) -> set[str]:
    return {part.strip().lower() for part in (value or "").split(",") if part.strip()}


async def test_a_listed_origin_is_granted_the_post_with_its_headers(cors_client: TestClient) -> None:
    response = await cors_client.options("/generations", headers=preflight(PAGE))
    assert response.status == 200, await response.text()
    assert response.headers["Access-Control-Allow-Origin"] == PAGE
    assert response.headers["Access-Control-Allow-Methods"] == "POST"
    assert names(response.headers["Access-Control-Allow-Headers"]) == names(REQUESTED)
    assert int(response.headers["Access-Control-Max-Age"]) > 0
    assert "Access-Control-Allow-Credentials" not in response.headers  # keys go in Authorization, not cookies
    assert "origin" in names(response.headers.get("Vary"))


async def test_every_allowed_header_is_granted(cors_client: TestClient) -> None:
    every = preflight(PAGE, "GET", ", ".join(ALLOW_HEADERS))
    response = await cors_client.options("/generations/events", headers=every)
    assert response.status == 200
    assert names(response.headers["Access-Control-Allow-Headers"]) == names(", ".join(ALLOW_HEADERS))


@pytest.mark.parametrize(
    ("origin", "method", "headers"),
    [
        (OTHER, "POST", REQUESTED),  # an origin not listed
        (PAGE + ":8080", "POST", REQUESTED),  # another port is another origin
        (PAGE, "POST", "content-type, x-secret"),  # a header not allowed
        (PAGE, "DELETE", ""),  # a method /generations does not have
    ],
)
async def test_other_preflights_are_refused_as_problem_json(
    cors_client: TestClient, origin: str, method: str, headers: str
) -> None:
    response = await cors_client.options("/generations", headers=preflight(origin, method, headers))
    assert response.status == 403 and response.content_type == PROBLEM
    assert "Access-Control-Allow-Origin" not in response.headers
    assert (await response.json())["detail"].startswith("CORS preflight request failed")


async def test_the_answers_name_the_origin_and_expose_the_headers(cors_client: TestClient) -> None:
    headers = {"Origin": PAGE, "Idempotency-Key": "cors-1", "Prefer": "wait=10"}
    for _ in range(2):  # the second is a replay: Idempotent-Replayed
        response = await cors_client.post("/generations", json={"numImages": 1}, headers=headers)
        assert response.status == 201
        assert response.headers["Access-Control-Allow-Origin"] == PAGE
        assert names(response.headers["Access-Control-Expose-Headers"]) == names(", ".join(EXPOSE_HEADERS))
        assert names(response.headers["Vary"]) == {"prefer", "origin"}
    assert response.headers["Idempotent-Replayed"] == "true"
    job = await response.json()
    image = await cors_client.get(URL(job["imageUrls"][0]).path, headers={"Origin": PAGE})
    assert image.status == 200 and image.headers["Access-Control-Allow-Origin"] == PAGE
    assert "origin" in names(image.headers["Vary"])


async def test_an_unlisted_origin_gets_no_cors_headers(cors_client: TestClient) -> None:
    response = await cors_client.get("/generations", headers={"Origin": OTHER})
    assert response.status == 200
    assert not [name for name in response.headers if name.lower().startswith("access-control-")]
    # Still marked as varying by Origin: a cache must not give this answer to PAGE.
    assert "origin" in names(response.headers["Vary"])


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", f"/generations/{UNKNOWN}", None, 404),
        ("GET", "/generations/not-a-uuid", None, 422),
        ("POST", "/generations", {"numImages": 0}, 422),
        ("GET", "/nowhere", None, 404),  # the fallback route
        ("PUT", "/generations", None, 405),  # the fallback route, too
        ("HEAD", f"/images/{UNKNOWN}/0.png", None, 404),
    ],
)
async def test_error_answers_carry_the_cors_headers(
    cors_client: TestClient, method: str, path: str, body: Any, status: int
) -> None:
    response = await cors_client.request(method, path, json=body, headers={"Origin": PAGE})
    assert response.status == status and response.content_type == PROBLEM
    assert response.headers["Access-Control-Allow-Origin"] == PAGE


@pytest.mark.parametrize("path", ["/generations/events", "/generations/{job}/events"])
async def test_streams_carry_the_cors_headers(make_client, path: str) -> None:
    client = await make_client(server={"cors_origins": [PAGE]}, provider={"delay_s": 0.5})
    job_id = await create_job(client, numImages=2)  # running: its stream stays open
    stream = await client.get(path.format(job=job_id), headers={"Origin": PAGE})
    try:
        assert stream.status == 200 and stream.content_type == "text/event-stream"
        assert stream.headers["Access-Control-Allow-Origin"] == PAGE
        assert (await stream.content.readline()).startswith(b"retry:")  # it is streaming
    finally:
        stream.close()
    head = await client.head(path.format(job=job_id), headers={"Origin": PAGE})
    assert head.status == 200 and head.headers["Access-Control-Allow-Origin"] == PAGE


async def test_preflights_are_answered_before_a_middleware_that_refuses_other_requests(
    database: Any, aiohttp_client: Any
) -> None:
    """A stand-in for an authentication middleware that lets OPTIONS through: preflights are still
    answered (by aiohttp-cors's own route), and its 401 carries the CORS headers a page needs to read it."""

    @web.middleware
    async def bearer_only(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "OPTIONS" or request.headers.get("Authorization") == "Bearer right":
            return await handler(request)
        return problem_response(401, "Unauthorized", "Send Authorization: Bearer <key>.")

    settings = make_settings(database.data_dir, storage=database.storage, server={"cors_origins": [PAGE]})
    app = create_app(settings)
    app.middlewares.append(bearer_only)
    client = await aiohttp_client(app)
    granted = await client.options("/generations", headers=preflight(PAGE))
    assert granted.status == 200 and granted.headers["Access-Control-Allow-Origin"] == PAGE
    refused = await client.post("/generations", json={"numImages": 1}, headers={"Origin": PAGE})
    assert refused.status == 401 and refused.content_type == PROBLEM
    assert refused.headers["Access-Control-Allow-Origin"] == PAGE
    accepted = await client.post(
        "/generations", json={"numImages": 1}, headers={"Origin": PAGE, "Authorization": "Bearer right"}
    )
    assert accepted.status == 202 and accepted.headers["Access-Control-Allow-Origin"] == PAGE


async def test_without_origins_nothing_changes(client: TestClient) -> None:
    response = await client.options("/generations", headers=preflight(PAGE))
    assert response.status == 405 and response.content_type == PROBLEM  # no preflight routes at all
    get = await client.get("/generations", headers={"Origin": PAGE})
    assert "Access-Control-Allow-Origin" not in get.headers and "Vary" not in get.headers


async def test_the_document_gains_no_options_operations(
    cors_client: TestClient, make_client: Any, tmp_path: Any
) -> None:
    document = await (await cors_client.get("/openapi.json")).json()
    assert all("options" not in item for item in document["paths"].values())
    plain = await make_client(data_dir=tmp_path / "plain")
    assert document == await (await plain.get("/openapi.json")).json()


# --- in Chromium: a page of another origin -------------------------------------------------------

# What a page of another origin does with the API at `api`: POST a job with every header the
# issue names, twice with one Idempotency-Key, read the exposed headers, and follow both streams.
CROSS_ORIGIN_SCRIPT = """(async () => {
    const api = %(api)s, result = {};
    const post = () => fetch(api + "/generations", {
        method: "POST",
        headers: {"Content-Type": "application/json", "Authorization": "Bearer page-key",
                  "Idempotency-Key": "from-the-page", "Prefer": "wait=10"},
        body: JSON.stringify({numImages: 1, animal: "owl"}),
    });
    try {
        const first = await post(), again = await post();
        result.status = [first.status, again.status];
        result.location = first.headers.get("Location");
        result.applied = first.headers.get("Preference-Applied");
        result.replayed = again.headers.get("Idempotent-Replayed");
        result.job = await first.json();
    } catch (error) {
        result.postError = String(error);
    }
    const follow = (url, until) => new Promise((resolve) => {
        const source = new EventSource(url), seen = [];
        const done = (outcome) => { source.close(); resolve({outcome, seen}); };
        for (const name of ["ready", "job.created", "job.completed"]) {
            source.addEventListener(name, () => { seen.push(name); if (name === until) done("ok"); });
        }
        source.onerror = () => { if (source.readyState === EventSource.CLOSED) done("blocked"); };
    });
    result.all = await follow(api + "/generations/events", "ready");
    if (result.job) {
        result.one = await follow(api + "/generations/" + result.job.jobId + "/events", "job.completed");
    }
    return result;
})()"""


async def _blank_page(aiohttp_server: Any) -> Any:
    """A second origin on 127.0.0.1: a server of one empty page."""

    async def blank(request: web.Request) -> web.Response:
        html = '<!doctype html><link rel="icon" href="data:,"><title>another origin</title>'
        return web.Response(text=html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", blank)
    return await aiohttp_server(app)


@pytest.mark.browser
async def test_in_chromium_a_listed_origin_posts_and_streams_and_another_is_blocked(
    make_client: Any, aiohttp_server: Any
) -> None:
    listed, unlisted = await _blank_page(aiohttp_server), await _blank_page(aiohttp_server)
    client = await make_client(server={"cors_origins": [f"http://127.0.0.1:{listed.port}"]})
    api = json.dumps(f"http://{HOST}:{client.port}")
    async with Browser() as browser:
        page = await browser.open(f"http://127.0.0.1:{listed.port}/")
        result = await page.evaluate(CROSS_ORIGIN_SCRIPT % {"api": api})
        assert result["status"] == [201, 201], result
        assert result["location"] == f"http://{HOST}:{client.port}/generations/{result['job']['jobId']}"
        assert (result["applied"], result["replayed"]) == ("wait=10", "true")
        assert result["job"]["status"] == "completed"
        assert result["all"] == {"outcome": "ok", "seen": ["ready"]}
        assert result["one"]["outcome"] == "ok" and result["one"]["seen"][-1] == "job.completed"
        assert page.errors == []

        other = await browser.open(f"http://127.0.0.1:{unlisted.port}/")
        blocked = await other.evaluate(CROSS_ORIGIN_SCRIPT % {"api": api})
        assert "postError" in blocked and "status" not in blocked, blocked
        assert blocked["all"] == {"outcome": "blocked", "seen": []}
        refusals = [error for error in other.errors if "blocked by CORS policy" in error]
        assert any("/generations' from origin" in e and "preflight" in e for e in refusals), refusals
        assert any("/generations/events' from origin" in error for error in refusals), refusals
    # The refused preflight kept the POST from being sent at all: only the listed page's job exists.
    jobs = (await (await client.get("/generations")).json())["jobs"]
    assert [job["jobId"] for job in jobs] == [result["job"]["jobId"]]
    await wait_for_status(client, result["job"]["jobId"], {"completed"})


async def test_with_auth_on_preflights_need_no_key_and_refusals_carry_cors_headers(
    make_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .auth_keys import SECRET, auth_section, bearer

    monkeypatch.setenv("IMAGEGEN_SECRET", SECRET)
    client = await make_client(server={"cors_origins": [PAGE]}, auth=auth_section())
    granted = await client.options("/generations", headers=preflight(PAGE))
    assert granted.status == 200 and "authorization" in names(granted.headers["Access-Control-Allow-Headers"])
    refused = await client.post("/generations", json={"numImages": 1}, headers={"Origin": PAGE})
    assert refused.status == 401 and refused.headers["Access-Control-Allow-Origin"] == PAGE
    created = await client.post("/generations", json={"numImages": 1}, headers={"Origin": PAGE, **bearer("acme")})
    assert created.status == 202 and created.headers["Access-Control-Allow-Origin"] == PAGE
    assert "location" in names(created.headers["Access-Control-Expose-Headers"])
    token = (await (await client.post("/tokens", headers={"Origin": PAGE, **bearer("acme")})).json())["token"]
    async with client.get("/generations/events", params={"token": token}, headers={"Origin": PAGE}) as stream:
        assert stream.status == 200 and stream.headers["Access-Control-Allow-Origin"] == PAGE
