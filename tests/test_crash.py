"""The crash test: 1,000 jobs submitted while the real server is killed with SIGKILL 20 times.

Run alone with `python3 tasks.py test -m crash -s` (it prints its counts); CI runs it too. On
each backend: on PostgreSQL the jobs a killed process held are rescued by the restarted one
once their lease expires (kept short here), rather than as it starts.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest

from .conftest import TestDatabase
from .serverproc import ServerProcess

JOBS = 1000
KILLS = 20

pytestmark = pytest.mark.crash


def _submit(url: str, key: str, body: dict) -> bool:
    """POST one job with its idempotency key; False if the server is down or refusing."""
    request = urllib.request.Request(
        f"{url}/generations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Idempotency-Key": key},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 202
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _status_counts(database: TestDatabase) -> Counter[str]:
    return Counter(row["status"] for row in database.rows("SELECT status FROM jobs"))


async def test_kill_9_twenty_times_loses_nothing_and_completes_nothing_twice(database: TestDatabase) -> None:
    rng = random.Random(20261130)
    env = {
        **database.env,
        "IMAGEGEN_PROVIDER__IMAGE_SIZE": "64",
        "IMAGEGEN_PROVIDER__DELAY_S": "0.01",
        "IMAGEGEN_WORKERS__MAX_PENDING": str(JOBS),
        # jobs.max_recoveries stays at its default (5): a job caught mid-draw by five of the
        # kills is failed as a poison job, which is a terminal state too.
    }
    if database.backend == "postgres":
        env["IMAGEGEN_WORKERS__LEASE_S"] = "2"  # a killed process's jobs are rescued 2-3 s later
    server = ServerProcess(database.data_dir, env)
    server.start()
    # Each job has its own idempotency key: a submission that may or may not have landed
    # before a kill is simply sent again, and must not create a second job.
    pending = [(f"crash-{n}", {"numImages": rng.randint(1, 3)}) for n in range(JOBS)]
    kill_at = sorted(rng.uniform(0.2, 12.0) for _ in range(KILLS))
    started = time.monotonic()
    kills = 0

    async def submitter() -> None:
        while pending:
            key, body = pending[0]
            if await asyncio.to_thread(_submit, server.url, key, body):
                pending.pop(0)
            else:
                await asyncio.sleep(0.05)  # the server is being restarted; bounded by the test timeout

    submitting = asyncio.create_task(submitter())
    try:
        while kills < KILLS:
            await asyncio.sleep(max(0.0, started + kill_at[kills] - time.monotonic()))
            await asyncio.to_thread(server.kill9)
            kills += 1
            await asyncio.to_thread(server.start)
        await asyncio.wait_for(submitting, 120)

        async def all_terminal() -> None:
            while (counts := await asyncio.to_thread(_status_counts, database))["pending"] + counts["processing"]:
                await asyncio.sleep(0.2)

        await asyncio.wait_for(all_terminal(), 180)
    finally:
        submitting.cancel()
        server.kill9()

    if database.backend == "sqlite":
        conn = sqlite3.connect(database.data_dir / "imagegen.sqlite3")
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            conn.close()
    else:
        # Event ids come from the one-row counter: it names exactly the last event written.
        (counter,) = database.rows("SELECT last, (SELECT max(seq) FROM events) AS max_seq FROM event_counter")
        assert counter["last"] == counter["max_seq"], counter
    statuses = _status_counts(database)
    keys = database.rows("SELECT count(*) AS n FROM idempotency_keys")[0]["n"]
    terminal = [
        (row["job_id"], row["n"])
        for row in database.rows(
            "SELECT job_id, count(*) AS n FROM events WHERE name IN ('job.completed', 'job.failed', 'job.canceled') "
            "GROUP BY job_id"
        )
    ]
    recovered = database.rows("SELECT count(*) AS n FROM events WHERE name = 'job.requeued'")[0]["n"]
    failures = Counter(row["error_code"] for row in database.rows("SELECT error_code FROM jobs WHERE status = 'failed'"))
    incomplete = sum(
        len(json.loads(row["images"])) != row["num_images"]
        for row in database.rows("SELECT images, num_images FROM jobs WHERE status = 'completed'")
    )
    print(
        f"\ncrash test: {JOBS} jobs submitted, {kills} kill -9s, {recovered} recoveries; "
        f"final statuses {dict(statuses)}, failures {dict(failures)}; "
        f"terminal events per job {dict(Counter(n for _, n in terminal))}"
    )
    assert sum(statuses.values()) == JOBS and keys == JOBS, "every submitted job exists exactly once"
    assert set(statuses) <= {"completed", "failed"}, statuses
    assert statuses["completed"] >= JOBS * 0.9
    assert len(terminal) == JOBS and all(n == 1 for _, n in terminal), "each job ended exactly once"
    assert incomplete == 0
