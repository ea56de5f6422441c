"""Restart safety: graceful stops hand jobs back; crashes (kill -9) lose nothing."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
from pathlib import Path

import pytest

from .conftest import create_job, db_rows, wait_for_status
from .serverproc import ServerProcess


async def test_stopped_app_hands_back_its_job_and_the_next_one_finishes_it(make_client, tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = await make_client(data, provider={"delay_s": 0.2}, workers={"shutdown_grace_s": 0})
    job_id = await create_job(first, numImages=4)
    partial = await wait_for_status(first, job_id, {"processing"})
    while partial["progress"]["done"] < 1:
        partial = await wait_for_status(first, job_id, {"processing"})
    await first.close()  # graceful stop with no grace: the running job goes back to pending
    (row,) = db_rows(data, "SELECT status, json_array_length(images) AS n FROM jobs WHERE id = ?", (job_id,))
    assert row["status"] == "pending" and 1 <= row["n"] < 4

    second = await make_client(data)
    job = await wait_for_status(second, job_id, {"completed", "failed"})
    assert job["status"] == "completed" and job["progress"] == {"done": 4, "total": 4}
    names = [r["name"] for r in db_rows(data, "SELECT name FROM events WHERE job_id = ? ORDER BY seq", (job_id,))]
    assert names.count("job.requeued") == 1 and names.count("job.completed") == 1


async def test_pending_jobs_are_recovered_in_creation_order(make_client, tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = await make_client(data, provider={"delay_s": 5}, workers={"count": 1, "shutdown_grace_s": 0})
    ids = [await create_job(first) for _ in range(4)]
    await first.close()
    second = await make_client(data, workers={"count": 1})
    for job_id in ids:
        await wait_for_status(second, job_id, {"completed"})
    started = [r["id"] for r in db_rows(data, "SELECT id FROM jobs ORDER BY completed_at, seq")]
    assert started == ids


def _get(url: str) -> dict:
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


async def test_kill_9_mid_job_then_restart_completes_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServerProcess(data, {"IMAGEGEN_PROVIDER__DELAY_S": "0.3", "IMAGEGEN_PROVIDER__IMAGE_SIZE": "64"})
    server.start()
    try:
        job_id = _post(f"{server.url}/generations", {"numImages": 5})["jobId"]
        await _until(lambda: _get(f"{server.url}/generations/{job_id}")["progress"]["done"] >= 1)
        server.kill9()
        (row,) = db_rows(data, "SELECT status FROM jobs WHERE id = ?", (job_id,))
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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_stops_promptly_and_hands_back_unfinished_jobs(tmp_path: Path, sig: int) -> None:
    data = tmp_path / "data"
    env = {
        "IMAGEGEN_PROVIDER__DELAY_S": "30",  # far longer than the grace period
        "IMAGEGEN_WORKERS__SHUTDOWN_GRACE_S": "1",
        "IMAGEGEN_WORKERS__COUNT": "2",
    }
    server = ServerProcess(data, env)
    server.start()
    try:
        ids = [_post(f"{server.url}/generations", {"numImages": 1})["jobId"] for _ in range(3)]
        await _until(lambda: _get(f"{server.url}/generations?status=processing")["jobs"] != [])
        took = await asyncio.to_thread(server.stop, sig)
        assert server.proc.returncode == 0
        assert took < 10, f"shutdown took {took:.1f}s"
        rows = db_rows(data, "SELECT status FROM jobs")
        assert [r["status"] for r in rows] == ["pending"] * len(ids)
    finally:
        if server.proc.poll() is None:
            server.kill9()


async def test_a_job_running_in_every_crash_is_failed_as_poison(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {"IMAGEGEN_PROVIDER__DELAY_S": "30", "IMAGEGEN_JOBS__MAX_RECOVERIES": "2"}
    server = ServerProcess(data, env)
    server.start()
    try:
        job_id = _post(f"{server.url}/generations", {"numImages": 1})["jobId"]
        for crash in range(2):
            await _until(lambda: _get(f"{server.url}/generations/{job_id}")["status"] == "processing")
            server.kill9()  # the job "crashes" the service while it is being drawn
            server.start()
        job = _get(f"{server.url}/generations/{job_id}")
        assert job["status"] == "failed"
        assert job["error"]["code"] == "crashed_repeatedly" and job["error"]["retryable"] is False
        assert "2 times" in job["error"]["message"]
    finally:
        server.kill9()
