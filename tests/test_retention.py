"""Retention and the disk: old finished jobs go with their files and keys, files go only after
their row, and what a crash or a race leaves behind is swept at start-up."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

from imagegen.maintenance import expire_jobs
from imagegen.storage import IMAGES, ImageStore
from imagegen.store import STORE

from .conftest import TestDatabase, create_job, wait_for_status
from .serverproc import ServerProcess

TERMINAL = {"completed", "failed", "canceled"}


def image_dirs(data_dir: Path) -> set[str]:
    images = data_dir / "images"
    return {entry.name for entry in images.iterdir() if entry.is_dir()} if images.is_dir() else set()


def job_ids(database: TestDatabase) -> set[str]:
    return {row["id"] for row in database.rows("SELECT id FROM jobs")}


def backdate(database: TestDatabase, job_id: str, days: float) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - days * 86_400))
    database.rows("UPDATE jobs SET completed_at = ? WHERE id = ?", (stamp, job_id))


async def test_old_finished_jobs_go_with_their_files_and_keys_soon_after_start_up(
    make_client: Any, database: TestDatabase
) -> None:
    client = await make_client()
    old = [(await (await client.post("/generations", json={"numImages": 2}, headers={"Idempotency-Key": f"k{i}"})).json())["jobId"]
           for i in range(3)]
    recent = await create_job(client)
    for job_id in [*old, recent]:
        await wait_for_status(client, job_id, TERMINAL)
    await client.close()
    for job_id in old:
        backdate(database, job_id, 2)
    backdate(database, recent, 0.4)
    assert {*old, recent} <= image_dirs(database.data_dir)
    # A new start with retention on: the first pass comes within seconds, not an interval later.
    client = await make_client(storage={"retention_days": 0.5}, events={"prune_interval_s": 3600})
    deadline = time.monotonic() + 10
    while job_ids(database) & set(old) or image_dirs(database.data_dir) & set(old):
        assert time.monotonic() < deadline, "retention did not run soon after start-up"
        await asyncio.sleep(0.05)
    assert job_ids(database) == {recent}
    assert image_dirs(database.data_dir) == {recent}
    assert database.rows("SELECT key FROM idempotency_keys") == []
    names = {row["job_id"]: row["name"] for row in database.rows("SELECT job_id, name FROM events ORDER BY seq")}
    assert all(names[job_id] == "job.deleted" for job_id in old)
    assert (await client.get(f"/generations/{old[0]}")).status == 404


async def test_unfinished_jobs_are_never_expired(make_client: Any, database: TestDatabase) -> None:
    client = await make_client(workers={"count": 1}, provider={"delay_s": 30})
    running = await create_job(client)
    await wait_for_status(client, running, {"processing"})
    waiting = await create_job(client)
    database.rows("UPDATE jobs SET created_at = '2000-01-01T00:00:00.000Z'")
    assert await expire_jobs(client.app[STORE], client.app[IMAGES], 0.001) == 0
    assert job_ids(database) == {running, waiting}


async def test_the_start_up_sweep_removes_orphans_and_stale_temporary_files(
    make_client: Any, database: TestDatabase
) -> None:
    client = await make_client()
    kept = await create_job(client)
    await wait_for_status(client, kept, TERMINAL)
    await client.close()
    images = database.data_dir / "images"
    orphan = images / "00000000-0000-7000-8000-00000000dead"
    orphan.mkdir()
    (orphan / "0.1.png").write_bytes(b"not referenced by any job")
    torn = images / kept / "1.1.tmp"
    torn.write_bytes(b"half an image")
    old = time.time() - 7200
    os.utime(torn, (old, old))
    client = await make_client()
    deadline = time.monotonic() + 10
    while orphan.exists() or torn.exists():
        assert time.monotonic() < deadline, "the sweep did not run"
        await asyncio.sleep(0.05)
    assert (await client.get(f"/generations/{kept}")).status == 200
    assert len(list((images / kept).glob("*.png"))) == 1  # the job's own image stays


async def test_cancel_then_delete_at_once_leaves_no_orphan_file(make_client: Any, database: TestDatabase) -> None:
    client = await make_client(workers={"count": 4}, provider={"delay_s": 0.01})
    rounds = 200

    async def race(i: int) -> None:
        job_id = await create_job(client, numImages=3)
        await asyncio.sleep(random.uniform(0, 0.05))  # catch the drawing at any point
        await asyncio.gather(client.post(f"/generations/{job_id}/cancel"), asyncio.sleep(0))
        # Right behind the cancel: the worker may be writing an image at this moment.
        response = await client.delete(f"/generations/{job_id}")
        assert response.status in (204, 409), await response.text()
        if response.status == 409:  # completed before the cancel landed
            assert (await client.delete(f"/generations/{job_id}")).status == 204

    for start in range(0, rounds, 20):
        await asyncio.gather(*(race(i) for i in range(start, start + 20)))
    # Every worker done with what it was drawing.
    await client.close()
    assert job_ids(database) == set()
    assert image_dirs(database.data_dir) == set(), "a file outlived its job"


def test_a_kill_in_a_delete_burst_leaves_no_orphan_after_restart(tmp_path: Path, database: TestDatabase) -> None:
    server = ServerProcess(database.data_dir, env={**database.env, "IMAGEGEN_PROVIDER__IMAGE_SIZE": "64"})
    server.start()
    try:
        ids = []
        for _ in range(60):
            request = urllib.request.Request(
                f"{server.url}/generations", data=json.dumps({"numImages": 2}).encode(),
                headers={"Content-Type": "application/json", "Prefer": "wait=20"}, method="POST",
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                ids.append(json.loads(response.read())["jobId"])
        assert len(image_dirs(database.data_dir)) == 60

        async def burst() -> None:
            import aiohttp

            answered = asyncio.Event()
            done = 0
            async with aiohttp.ClientSession() as session:
                async def delete(job_id: str) -> None:
                    nonlocal done
                    try:
                        async with session.delete(f"{server.url}/generations/{job_id}") as response:
                            await response.read()
                            done += 1
                            if done == 10:
                                answered.set()
                    except aiohttp.ClientError:
                        pass  # the server died under it

                tasks = [asyncio.create_task(delete(job_id)) for job_id in ids]
                await asyncio.wait_for(answered.wait(), 20)
                server.kill9()  # in the middle of the burst: some deleted, some not, some half-way
                await asyncio.gather(*tasks)

        asyncio.run(burst())
        server.start()
        deadline = time.monotonic() + 10
        while image_dirs(database.data_dir) - job_ids(database):
            assert time.monotonic() < deadline, image_dirs(database.data_dir) - job_ids(database)
            time.sleep(0.05)  # the start-up sweep runs in the background
        remaining = job_ids(database)
        assert image_dirs(database.data_dir) == remaining  # every job left still has its images
        assert len(remaining) <= 50  # at least the ten answered are gone
    finally:
        if server.running:
            server.stop(signal.SIGTERM)


async def test_an_images_rename_is_durable_before_its_path_is_returned(tmp_path: Path, monkeypatch: Any) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr("imagegen.storage.os.fsync", fsync)
    store = ImageStore(tmp_path)
    (tmp_path / "images").mkdir()
    relative = await store.save("00000000-0000-7000-8000-000000000001", 0, 1, b"png")
    job_dir = str(tmp_path / "images" / "00000000-0000-7000-8000-000000000001")
    # The file's data, then its directory (the rename), and the new job directory in images/.
    assert synced[-1] == job_dir and str(tmp_path / "images") in synced
    assert any(path.endswith(".tmp") for path in synced) and (tmp_path / relative).read_bytes() == b"png"


async def test_a_save_cancelled_mid_write_leaves_no_file(tmp_path: Path, monkeypatch: Any) -> None:
    # The window the cancel-then-delete race hits only now and then, held open: the job is
    # canceled (its drawing cancelled) while its image is being written on a thread.
    import imagegen.storage

    real_write = imagegen.storage._write_atomically

    def slow_write(path: Path, data: bytes) -> None:
        time.sleep(0.3)
        real_write(path, data)

    monkeypatch.setattr(imagegen.storage, "_write_atomically", slow_write)
    store = ImageStore(tmp_path)
    saving = asyncio.create_task(store.save("00000000-0000-7000-8000-000000000002", 0, 1, b"png"))
    await asyncio.sleep(0.05)
    saving.cancel()
    try:
        await saving
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("the save was not cancelled")
    assert not (tmp_path / "images" / "00000000-0000-7000-8000-000000000002").exists()
