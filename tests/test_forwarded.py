"""Behind a proxy ([server] trusted_proxies): Forwarded and X-Forwarded-* are believed from a
trusted proxy's address only, and a client's own Host never reaches another client."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from imagegen.api.forwarded import forwarded_middleware, parse_address

from .conftest import create_job, wait_for_status
from .sse import SSEReader

LOCAL = (ipaddress.ip_network("127.0.0.1"),)


async def _facts(request: web.Request) -> web.Response:
    return web.json_response({"scheme": request.scheme, "host": request.host, "remote": request.remote})


@pytest.fixture
def echo(aiohttp_client: Any):
    """A server that answers each request's scheme, host and remote, as trusting `trusted` sets them."""

    async def start(*trusted: str) -> TestClient:
        app = web.Application(middlewares=[forwarded_middleware(tuple(map(ipaddress.ip_network, trusted)))])
        app.router.add_get("/", _facts)
        return await aiohttp_client(app)

    return start


async def facts(client: TestClient, headers: dict[str, str]) -> dict[str, str]:
    response = await client.get("/", headers=headers)
    assert response.status == 200
    return await response.json()


# What a client of the proxy asked for, as the proxy forwards it; the test client connects from 127.0.0.1.
PUBLIC = {"scheme": "https", "host": "img.example.com", "remote": "203.0.113.7"}
X_FORWARDED = {
    "X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "img.example.com"
}
FORWARDED = {"Forwarded": 'for=203.0.113.7;proto=https;host="img.example.com"'}


@pytest.mark.parametrize("headers", [X_FORWARDED, FORWARDED], ids=["x-forwarded", "forwarded"])
async def test_a_trusted_proxy_says_what_the_client_asked_for(echo: Any, headers: dict[str, str]) -> None:
    client = await echo("127.0.0.1")
    assert await facts(client, headers) == PUBLIC


@pytest.mark.parametrize("trusted", [(), ("10.0.0.0/8", "::1")], ids=["nobody", "other-addresses"])
@pytest.mark.parametrize("headers", [X_FORWARDED, FORWARDED], ids=["x-forwarded", "forwarded"])
async def test_from_anyone_else_the_headers_are_ignored(
    echo: Any, trusted: tuple[str, ...], headers: dict[str, str]
) -> None:
    client = await echo(*trusted)
    own = {"scheme": "http", "host": f"127.0.0.1:{client.port}", "remote": "127.0.0.1"}
    assert await facts(client, headers) == own
    assert await facts(client, {}) == own  # and a request without them is served as it is: no 400


async def test_a_chain_of_trusted_proxies_is_followed_to_the_client(echo: Any) -> None:
    client = await echo("127.0.0.1", "10.0.0.0/8")
    # The client wrote the leftmost entries itself; the outer proxy (10.1.2.3) appended what it saw.
    chain = {
        "X-Forwarded-For": "6.6.6.6, 203.0.113.7, 10.1.2.3",
        "X-Forwarded-Proto": "http, https, http",
        "X-Forwarded-Host": "evil.example, img.example.com, inner.internal",
    }
    assert await facts(client, chain) == PUBLIC
    forwarded = {
        "Forwarded": "for=6.6.6.6;host=evil.example, "
        "for=203.0.113.7;proto=https;host=img.example.com, for=10.1.2.3"
    }
    assert await facts(client, forwarded) == PUBLIC
    # Proxies that set -Proto and -Host once (the outermost one's view) while each appends to -For.
    once = {**X_FORWARDED, "X-Forwarded-For": "203.0.113.7, 10.1.2.3"}
    assert await facts(client, once) == PUBLIC


async def test_what_a_client_prepends_is_not_believed(echo: Any) -> None:
    client = await echo("127.0.0.1")
    spoofed = {
        "X-Forwarded-For": "10.9.9.9, 203.0.113.7",
        "X-Forwarded-Proto": "http, https",
        "X-Forwarded-Host": "evil.example, img.example.com",
    }
    assert await facts(client, spoofed) == PUBLIC


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Forwarded-Proto": "javascript", "X-Forwarded-Host": "img.example.com/evil"},
        {"X-Forwarded-Proto": "ftp", "X-Forwarded-Host": "user@img.example.com"},
        {"X-Forwarded-Host": "img.example.com:99999"},
        {"Forwarded": "for=unknown;host=\"a b\""},
    ],
)
async def test_values_that_are_no_scheme_or_host_are_not_believed_even_from_a_proxy(
    echo: Any, headers: dict[str, str]
) -> None:
    client = await echo("127.0.0.1")
    own = {"scheme": "http", "host": f"127.0.0.1:{client.port}", "remote": "127.0.0.1"}
    assert await facts(client, headers) == own


async def test_an_ipv6_proxy_is_trusted_by_its_address() -> None:
    app = web.Application(middlewares=[forwarded_middleware((ipaddress.ip_network("::1"),))])
    app.router.add_get("/", _facts)
    async with TestClient(TestServer(app, host="::1")) as client:
        assert await facts(client, X_FORWARDED) == PUBLIC
        assert (await facts(client, {}))["remote"] == "::1"


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("192.0.2.1:4711", "192.0.2.1"),
        ("[2001:db8::1]:4711", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),  # a dual-stack socket's IPv4 peer
        ("unknown", None),
        ("_hidden", None),
        ("", None),
    ],
)
def test_addresses_are_read_in_every_form_proxies_write(text: str, address: str | None) -> None:
    parsed = parse_address(text)
    assert (str(parsed) if parsed is not None else None) == address


async def test_the_service_builds_its_urls_from_what_the_proxy_forwards(make_client) -> None:
    trusting = await make_client(server={"trusted_proxies": ["127.0.0.1"]})
    response = await trusting.post("/generations", json={"numImages": 1}, headers=X_FORWARDED)
    job_id = (await response.json())["jobId"]
    assert response.headers["Location"] == f"https://img.example.com/generations/{job_id}"
    await wait_for_status(trusting, job_id, {"completed"})
    job = await (await trusting.get(f"/generations/{job_id}", headers=FORWARDED)).json()
    assert job["imageUrls"] == [f"https://img.example.com/images/{job_id}/0.png"]
    # A request from the same address with no such headers is its own.
    plain = await (await trusting.get(f"/generations/{job_id}")).json()
    assert plain["imageUrls"] == [f"http://127.0.0.1:{trusting.port}/images/{job_id}/0.png"]


# --- one client's Host is that client's alone ----------------------------------------------------

ODD = "odd.example:1"


async def test_one_clients_host_never_shows_in_another_clients_answers(make_client) -> None:
    """Without public_url and without a trusted proxy, the Host header makes each client's URLs:
    what one client sent must not be stored, cached or streamed to another."""
    client = await make_client(provider={"delay_s": 0.2})
    odd = {"Host": ODD}
    # The other client follows every job, and the odd client's job, while the odd client works.
    everything = await client.get("/generations/events")
    seen: list[bytes] = []

    async def read_all() -> None:
        reader = SSEReader(everything)
        while (event := await reader.next(timeout=20)) is not None:
            seen.append(event.data.encode())
            if event.name == "job.completed":
                return

    reading = asyncio.create_task(read_all())
    created = await client.post(
        "/generations", json={"numImages": 2, "animal": "fox"}, headers={**odd, "Idempotency-Key": "odd-1"}
    )
    assert created.status == 202 and created.headers["Location"].startswith(f"http://{ODD}/")  # its own URLs
    job_id = (await created.json())["jobId"]
    one = await client.get(f"/generations/{job_id}/events")
    # The odd client polls and lists throughout, so every rendering it causes is made first.
    while (await (await client.get(f"/generations/{job_id}", headers=odd)).json())["status"] != "completed":
        await (await client.get("/generations", headers=odd)).read()
        await asyncio.sleep(0.02)  # polling interval, bounded by the stream's end below
    odd_view = await (await client.get(f"/generations/{job_id}", headers=odd)).json()
    assert odd_view["imageUrls"][0].startswith(f"http://{ODD}/images/")
    await asyncio.wait_for(reading, 20)
    everything.close()
    others = [b"".join(seen), await one.read()]
    for path in (f"/generations/{job_id}", "/generations", f"/generations/{job_id}/events"):
        response = await client.get(path)
        others.append(await response.read())
        others.append(str(dict(response.headers)).encode())
    # The same Idempotency-Key from the other client: the odd client's job, in the other's URLs.
    body, key = {"numImages": 2, "animal": "fox"}, {"Idempotency-Key": "odd-1"}
    again = await client.post("/generations", json=body, headers=key)
    assert again.headers["Idempotent-Replayed"] == "true"
    others += [await again.read(), again.headers["Location"].encode()]
    own = f"127.0.0.1:{client.port}".encode()
    assert all(ODD.encode() not in answer and b"odd.example" not in answer for answer in others)
    assert sum(own in answer for answer in others) >= 5  # they do name URLs: the other client's own


async def test_a_job_created_through_one_host_shows_each_reader_its_own(make_client) -> None:
    client = await make_client()
    job_id = await create_job(client)  # plain Host
    await wait_for_status(client, job_id, {"completed"})
    for host in ("a.example", "b.example:8080", "a.example"):
        job = await (await client.get(f"/generations/{job_id}", headers={"Host": host})).json()
        assert job["imageUrls"] == [f"http://{host}/images/{job_id}/0.png"]
