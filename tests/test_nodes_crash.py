"""The multi-node crash test: 1,000 jobs submitted to three nodes on one PostgreSQL database while
random nodes are killed with SIGKILL ten times (and restarted).

Run alone with `python3 tasks.py test -m crash -s tests/test_nodes_crash.py` (it prints its counts).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import aiohttp
import pytest

from .nodes import Cluster
from .serverproc import ServerProcess

JOBS = 1000
KILLS = 10
SUBMITTERS = 16

pytestmark = pytest.mark.crash


@pytest.fixture
def backend() -> str:
    return "postgres"


@pytest.mark.timeout(240)
async def test_three_nodes_killed_ten_times_lose_no_job_and_draw_none_twice(cluster: Cluster) -> None:
    rng = random.Random(20261201)
    env = {
        "IMAGEGEN_WORKERS__LEASE_S": "2",
        "IMAGEGEN_WORKERS__COUNT": "8",
        "IMAGEGEN_WORKERS__MAX_PENDING": str(JOBS),
        # Above the number of kills: no job can be failed as a poison job, so every job must
        # end completed.
        "IMAGEGEN_JOBS__MAX_RECOVERIES": str(KILLS + 1),
    }
    nodes = cluster.start_nodes(3, env)
    # Each job has its own idempotency key: a POST that may or may not have landed before a
    # kill is sent again, with the same key, to some node, and must not create a second job.
    bodies = {f"nodes-crash-{n}": {"numImages": rng.randint(1, 2)} for n in range(JOBS)}
    queue = list(bodies.items())
    retried = 0
    answers: dict[str, str] = {}

    async def submitter(client: aiohttp.ClientSession, seed: int) -> None:
        nonlocal retried
        pick = random.Random(seed)
        while queue:
            key, body = queue.pop()
            while True:
                node = pick.choice(nodes)
                try:
                    async with client.post(
                        f"{node.url}/generations", json=body, headers={"Idempotency-Key": key}
                    ) as response:
                        assert response.status == 202, await response.text()
                        answers[key] = (await response.json())["jobId"]
                        break
                except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError):
                    retried += 1  # that node is down or was killed mid-request: send it again
                    await asyncio.sleep(0.02)  # retry pacing, not a synchronisation

    async def killer() -> None:
        started = time.monotonic()
        for at in sorted(rng.uniform(0.3, 12.0) for _ in range(KILLS)):
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))  # the kill schedule
            victim: ServerProcess = rng.choice(nodes)
            await asyncio.to_thread(victim.kill9)
            await asyncio.to_thread(victim.start)

    began = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        await asyncio.gather(killer(), *(submitter(client, n) for n in range(SUBMITTERS)))
    submitted_s = time.monotonic() - began

    async def settled() -> bool:
        rows = await cluster.rows("SELECT count(*) AS n FROM jobs WHERE status IN ('pending', 'processing')")
        return rows[0]["n"] == 0

    deadline = time.monotonic() + 120
    while not await settled():
        assert time.monotonic() < deadline, "jobs still pending or processing two minutes after the last kill"
        await asyncio.sleep(0.2)  # polling interval, bounded by the deadline
    total_s = time.monotonic() - began

    statuses = Counter(row["status"] for row in await cluster.rows("SELECT status FROM jobs"))
    keys = await cluster.rows(
        "SELECT k.key, k.job_id, j.num_images FROM idempotency_keys k JOIN jobs j ON j.id = k.job_id"
    )
    terminal = await cluster.rows(
        "SELECT job_id, count(*) AS n FROM events"
        " WHERE name IN ('job.completed', 'job.failed', 'job.canceled') GROUP BY job_id"
    )
    created = await cluster.rows(
        "SELECT count(*) AS n, count(DISTINCT job_id) AS jobs FROM events WHERE name = 'job.created'"
    )
    requeued = await cluster.rows("SELECT count(*) AS n FROM events WHERE name = 'job.requeued'")
    attempts = Counter(row["attempts"] for row in await cluster.rows("SELECT attempts FROM jobs"))
    incomplete = await cluster.rows(
        "SELECT id FROM jobs WHERE status = 'completed' AND json_array_length(images::json) <> num_images"
    )
    print(
        f"\nmulti-node crash test: {JOBS} jobs submitted in {submitted_s:.1f}s ({retried} POSTs sent again), "
        f"{KILLS} kill -9s, {requeued[0]['n']} jobs rescued; all ended after {total_s:.1f}s; "
        f"statuses {dict(statuses)}, attempts {dict(sorted(attempts.items()))}"
    )
    assert sum(statuses.values()) == JOBS, "every submitted job exists exactly once"
    assert created == [{"n": JOBS, "jobs": JOBS}]
    assert len(keys) == JOBS and {row["key"]: row["job_id"] for row in keys} == answers
    assert all(row["num_images"] == bodies[row["key"]]["numImages"] for row in keys)
    assert statuses == {"completed": JOBS}, statuses
    assert len(terminal) == JOBS and {row["n"] for row in terminal} == {1}, "each job ended exactly once"
    assert incomplete == []
