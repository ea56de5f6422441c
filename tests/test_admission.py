"""POST /generations under real conditions: idempotency keys, backpressure, size limits, Prefer: wait."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp.test_utils import TestClient


from .conftest import TestDatabase, create_job, prune, wait_for_status


def count_jobs(database: TestDatabase) -> int:
    return database.rows("SELECT count(*) AS n FROM jobs")[0]["n"]


async def test_the_same_key_and_body_return_the_same_job(client: TestClient, database: TestDatabase) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = await client.post("/generations", json={"numImages": 2, "animal": "fox"}, headers=headers)
    again = await client.post("/generations", json={"numImages": 2, "animal": "fox"}, headers=headers)
    assert first.status == again.status == 202
    assert (await first.json())["jobId"] == (await again.json())["jobId"]
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert first.headers["Location"] == again.headers["Location"]
    assert count_jobs(database) == 1


async def test_the_same_key_with_another_body_is_422(client: TestClient, database: TestDatabase) -> None:
    headers = {"Idempotency-Key": "order-43"}
    assert (await client.post("/generations", json={"numImages": 2}, headers=headers)).status == 202
    other = await client.post("/generations", json={"numImages": 3}, headers=headers)
    assert other.status == 422 and other.content_type == "application/problem+json"
    assert (await other.json())["invalidParams"][0]["name"] == "Idempotency-Key"
    assert count_jobs(database) == 1


async def test_concurrent_requests_with_one_key_create_exactly_one_job(client: TestClient, database: TestDatabase) -> None:
    headers = {"Idempotency-Key": "burst"}
    responses = await asyncio.gather(
        *(client.post("/generations", json={"numImages": 1}, headers=headers) for _ in range(25))
    )
    ids = {(await r.json())["jobId"] for r in responses}
    assert [r.status for r in responses] == [202] * 25 and len(ids) == 1
    assert count_jobs(database) == 1


@pytest.mark.parametrize("key", ["", "a" * 256, "has space", "naïve"])
async def test_a_malformed_key_is_422(client: TestClient, database: TestDatabase, key: str) -> None:
    response = await client.post("/generations", json={"numImages": 1}, headers={"Idempotency-Key": key})
    assert response.status == 422
    assert count_jobs(database) == 0


async def test_keys_are_kept_a_day_then_pruned(client: TestClient, database: TestDatabase) -> None:
    await client.post("/generations", json={"numImages": 1}, headers={"Idempotency-Key": "k"})
    # A pass 23h59m from now prunes keys older than a day then, i.e. older than 60 s now: it keeps this one.
    await prune(client, keys_older_than_s=60)
    assert len(database.rows("SELECT key FROM idempotency_keys")) == 1
    # A pass 24h01m from now prunes keys made before 60 s from now: this one goes. On PostgreSQL
    # a pass finding the background one at work (its first runs at start-up) leaves it to that
    # one, so the test passes again until a pass of its own has run.
    async def pruned() -> None:
        while database.rows("SELECT key FROM idempotency_keys"):
            await prune(client, keys_older_than_s=-60)
            await asyncio.sleep(0.05)  # polling interval, bounded by wait_for

    await asyncio.wait_for(pruned(), 10)


async def test_a_full_queue_answers_429_and_writes_nothing(make_client, database: TestDatabase) -> None:
    client = await make_client(workers={"count": 1, "max_pending": 3}, provider={"delay_s": 30})
    running = await create_job(client)
    await wait_for_status(client, running, {"processing"})
    for _ in range(3):
        await create_job(client)
    refused = await client.post("/generations", json={"numImages": 1})
    assert refused.status == 429 and refused.content_type == "application/problem+json"
    assert int(refused.headers["Retry-After"]) > 0
    assert "waiting" in (await refused.json())["detail"]
    assert count_jobs(database) == 4
    # Concurrent submissions cannot squeeze past the limit together either.
    burst = await asyncio.gather(*(client.post("/generations", json={"numImages": 1}) for _ in range(10)))
    assert {r.status for r in burst} == {429} and count_jobs(database) == 4


async def test_bodies_over_the_limit_are_413(client: TestClient, database: TestDatabase) -> None:
    body = b'{"numImages": 1, "prompt": "' + b"x" * 70_000 + b'"}'
    response = await client.post("/generations", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 413 and response.content_type == "application/problem+json"
    assert count_jobs(database) == 0


async def test_prefer_wait_answers_201_with_the_finished_job(client: TestClient) -> None:
    response = await client.post("/generations", json={"numImages": 2}, headers={"Prefer": "wait=10"})
    assert response.status == 201
    assert response.headers["Preference-Applied"] == "wait=10"
    job = await response.json()
    assert job["status"] == "completed" and len(job["imageUrls"]) == 2
    assert response.headers["Location"].endswith(job["jobId"])


async def test_prefer_wait_answers_202_when_time_runs_out(make_client) -> None:
    client = await make_client(provider={"delay_s": 30}, jobs={"prefer_wait_max_s": 0.5})
    started = time.monotonic()
    response = await client.post("/generations", json={"numImages": 1}, headers={"Prefer": "respond-async, wait=100"})
    took = time.monotonic() - started
    assert response.status == 202 and 0.4 < took < 5
    assert response.headers["Preference-Applied"] == "wait=0.5"  # capped by configuration
    assert (await response.json())["status"] in {"pending", "processing"}


async def test_unknown_or_malformed_preferences_are_ignored(client: TestClient) -> None:
    response = await client.post("/generations", json={"numImages": 1}, headers={"Prefer": "wait=soon, handling=lenient"})
    assert response.status == 202 and "Preference-Applied" not in response.headers


async def test_an_absurd_wait_is_ignored_not_a_500(client: TestClient) -> None:
    response = await client.post("/generations", json={"numImages": 1}, headers={"Prefer": "wait=" + "9" * 5000})
    assert response.status == 202 and "Preference-Applied" not in response.headers
