"""The worker pool: concurrency, provider failures, progress as images land."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest
from aiohttp.test_utils import TestClient

from imagegen.providers import local

from .conftest import TestDatabase, create_job, wait_for_status


async def test_many_jobs_all_complete_with_a_small_pool(make_client, database: TestDatabase) -> None:
    client = await make_client(workers={"count": 2})
    ids = [await create_job(client, numImages=2) for _ in range(12)]
    for job_id in ids:  # the real signal: each job's final status, polled under a time limit
        await wait_for_status(client, job_id, {"completed", "failed", "canceled"})
    rows = database.rows("SELECT status, images FROM jobs")
    assert [(r["status"], len(json.loads(r["images"]))) for r in rows] == [("completed", 2)] * 12
    # Exactly one completion event per job.
    events = database.rows("SELECT job_id FROM events WHERE name = 'job.completed'")
    assert sorted(e["job_id"] for e in events) == sorted(ids)


async def test_provider_error_fails_the_job_and_the_worker_goes_on(make_client, monkeypatch) -> None:
    # The settings refuse animals the local provider cannot draw, so the provider is made to
    # forget one of its animals after they were checked: its own refusal, per job, is what is tested.
    monkeypatch.setattr(local, "ANIMALS", tuple(animal for animal in local.ANIMALS if animal != "owl"))
    client = await make_client(workers={"count": 1}, jobs={"animals": ["cat", "owl"]})
    bad = await create_job(client, animal="owl")
    good = await create_job(client, animal="cat")
    failed = await wait_for_status(client, bad, {"failed", "completed"})
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "unknown_animal" and failed["error"]["retryable"] is False
    assert "owl" in failed["error"]["message"]
    assert failed["imageUrls"] == [] and failed["completedAt"]
    assert (await wait_for_status(client, good, {"failed", "completed"}))["status"] == "completed"


async def test_progress_and_urls_fill_in_as_images_are_stored(make_client, database: TestDatabase) -> None:
    client = await make_client(provider={"delay_s": 0.05})
    job_id = await create_job(client, numImages=3)
    await wait_for_status(client, job_id, {"completed"})
    snapshots = database.rows("SELECT name, job FROM events WHERE job_id = ? ORDER BY seq", (job_id,))
    assert [s["name"] for s in snapshots] == [
        "job.created", "job.processing", "job.progress", "job.progress", "job.progress", "job.completed",
    ]
    # A snapshot's "images" is the row's images column: text holding a JSON array.
    assert [len(json.loads(json.loads(s["job"])["images"])) for s in snapshots] == [0, 0, 1, 2, 3, 3]


async def test_the_database_refuses_illegal_transitions(client: TestClient, database: TestDatabase) -> None:
    job_id = await create_job(client)
    await wait_for_status(client, job_id, {"completed"})
    if database.backend == "sqlite":
        conn = sqlite3.connect(database.data_dir / "imagegen.sqlite3")
        with pytest.raises(sqlite3.IntegrityError, match="illegal job status transition"):
            conn.execute("UPDATE jobs SET status = 'pending' WHERE id = ?", (job_id,))
        conn.close()
    else:
        import psycopg

        with psycopg.connect(database.url, autocommit=True) as conn:
            with pytest.raises(psycopg.errors.RaiseException, match="illegal job status transition"):
                conn.execute("UPDATE jobs SET status = 'pending' WHERE id = %s", (job_id,))
    (row,) = database.rows("SELECT status FROM jobs WHERE id = ?", (job_id,))
    assert row["status"] == "completed"


async def test_workers_outlive_a_failed_claim(make_client, database: TestDatabase, monkeypatch) -> None:
    # The database fails a claim (a lost connection, a restart, a full disk): the worker asks
    # again a moment later instead of ending, and the job it was claiming is still drawn (on
    # SQLite its id had already left the in-memory queue: it must go back, not wait for a restart).
    from imagegen.store import STORE

    client = await make_client(workers={"count": 1})
    store = client.app[STORE]
    method = "claim_next" if database.backend == "postgres" else "claim"
    real_claim = getattr(type(store), method)
    failures = []

    async def failing_once(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not failures:
            failures.append(args)
            raise OSError("the database connection was lost")
        return await real_claim(self, *args, **kwargs)

    monkeypatch.setattr(type(store), method, failing_once)
    first = await create_job(client)
    job = await wait_for_status(client, first, {"completed"})
    assert failures and job["status"] == "completed"
    second = await create_job(client)
    assert (await wait_for_status(client, second, {"completed"}))["status"] == "completed"


async def test_a_job_put_back_after_a_failed_claim_is_next_in_its_owners_line() -> None:
    from imagegen.dispatch import TenantQueue

    queue = TenantQueue()
    for item in [("acme", "a1"), ("acme", "a2"), ("globex", "g1")]:
        queue.put_nowait(item)
    taken = await queue.get()
    assert taken == ("acme", "a1")
    queue.task_done()
    queue.put_back(taken)  # the claim failed: a1 goes back, ahead of a2
    assert queue.qsize() == 3
    order = [queue.get_nowait() for _ in range(3)]
    # globex had its turn due after acme's first take; a1 is still acme's oldest.
    assert order == [("globex", "g1"), ("acme", "a1"), ("acme", "a2")]
    for _ in order:
        queue.task_done()
    await asyncio.wait_for(queue.join(), 1)  # the bookkeeping balances
