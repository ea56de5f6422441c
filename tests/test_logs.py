"""Log lines: one per request and per job transition, X-Request-ID, the two formats, redaction."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import signal
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from imagegen import logs

from .auth_keys import ACME_KEY, SECRET, auth_section, bearer
from .conftest import TestDatabase, wait_for_status
from .serverproc import ServerProcess
from .test_auth import finished

GENERATED_ID = re.compile(r"[0-9a-f]{32}")  # 24 random hex digits per process, then a counter


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """caplog with the request-id filter server.py puts on its handler."""
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(logs.RequestIdFilter())
    return caplog


def of(caplog: pytest.LogCaptureFixture, logger: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == logger]


async def wait_for_line(caplog: pytest.LogCaptureFixture, logger: str, count: int, timeout: float = 10) -> list[logging.LogRecord]:
    """The request log is written once the answer is finished, after the client has it."""
    async def enough() -> list[logging.LogRecord]:
        while len(of(caplog, logger)) < count:
            await asyncio.sleep(0.01)
        return of(caplog, logger)

    return await asyncio.wait_for(enough(), timeout)


async def create(client: TestClient, headers: dict[str, str] | None = None, **body: Any) -> tuple[str, str]:
    response = await client.post("/generations", json={"numImages": 1, **body}, headers=headers or {})
    assert response.status == 202, await response.text()
    return (await response.json())["jobId"], response.headers["X-Request-ID"]


async def test_a_request_line_names_the_route_template_status_duration_and_request_id(
    client: TestClient, lines: pytest.LogCaptureFixture
) -> None:
    job_id, _ = await create(client)
    lines.clear()
    response = await client.get(f"/generations/{job_id}?cursor=1&_=x")
    assert response.status == 200
    (line,) = await wait_for_line(lines, "imagegen.requests", 1)
    assert line.getMessage() == "request"
    assert (line.method, line.route, line.status) == ("GET", "/generations/{jobId}", 200)
    assert line.path == f"/generations/{job_id}?cursor=1&_=x"
    assert isinstance(line.duration_ms, float) and line.duration_ms >= 0
    assert line.request_id == response.headers["X-Request-ID"]
    assert GENERATED_ID.fullmatch(line.request_id)
    assert line.tenant is None  # auth off


@pytest.mark.parametrize("given, kept", [
    ("abc-123", True),
    ("x" * 128, True),
    ("!~#:/", True),
    ("x" * 129, False),
    ("has space", False),
    ("", False),
    ("caf\u00e9", False),
])
async def test_a_sane_x_request_id_is_kept_and_any_other_replaced(
    client: TestClient, given: str, kept: bool
) -> None:
    response = await client.get("/generations", headers={"X-Request-ID": given.encode().decode("latin-1")})
    assert response.status == 200
    if kept:
        assert response.headers["X-Request-ID"] == given
    else:
        assert GENERATED_ID.fullmatch(response.headers["X-Request-ID"])


async def test_every_answer_carries_the_request_id(make_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_SECRET", SECRET)
    client = await make_client(auth=auth_section())
    # The auth middleware's 401, before any handler.
    response = await client.get("/generations", headers={"X-Request-ID": "r-401"})
    assert (response.status, response.headers["X-Request-ID"]) == (401, "r-401")
    # The catch-all 404 and 405, a 422, the page, the documentation.
    for method, path, status in [("GET", "/nowhere", 404), ("PUT", "/generations", 405),
                                 ("GET", "/generations?limit=0", 422), ("GET", "/", 200), ("GET", "/openapi.json", 200)]:
        response = await client.request(method, path, headers={**bearer("acme"), "X-Request-ID": f"r-{status}"})
        assert (response.status, response.headers["X-Request-ID"]) == (status, f"r-{status}"), path
    # A stream: its headers go out before its handler returns.
    job_id, _ = await create(client, bearer("acme"))
    await finished(client, "acme", job_id)
    response = await client.get(f"/generations/{job_id}/events", headers={**bearer("acme"), "X-Request-ID": "r-sse"})
    assert response.headers["X-Request-ID"] == "r-sse"
    await response.read()


async def test_request_lines_carry_the_tenant_and_never_a_token_or_signature(
    make_client: Any, monkeypatch: pytest.MonkeyPatch, lines: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("IMAGEGEN_SECRET", SECRET)
    client = await make_client(auth=auth_section())
    job_id, _ = await create(client, bearer("acme"))
    job = await finished(client, "acme", job_id)
    token = (await (await client.post("/tokens", headers=bearer("acme"))).json())["token"]
    image = job["imageUrls"][0].split(str(client.make_url("")).rstrip("/"), 1)[1]
    lines.clear()
    assert (await client.get(image)).status == 200
    response = await client.get(f"/generations/{job_id}/events?token={token}")
    assert b"job.completed" in await response.read()
    assert (await client.get("/generations", headers={"Authorization": "Bearer wrong"})).status == 401
    image_line, stream_line, refused = await wait_for_line(lines, "imagegen.requests", 3)
    assert image_line.route == "/images/{jobId}/{index}.png"
    assert re.fullmatch(r"/images/[^?]+\?exp=\d+&sig=\*\*\*", image_line.path)
    assert image_line.tenant is None  # a signed URL names no tenant
    assert stream_line.path == f"/generations/{job_id}/events?token=***"
    assert (stream_line.route, stream_line.status, stream_line.tenant) == ("/generations/{jobId}/events", 200, "acme")
    assert (refused.status, refused.tenant) == (401, None)
    signature = re.search(r"sig=([^&]+)", image).group(1)  # type: ignore[union-attr]
    text = "\n".join(logs.TextFormatter().format(r) + logs.JsonFormatter().format(r) for r in lines.records)
    for secret in (token, signature, ACME_KEY, SECRET):
        assert secret not in text


def test_a_stream_the_client_leaves_gets_its_request_line(database: TestDatabase) -> None:
    # server.py, not the test client: the test server cancels a handler whose client left
    # (handler_cancellation), which aiohttp's own server does not do.
    import urllib.request

    server = ServerProcess(database.data_dir, env={**database.env, "IMAGEGEN_EVENTS__HEARTBEAT_S": "0.05"})
    server.start()
    try:
        request = urllib.request.Request(f"{server.url}/generations/events", headers={"X-Request-ID": "left"})
        with urllib.request.urlopen(request, timeout=10) as stream:
            assert stream.headers["X-Request-ID"] == "left"
            stream.readline()
        # Once the server notices (at the next heartbeat), the stream ends and is logged.
        deadline = time.monotonic() + 10
        while "request_id=left" not in server.log_text():
            assert time.monotonic() < deadline, server.log_text()
            time.sleep(0.05)
    finally:
        server.stop(signal.SIGTERM)
    (line,) = [line for line in server.log_text().splitlines() if "request_id=left" in line]
    assert "route=/generations/events " in line and " status=200 " in line


async def test_each_transition_has_a_line_and_the_create_has_its_request_id(
    make_client: Any, lines: pytest.LogCaptureFixture
) -> None:
    client = await make_client(provider={"fail_attempts": 1}, jobs={"retry_base_s": 0.01, "retry_max_s": 0.01})
    job_id, request_id = await create(client, {"X-Request-ID": "made-it"})
    await wait_for_status(client, job_id, {"completed"})
    steps = [(r.__dict__.get("from"), r.to, r.attempt, r.__dict__.get("error")) for r in of(lines, "imagegen.jobs") if r.job_id == job_id]
    assert steps == [
        (None, "pending", 0, None),
        ("pending", "processing", 1, None),
        ("processing", "pending", 1, "simulated_failure"),
        ("pending", "processing", 2, None),
        ("processing", "completed", 2, None),
    ]
    created = next(r for r in of(lines, "imagegen.jobs") if r.job_id == job_id)
    assert created.request_id == request_id == "made-it"
    # The workers' lines are made outside any request.
    assert all(r.request_id is None for r in of(lines, "imagegen.jobs") if r.to != "pending" or r.attempt)


async def test_cancel_and_delete_lines_say_where_the_job_came_from(
    make_client: Any, lines: pytest.LogCaptureFixture
) -> None:
    client = await make_client(provider={"delay_s": 30}, workers={"count": 1})
    running, _ = await create(client)
    await wait_for_status(client, running, {"processing"})
    waiting, _ = await create(client)
    for job_id in (waiting, running):
        assert (await client.post(f"/generations/{job_id}/cancel")).status == 200
    assert (await client.delete(f"/generations/{waiting}")).status == 204
    steps = [(r.job_id, r.__dict__.get("from"), r.to) for r in of(lines, "imagegen.jobs") if r.__dict__.get("from")]
    assert (waiting, "pending", "canceled") in steps
    assert (running, "processing", "canceled") in steps
    assert (waiting, "canceled", "deleted") in steps


def _record(**fields: Any) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "imagegen.requests", "msg": "request", "levelname": "INFO", **fields})
    return record


def test_text_lines_cannot_be_broken_or_forged_and_json_lines_carry_the_same_fields() -> None:
    record = _record(path='/a b"c\nINFO forged=1', status=404, tenant=None, request_id="r1")
    text = logs.TextFormatter().format(record)
    assert "\n" not in text
    assert text.endswith(r'request path="/a b\"c\nINFO forged=1" status=404 request_id=r1')
    parsed = json.loads(logs.JsonFormatter().format(record))
    assert {k: parsed[k] for k in ("logger", "level", "message", "path", "status", "request_id")} == {
        "logger": "imagegen.requests", "level": "INFO", "message": "request",
        "path": '/a b"c\nINFO forged=1', "status": 404, "request_id": "r1",
    }
    assert "tenant" not in parsed  # a field without a value is left out, in both formats
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", parsed["time"])


@pytest.mark.parametrize("query, shown", [
    ("token=abc", "token=***"),
    ("lastEventId=4&token=abc", "lastEventId=4&token=***"),
    ("exp=17&sig=abc", "exp=17&sig=***"),
    ("TOKEN=abc&Sig=x&api_key=k&%74oken=y", "TOKEN=***&Sig=***&api_key=***&%74oken=***"),
    ("token", "token"),
    ("tokens=1&limit=2", "tokens=1&limit=2"),
    ("", ""),
])
def test_secret_query_parameters_are_redacted(query: str, shown: str) -> None:
    assert logs.redacted_query(query) == shown


def test_configure_writes_every_line_in_the_format_asked_for() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("json", stream)
        for number in range(100):
            logging.getLogger("imagegen.test").info("line", extra={"number": number})
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    numbers = [json.loads(line)["number"] for line in stream.getvalue().splitlines()]
    assert numbers == list(range(100))


def _fields(line: str, log_format: str) -> dict[str, Any]:
    if log_format == "json":
        return json.loads(line)
    head, _, rest = line.partition(": ")
    message, _, tail = rest.partition(" ")
    found = {key: json.loads(value) if value.startswith('"') else value
             for key, value in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', tail)}
    return {**found, "message": message if message != "serving" else rest.split(" version=")[0]}


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_start_up_and_shutdown_lines(database: TestDatabase, log_format: str) -> None:
    server = ServerProcess(database.data_dir, env={
        **database.env, "IMAGEGEN_SERVER__LOG_FORMAT": log_format, "IMAGEGEN_PROVIDER__DELAY_S": "30",
        "IMAGEGEN_WORKERS__SHUTDOWN_GRACE_S": "0", "IMAGEGEN_WORKERS__COUNT": "2",
    })
    server.start()
    try:
        job_id = await asyncio.to_thread(_post_job, server.url)
        await asyncio.wait_for(_until_processing(server.url, job_id), 20)
    finally:
        server.stop(signal.SIGTERM)
    records = [_fields(line, log_format) for line in server.log_text().splitlines()]
    started = next(r for r in records if r["message"].startswith("serving on"))
    assert (started["backend"], str(started["workers"]), started["provider"]) == (database.backend, "2", "local")
    assert started["version"] == logs.version() and started["role"] == "all"
    if database.backend == "sqlite":
        assert str(started["recovered"]) == "0"
    requested = [r for r in records if r["message"] == "request"]
    assert requested and all(r["request_id"] for r in requested)
    stopped = records[-1]
    assert (stopped["message"], str(stopped["handed_back"]), stopped["jobs"]) == ("stopped", "1", job_id)
    requeued = [r for r in records if r.get("job_id") == job_id and r.get("to") == "pending" and r.get("from")]
    assert [r["from"] for r in requeued] == ["processing"]


def _post_job(url: str) -> str:
    import urllib.request

    request = urllib.request.Request(f"{url}/generations", data=b'{"numImages": 1}',
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["jobId"]


async def _until_processing(url: str, job_id: str) -> None:
    import urllib.request

    def status() -> str:
        with urllib.request.urlopen(f"{url}/generations/{job_id}", timeout=10) as response:
            return json.loads(response.read())["status"]

    while await asyncio.to_thread(status) != "processing":
        await asyncio.sleep(0.05)  # polling, bounded by the caller's wait_for
