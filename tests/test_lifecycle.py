"""Job control over a real socket: cancel, delete, queue positions, retries, timeouts, fencing."""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp.test_utils import TestClient

from imagegen.feed import Feed
from imagegen.jobs import timestamp_in, uuid7
from imagegen.models import now_text
from imagegen.store import NewJob, open_store
from imagegen.workers import backoff_s

from .conftest import TestDatabase, create_job, make_settings, wait_for_status

TERMINAL = {"completed", "failed", "canceled"}


def terminal_events(database: TestDatabase, job_id: str) -> list[str]:
    rows = database.rows(
        "SELECT name FROM events WHERE job_id = ? AND name IN ('job.completed', 'job.failed', 'job.canceled')",
        (job_id,),
    )
    return [row["name"] for row in rows]


async def test_a_pending_job_is_canceled_at_once_and_never_drawn(make_client, database: TestDatabase) -> None:
    client = await make_client(workers={"count": 1}, provider={"delay_s": 30})
    busy = await create_job(client)
    await wait_for_status(client, busy, {"processing"})
    waiting = await create_job(client)
    response = await client.post(f"/generations/{waiting}/cancel")
    assert response.status == 200
    job = await response.json()
    assert job["status"] == "canceled" and job["attempts"] == 0 and job["completedAt"]
    assert terminal_events(database, waiting) == ["job.canceled"]


async def test_a_processing_job_is_interrupted_within_a_second(make_client, database: TestDatabase) -> None:
    client = await make_client(workers={"count": 1}, provider={"delay_s": 30})
    job_id = await create_job(client, numImages=3)
    await wait_for_status(client, job_id, {"processing"})
    next_job = await create_job(client)
    started = time.monotonic()
    response = await client.post(f"/generations/{job_id}/cancel")
    assert response.status == 200 and (await response.json())["status"] == "canceled"
    # The only worker was stuck in a 30 s provider call; it is free again at once.
    await wait_for_status(client, next_job, {"processing"}, timeout=5)
    assert time.monotonic() - started < 1.0
    job = await (await client.get(f"/generations/{job_id}")).json()
    assert job["status"] == "canceled" and job["imageUrls"] == []
    assert terminal_events(database, job_id) == ["job.canceled"]


async def test_cancel_errors(client: TestClient) -> None:
    job_id = await create_job(client)
    await wait_for_status(client, job_id, {"completed"})
    finished = await client.post(f"/generations/{job_id}/cancel")
    assert finished.status == 409 and finished.content_type == "application/problem+json"
    assert "completed" in (await finished.json())["detail"]
    unknown = await client.post("/generations/00000000-0000-4000-8000-000000000000/cancel")
    assert unknown.status == 404
    malformed = await client.post("/generations/nope/cancel")
    assert malformed.status == 422


async def test_cancel_racing_completion_ends_in_exactly_one_terminal_state(make_client, database: TestDatabase) -> None:
    client = await make_client(workers={"count": 4}, provider={"delay_s": 0.01})
    ids = [await create_job(client, numImages=2) for _ in range(40)]

    async def cancel_soon(index: int, job_id: str) -> int:
        await asyncio.sleep(index * 0.003)  # spread the cancels across the jobs' lives
        return (await client.post(f"/generations/{job_id}/cancel")).status

    answers = await asyncio.gather(*(cancel_soon(i, job_id) for i, job_id in enumerate(ids)))
    for job_id, answer in zip(ids, answers, strict=True):
        job = await wait_for_status(client, job_id, TERMINAL)
        assert terminal_events(database, job_id) == [f"job.{job['status']}"]
        # 200: the cancel won; 409: the job had already completed.
        assert (answer, job["status"]) in {(200, "canceled"), (409, "completed")}, (answer, job["status"])
    assert {200, 409} & set(answers)


async def test_delete_removes_a_finished_job_and_its_images(client: TestClient, database: TestDatabase) -> None:
    job_id = await create_job(client, numImages=2)
    await wait_for_status(client, job_id, {"completed"})
    image_dir = database.data_dir / "images" / job_id
    assert len(list(image_dir.iterdir())) == 2
    response = await client.delete(f"/generations/{job_id}")
    assert response.status == 204
    assert (await client.get(f"/generations/{job_id}")).status == 404
    assert (await client.get(f"/images/{job_id}/0.png")).status == 404
    assert not image_dir.exists()
    assert database.rows("SELECT count(*) AS n FROM jobs")[0]["n"] == 0
    assert (await client.delete(f"/generations/{job_id}")).status == 404


async def test_delete_refuses_a_job_that_can_still_change(make_client, database: TestDatabase) -> None:
    client = await make_client(workers={"count": 1}, provider={"delay_s": 30})
    running = await create_job(client)
    await wait_for_status(client, running, {"processing"})
    waiting = await create_job(client)
    for job_id in (running, waiting):
        response = await client.delete(f"/generations/{job_id}")
        assert response.status == 409 and response.content_type == "application/problem+json"
    assert database.rows("SELECT count(*) AS n FROM jobs")[0]["n"] == 2


async def test_pending_jobs_report_their_queue_position(make_client) -> None:
    client = await make_client(workers={"count": 1}, provider={"delay_s": 30})
    running = await create_job(client)
    await wait_for_status(client, running, {"processing"})
    waiting = [await create_job(client) for _ in range(3)]
    positions = [(await (await client.get(f"/generations/{j}")).json())["queuePosition"] for j in waiting]
    assert positions == [1, 2, 3]
    assert (await (await client.get(f"/generations/{running}")).json())["queuePosition"] is None
    await client.post(f"/generations/{waiting[0]}/cancel")
    # Positions are kept from the feed, which on PostgreSQL trails a commit by milliseconds.
    expected = [(waiting[2], 2), (waiting[1], 1)]
    deadline = time.monotonic() + 2
    while True:
        listed = await (await client.get("/generations", params={"status": "pending"})).json()
        got = [(j["jobId"], j["queuePosition"]) for j in listed["jobs"]]
        if got == expected or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert got == expected


async def test_retryable_failures_are_retried_until_they_succeed(make_client, database: TestDatabase) -> None:
    client = await make_client(
        provider={"fail_attempts": 2}, jobs={"max_attempts": 3, "retry_base_s": 0.01, "retry_max_s": 0.05}
    )
    job_id = await create_job(client, numImages=2)
    job = await wait_for_status(client, job_id, TERMINAL)
    assert job["status"] == "completed" and job["attempts"] == 3 and job["error"] is None
    names = [r["name"] for r in database.rows("SELECT name FROM events WHERE job_id = ?", (job_id,))]
    assert names.count("job.retrying") == 2 and names.count("job.processing") == 3
    retrying = database.rows("SELECT job FROM events WHERE job_id = ? AND name = 'job.retrying'", (job_id,))
    assert [json.loads(r["job"])["error_code"] for r in retrying] == ["simulated_failure"] * 2


async def test_retries_give_up_after_max_attempts(make_client) -> None:
    client = await make_client(provider={"fail_attempts": 10}, jobs={"max_attempts": 3, "retry_base_s": 0.01})
    job = await wait_for_status(client, await create_job(client), TERMINAL)
    assert job["status"] == "failed" and job["attempts"] == 3
    assert job["error"]["code"] == "simulated_failure" and job["error"]["retryable"] is True
    assert "gave up after 3 attempts" in job["error"]["message"]


async def test_a_non_retryable_failure_fails_at_once(make_client, monkeypatch) -> None:
    from imagegen.providers import local

    # The provider forgets an animal the settings accepted: its refusal is not retryable.
    monkeypatch.setattr(local, "ANIMALS", tuple(animal for animal in local.ANIMALS if animal != "owl"))
    client = await make_client(jobs={"animals": ["owl"], "max_attempts": 5})
    job = await wait_for_status(client, await create_job(client), TERMINAL)
    assert job["status"] == "failed" and job["attempts"] == 1 and job["error"]["retryable"] is False


async def test_a_hung_provider_call_is_cut_off_and_counted_as_retryable(make_client) -> None:
    client = await make_client(
        provider={"delay_s": 60}, jobs={"timeout_s": 0.2, "max_attempts": 2, "retry_base_s": 0.01}
    )
    started = time.monotonic()
    job = await wait_for_status(client, await create_job(client), TERMINAL, timeout=10)
    assert time.monotonic() - started < 5
    assert job["status"] == "failed" and job["attempts"] == 2
    assert job["error"]["code"] == "provider_timeout" and job["error"]["retryable"] is True


def test_backoff_grows_exponentially_with_jitter_and_honours_retry_after() -> None:
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (8, 60.0)]:
        delays = [backoff_s(attempt, 1.0, 60.0, None) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 100  # jittered
    assert backoff_s(1, 1.0, 60.0, retry_after=30.0) == 30.0


async def test_a_stale_attempt_cannot_overwrite_a_newer_one(database: TestDatabase) -> None:
    db = await open_store(make_settings(database.data_dir, storage=database.storage), Feed())
    try:
        job_id = (await db.create(NewJob(uuid7(), 2, "cat", None, now_text()), None, None)).job_id
        first = (await db.claim(job_id, "node-a", 30)).job
        assert first.attempts == 1
        await db.release_all("node-a")  # e.g. the first worker was thought dead
        second = (await db.claim(job_id, "node-b", 30)).job
        assert second.attempts == 2
        # The first attempt's late results are all refused.
        assert await db.add_image(first, "images/x/0.png", "node-a") is None
        assert await db.complete(first, "node-a") is None
        assert await db.fail(first, "late", "late failure", False, "node-a") is None
        assert await db.retry(first, "late", "late failure", timestamp_in(0), "node-a") is None
        current = await db.add_image(second, "images/x/0.png", "node-b")
        assert current is not None and current.job.images == ("images/x/0.png",)
    finally:
        await db.close()
    (row,) = database.rows("SELECT status, attempts, images, error_code FROM jobs")
    assert (row["status"], row["attempts"], row["error_code"]) == ("processing", 2, None)


async def test_a_deleted_jobs_idempotency_key_can_create_again(client: TestClient, database: TestDatabase) -> None:
    headers = {"Idempotency-Key": "delete-me"}
    first = (await (await client.post("/generations", json={"numImages": 1}, headers=headers)).json())["jobId"]
    await wait_for_status(client, first, {"completed"})
    assert (await client.delete(f"/generations/{first}")).status == 204
    again = await client.post("/generations", json={"numImages": 1}, headers=headers)
    assert again.status == 202 and "Idempotent-Replayed" not in again.headers
    assert (await again.json())["jobId"] != first


def test_an_absurd_retry_after_is_capped() -> None:
    from imagegen.workers import RETRY_AFTER_MAX_S

    assert backoff_s(1, 1.0, 60.0, retry_after=3e11) == RETRY_AFTER_MAX_S
    assert backoff_s(500, 1.0, 60.0, None) <= 60.0  # no overflow for a huge attempt count
