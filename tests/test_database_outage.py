"""PostgreSQL goes away (a crash, a restart, a WAL disk that filled: PostgreSQL then PANICs and
stops) while jobs run, and comes back. Meanwhile the API answers 503 problem+json with
Retry-After within seconds, never 500, and /readyz names the database; afterwards every job
completes, the one being drawn included, with no restart of the service."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from . import pgserver
from .conftest import TestDatabase, wait_for_status


@pytest.fixture
def backend() -> str:
    return "postgres"


@pytest.fixture
def server() -> Iterator[pgserver.PrivatePostgres]:
    """A server of this test's own: it is stopped and started again, as the suite's must not be."""
    # Commits reach the WAL before they are answered (the suite's fast settings skip that), so
    # an immediate stop loses none: the OS keeps what was written, fsync or not.
    with pgserver.PrivatePostgres(settings={"synchronous_commit": "on"}) as private:
        yield private


@pytest.fixture
def database(server: pgserver.PrivatePostgres, tmp_path: Path) -> TestDatabase:
    return TestDatabase("postgres", tmp_path / "data", server.create_database("outage"))


async def until(probe: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.2)


async def test_an_outage_answers_503_and_every_job_completes_once_the_database_is_back(
    make_client: Any, server: pgserver.PrivatePostgres, database: TestDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client(provider={"delay_s": 1.5}, workers={"count": 1},
                               jobs={"retry_base_s": 0.2, "retry_max_s": 0.5})
    done = await (await client.post("/generations", json={"numImages": 1}, headers={"Prefer": "wait=20"})).json()
    assert done["status"] == "completed"
    drawing = (await (await client.post("/generations", json={"numImages": 3})).json())["jobId"]
    await wait_for_status(client, drawing, {"processing"})
    waiting = (await (await client.post("/generations", json={"numImages": 1})).json())["jobId"]

    before = await (await client.get(f"/generations/{drawing}")).json()
    assert before["status"] == "processing" and len(before["imageUrls"]) < 3, before  # still drawing at the halt
    server.halt()
    # Each answer comes within the pool's wait (5 s) plus slack, as a 503 a client can act on.
    for method, path, body in [("GET", f"/generations/{done['jobId']}", None),
                               ("POST", "/generations", {"numImages": 1}),
                               ("DELETE", f"/generations/{done['jobId']}", None)]:
        started = time.monotonic()
        response = await client.request(method, path, json=body)
        assert response.status == 503, (method, path, response.status, await response.text())
        assert response.content_type == "application/problem+json"
        assert "database cannot be reached" in (await response.json())["detail"]
        assert int(response.headers["Retry-After"]) > 0
        assert time.monotonic() - started < 10
    ready = await client.get("/readyz")
    assert ready.status == 503 and (await ready.json())["checks"]["database"]["ok"] is False
    # The drawing job draws on while the database is away, and cannot record: its write waits
    # for a connection as long as the pool waits (5 s; a shorter outage costs it nothing), then
    # fails, and the worker says it will record the outcome once it can.
    async def worker_waits() -> bool:
        return any("recording its outcome again" in r.getMessage() for r in caplog.records)

    await until(worker_waits)

    server.resume()

    async def answering() -> bool:
        return (await client.get(f"/generations/{done['jobId']}")).status == 200

    await until(answering)
    # The job drawn across the outage is recorded once the database is back (as a retry, then
    # completed), the one that waited is drawn, and a new one goes through.
    for job_id in (drawing, waiting):
        assert (await wait_for_status(client, job_id, {"completed", "failed"}, timeout=60))["status"] == "completed"
    after = await client.post("/generations", json={"numImages": 1}, headers={"Prefer": "wait=20"})
    assert after.status == 201 and (await after.json())["status"] == "completed"
    assert (await client.get("/readyz")).status == 200
    # The outcome the outage kept the worker from recording was recorded as a retry.
    codes = [row["code"] for row in database.rows(
        "SELECT job::json->>'error_code' AS code FROM events WHERE job_id = ? AND name = 'job.retrying'", (drawing,))]
    assert codes == ["database_unavailable"], codes
