"""GET /healthz, /readyz and /metrics on both backends: ready normally, unready (naming the check)
when shutting down or when the database does not commit, and metrics that move as jobs run."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from .auth_keys import SECRET, auth_section, bearer
from .conftest import TestDatabase, create_job, wait_for_status
from .sse import SSEReader


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics body, by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    return samples(await response.text())


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape_once_counted(client: TestClient, name: str, expected: float, **labels: str) -> dict[Any, float]:
    """A scrape once `name` has reached `expected`. A worker counts its commit when the commit's
    answer reaches it, which on PostgreSQL can be just after the job reads as finished (from the
    database, or the feed, which reads the events table)."""

    async def poll() -> dict[Any, float]:
        while value(found := await scrape(client), name, **labels) != expected:
            await asyncio.sleep(0.02)  # polling interval, bounded by wait_for
        return found

    return await asyncio.wait_for(poll(), 10)


# --- health ----------------------------------------------------------------------------------


async def test_healthz_is_alive_and_readyz_ready_with_each_check_named(client: TestClient, database: TestDatabase) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "alive"}
    response = await client.get("/readyz")
    assert response.status == 200, await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert body == {
        "status": "ready",
        "checks": {
            "database": {"ok": True, "detail": "ok"},
            "workers": {"ok": True, "detail": "ok"},
            "shutdown": {"ok": True, "detail": "ok"},
        },
    }
    # The check is a real committed write: its row is in the database.
    (row,) = database.rows("SELECT value FROM meta WHERE key = 'health_checked_at'")
    assert row["value"] > 0
    for path in ("/healthz", "/readyz"):
        head = await client.head(path)
        assert head.status == 200
        assert await head.read() == b""


async def test_readyz_is_503_naming_shutdown_and_workers_once_shutdown_begins(client: TestClient) -> None:
    await client.app.shutdown()  # the on_shutdown handlers, as run_app runs them on SIGTERM
    response = await client.get("/readyz")
    assert response.status == 503
    body = await response.json()
    assert body["status"] == "unready"
    assert body["checks"]["shutdown"] == {"ok": False, "detail": "shutting down"}
    assert body["checks"]["workers"] == {"ok": False, "detail": "the worker pool is not running"}
    assert body["checks"]["database"]["ok"] is True
    assert (await client.get("/healthz")).status == 200  # still alive while it drains


@contextmanager
def database_stuck(database: TestDatabase) -> Iterator[None]:
    """Another connection holds the lock every write to `meta` needs, as a stuck database or a
    long migration would: writes wait, they do not fail."""
    if database.backend == "sqlite":
        conn = sqlite3.connect(database.data_dir / "imagegen.sqlite3", isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")  # SQLite's one write lock
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    import psycopg

    with psycopg.connect(database.url) as conn:  # a transaction, open until the block ends
        conn.execute("LOCK TABLE meta IN EXCLUSIVE MODE")  # blocks writes, not reads
        yield
        conn.rollback()


async def test_readyz_is_503_naming_the_database_when_it_does_not_commit_in_time(
    make_client: Any, database: TestDatabase
) -> None:
    client = await make_client(health={"timeout_s": 0.3})
    assert (await client.get("/readyz")).status == 200
    with database_stuck(database):
        started = asyncio.get_running_loop().time()
        response = await client.get("/readyz")
        elapsed = asyncio.get_running_loop().time() - started
        assert response.status == 503
        body = await response.json()
        assert body["checks"]["database"] == {
            "ok": False, "detail": "the database did not commit a write within 0.3 s"
        }
        assert body["checks"]["workers"]["ok"] and body["checks"]["shutdown"]["ok"]
        assert elapsed < 3, "a stuck database is a prompt 503, not a hang"
    # Once the lock is gone, the next check commits again.
    async def ready() -> None:
        while (await client.get("/readyz")).status != 200:
            await asyncio.sleep(0.05)  # polling interval, bounded by wait_for

    await asyncio.wait_for(ready(), 15)


async def test_health_and_metrics_need_no_key_with_auth_on(make_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_SECRET", SECRET)
    client = await make_client(auth=auth_section())
    assert (await client.get("/generations")).status == 401
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await client.get(path)).status == 200, path
    assert (await client.post("/generations", json={"numImages": 1}, headers=bearer("acme"))).status == 202


# --- metrics ---------------------------------------------------------------------------------


async def test_metrics_move_as_jobs_run(client: TestClient) -> None:
    before = await scrape(client)
    assert value(before, "imagegen_jobs_created_total") == 0
    assert value(before, "imagegen_queue_depth") == 0
    job_id = await create_job(client, numImages=2)
    # Follow the job's stream to its end: events delivered count too.
    async with client.get(f"/generations/{job_id}/events") as response:
        reader = SSEReader(response)
        while (event := await reader.next(timeout=20)) is not None and event.name != "job.completed":
            pass
    await wait_for_status(client, job_id, {"completed"})
    await client.get(f"/generations/{job_id}")
    await client.get("/generations/00000000-0000-7000-8000-000000000000")  # 404: same template
    await client.get("/no/such/path")

    after = await scrape_once_counted(client, "imagegen_jobs_finished_total", 1, status="completed")
    assert value(after, "imagegen_jobs_created_total") == 1
    assert value(after, "imagegen_jobs_finished_total", status="completed") == 1
    assert value(after, "imagegen_jobs", status="completed") == 1
    assert value(after, "imagegen_jobs", status="pending") == 0
    assert value(after, "imagegen_job_duration_seconds_count", status="completed") == 1
    assert value(after, "imagegen_image_duration_seconds_count") == 2
    assert value(after, "imagegen_sse_events_delivered_total") >= 3  # processing, 2 progress, completed
    assert value(after, "imagegen_db_commit_seconds_count") > 0
    post = {"route": "/generations", "method": "POST", "status": "202"}
    assert value(after, "imagegen_http_requests_total", **post) == 1
    job_route = "/generations/{jobId}"
    assert value(after, "imagegen_http_requests_total", route=job_route, method="GET", status="404") == 1
    assert value(after, "imagegen_http_requests_total", route="/{path}", method="GET", status="404") == 1
    assert value(after, "imagegen_http_request_duration_seconds_count", route="/generations", method="POST") == 1
    # No raw path is ever a label value: the label values are route templates only.
    routes = {dict(labels).get("route") for (name, labels) in after if name == "imagegen_http_requests_total"}
    assert job_id not in str(routes) and "/no/such/path" not in routes


async def test_metrics_gauges_come_from_the_database(make_client: Any) -> None:
    # One slow worker: the second job waits, and a cancel finishes it.
    client = await make_client(workers={"count": 1}, provider={"delay_s": 2.0})
    first = await create_job(client)
    await wait_for_status(client, first, {"processing"})
    second = await create_job(client)
    found = await scrape(client)
    assert value(found, "imagegen_queue_depth") == 1
    assert value(found, "imagegen_jobs", status="pending") == 1
    assert value(found, "imagegen_jobs", status="processing") == 1
    assert value(found, "imagegen_oldest_pending_age_seconds") >= 0
    assert (await client.post(f"/generations/{second}/cancel")).status == 200
    assert (await client.post(f"/generations/{first}/cancel")).status == 200
    found = await scrape(client)
    assert value(found, "imagegen_queue_depth") == 0
    assert value(found, "imagegen_jobs", status="canceled") == 2
    assert value(found, "imagegen_jobs_finished_total", status="canceled") == 2


async def test_provider_errors_and_retries_are_counted(make_client: Any) -> None:
    client = await make_client(provider={"fail_attempts": 1}, jobs={"retry_base_s": 0, "retry_max_s": 0})
    job_id = await create_job(client)
    await wait_for_status(client, job_id, {"completed"})
    found = await scrape_once_counted(client, "imagegen_jobs_finished_total", 1, status="completed")
    assert value(found, "imagegen_provider_errors_total", code="simulated_failure") == 1
    assert value(found, "imagegen_job_retries_total") == 1
    assert value(found, "imagegen_jobs_finished_total", status="completed") == 1


async def test_sse_subscribers_gauge(client: TestClient) -> None:
    async with client.get("/generations/events") as response:
        reader = SSEReader(response)
        assert (await reader.next()).name == "ready"
        assert value(await scrape(client), "imagegen_sse_subscribers") == 1


async def test_metrics_off_is_no_route(make_client: Any) -> None:
    client = await make_client(metrics={"enabled": False})
    assert (await client.get("/metrics")).status == 404
    job_id = await create_job(client)
    await wait_for_status(client, job_id, {"completed"})
    assert (await client.get("/readyz")).status == 200


async def test_two_apps_in_one_process_count_apart(make_client: Any, tmp_path: Any) -> None:
    first = await make_client()
    await create_job(first)
    assert value(await scrape(first), "imagegen_jobs_created_total") == 1
    # Its own registry: a second app (on PostgreSQL, on the same database) has counted nothing.
    second = await make_client(data_dir=tmp_path / "other")
    assert value(await scrape(second), "imagegen_jobs_created_total") == 0
    assert value(await scrape(first), "imagegen_jobs_created_total") == 1
