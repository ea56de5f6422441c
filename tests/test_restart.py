"""Restart safety: graceful stops hand jobs back; crashes (kill -9) lose nothing.

On SQLite a restarted process hands back, as it starts, every job a crash left processing. On
PostgreSQL such a job still carries the dead process's lease, and a live node (here: the
restarted process) rescues it once that lease expires, so these tests keep the lease short.
"""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
from typing import Any

import pytest

from .conftest import TestDatabase, create_job, wait_for_status
from .serverproc import ServerProcess

# With backend postgres: how long a killed process's claim on a job holds, in seconds.
LEASE_S = 2


def server_env(database: TestDatabase, **settings: str) -> dict[str, str]:
    """IMAGEGEN_* variables for a server.py on the test's database, with `settings` added."""
    env = {**database.env, **settings}
    if database.backend == "postgres":
        env["IMAGEGEN_WORKERS__LEASE_S"] = str(LEASE_S)
    return env


async def test_stopped_app_hands_back_its_job_and_the_next_one_finishes_it(make_client, database: TestDatabase) -> None:
    data = database.data_dir
    first = await make_client(data, provider={"delay_s": 0.2}, workers={"shutdown_grace_s": 0})
    job_id = await create_job(first, numImages=4)
    partial = await wait_for_status(first, job_id, {"processing"})
    while partial["progress"]["done"] < 1:
        partial = await wait_for_status(first, job_id, {"processing"})
    await first.close()  # graceful stop with no grace: the running job goes back to pending
    (row,) = database.rows("SELECT status, images FROM jobs WHERE id = ?", (job_id,))
    assert row["status"] == "pending" and 1 <= len(json.loads(row["images"])) < 4

    second = await make_client(data)
    job = await wait_for_status(second, job_id, {"completed", "failed"})
    assert job["status"] == "completed" and job["progress"] == {"done": 4, "total": 4}
    names = [r["name"] for r in database.rows("SELECT name FROM events WHERE job_id = ? ORDER BY seq", (job_id,))]
    assert names.count("job.requeued") == 1 and names.count("job.completed") == 1


async def test_pending_jobs_are_recovered_in_creation_order(make_client, database: TestDatabase) -> None:
    data = database.data_dir
    first = await make_client(data, provider={"delay_s": 5}, workers={"count": 1, "shutdown_grace_s": 0})
    ids = [await create_job(first) for _ in range(4)]
    await first.close()
    second = await make_client(data, workers={"count": 1})
    for job_id in ids:
        await wait_for_status(second, job_id, {"completed"})
    started = [r["id"] for r in database.rows("SELECT id FROM jobs ORDER BY completed_at, seq")]
    assert started == ids


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


async def _until(predicate, timeout: float = 20.0) -> None:
    async def loop() -> None:
        while not await asyncio.to_thread(predicate):
            await asyncio.sleep(0.05)

    await asyncio.wait_for(loop(), timeout)


async def test_kill_9_mid_job_then_restart_completes_it(database: TestDatabase) -> None:
    env = server_env(database, IMAGEGEN_PROVIDER__DELAY_S="0.3", IMAGEGEN_PROVIDER__IMAGE_SIZE="64")
    server = ServerProcess(database.data_dir, env)
    server.start()
    try:
        job_id = _post(f"{server.url}/generations", {"numImages": 5})["jobId"]
        await _until(lambda: _get(f"{server.url}/generations/{job_id}")["progress"]["done"] >= 1)
        server.kill9()
        (row,) = database.rows("SELECT status FROM jobs WHERE id = ?", (job_id,))
        assert row["status"] == "processing"  # the crash left it mid-flight
        server.start()
        await _until(lambda: _get(f"{server.url}/generations/{job_id}")["status"] == "completed")
        job = _get(f"{server.url}/generations/{job_id}")
        assert job["progress"] == {"done": 5, "total": 5}
        for url in job["imageUrls"]:
            with urllib.request.urlopen(url, timeout=5) as response:
                assert response.read(8) == b"\x89PNG\r\n\x1a\n"
    finally:
        server.kill9()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_stops_promptly_and_hands_back_unfinished_jobs(database: TestDatabase, sig: int) -> None:
    env = server_env(
        database,
        IMAGEGEN_PROVIDER__DELAY_S="30",  # far longer than the grace period
        IMAGEGEN_WORKERS__SHUTDOWN_GRACE_S="1",
        IMAGEGEN_WORKERS__COUNT="2",
    )
    server = ServerProcess(database.data_dir, env)
    server.start()
    try:
        ids = [_post(f"{server.url}/generations", {"numImages": 1})["jobId"] for _ in range(3)]
        await _until(lambda: _get(f"{server.url}/generations?status=processing")["jobs"] != [])
        took = await asyncio.to_thread(server.stop, sig)
        assert server.proc.returncode == 0
        assert took < 10, f"shutdown took {took:.1f}s"
        rows = database.rows("SELECT status FROM jobs")
        assert [r["status"] for r in rows] == ["pending"] * len(ids)
    finally:
        if server.proc.poll() is None:
            server.kill9()


async def test_a_job_running_in_every_crash_is_failed_as_poison(database: TestDatabase) -> None:
    env = server_env(database, IMAGEGEN_PROVIDER__DELAY_S="30", IMAGEGEN_JOBS__MAX_RECOVERIES="2")
    server = ServerProcess(database.data_dir, env)
    server.start()
    try:
        job_id = _post(f"{server.url}/generations", {"numImages": 1})["jobId"]
        for crash in range(2):
            # Drawn by this process: its attempt `crash + 1` (on PostgreSQL the job still shows
            # processing under the dead process's lease until this one rescues and claims it).
            await _until(lambda: _get(f"{server.url}/generations/{job_id}")["attempts"] == crash + 1)
            assert _get(f"{server.url}/generations/{job_id}")["status"] == "processing"
            server.kill9()  # the job "crashes" the service while it is being drawn
            server.start()
        if database.backend == "postgres":
            # Failed by the rescue that finds its lease expired a second time.
            await _until(lambda: _get(f"{server.url}/generations/{job_id}")["status"] != "processing")
        # On SQLite: failed as the process started.
        job = _get(f"{server.url}/generations/{job_id}")
        assert job["status"] == "failed" and job["attempts"] == 2
        assert job["error"]["code"] == "crashed_repeatedly" and job["error"]["retryable"] is False
        assert "2 times" in job["error"]["message"]
    finally:
        server.kill9()
