"""A full disk, on a real 8 MiB tmpfs: images fail their attempt as retryable storage_full, API
writes answer 503 with Retry-After (never 500), no job is left processing, DELETE still frees
space, jobs succeed again once space returns, and a restart on a full disk starts."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from .conftest import db_rows

TERMINAL = {"completed", "failed", "canceled"}


@pytest.fixture
def backend() -> str:
    """The disk is the SQLite file's and the images' (PostgreSQL's own disk is its server's)."""
    return "sqlite"


@contextmanager
def mounted_small_disk(mount: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted on the empty directory `mount`, unmounted afterwards."""
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    with mounted_small_disk(mount):
        yield mount


def fill(disk: Path, leave: int, name: str = "filler") -> Path:
    """Take all but `leave` bytes of the disk's free space."""
    path = disk / name
    free = shutil.disk_usage(disk).free
    with open(path, "ab") as file:
        chunk = b"\0" * 65536
        remaining = max(0, free - leave)
        while remaining > 0:
            try:
                file.write(chunk[: min(len(chunk), remaining)])
                file.flush()
            except OSError:
                break
            remaining -= 65536
    return path


async def settle(client: Any, timeout: float = 40) -> list[dict[str, Any]]:
    """Every job, once none is processing."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = (await (await client.get("/generations", params={"limit": "200"})).json())["jobs"]
        if not any(job["status"] == "processing" for job in jobs):
            return jobs
        assert time.monotonic() < deadline, [j["status"] for j in jobs]
        await asyncio.sleep(0.1)


async def test_a_full_disk_is_survived_and_recovered_from_without_a_restart(make_client: Any, small_disk: Path) -> None:
    data = small_disk / "data"
    settings = {"provider": {"image_size": 256}, "workers": {"count": 2},
                "jobs": {"retry_base_s": 0.2, "retry_max_s": 0.5, "max_attempts": 100}}
    client = await make_client(data_dir=data, **settings)
    first = await client.post("/generations", json={"numImages": 1}, headers={"Prefer": "wait=20"})
    assert first.status == 201
    finished = (await first.json())["jobId"]
    filler = fill(small_disk, leave=256 * 1024)
    statuses = []
    for _ in range(40):
        response = await client.post("/generations", json={"numImages": 3})
        statuses.append(response.status)
        if response.status == 503:
            assert int(response.headers["Retry-After"]) > 0
            assert response.content_type == "application/problem+json"
            assert "disk is full" in (await response.json())["detail"]
        await asyncio.sleep(0.05)
    assert set(statuses) <= {202, 503} and 503 in statuses, statuses
    await asyncio.sleep(1)  # the workers meet the full disk too
    # DELETE still works on the full disk, and frees space.
    deleted = await client.delete(f"/generations/{finished}")
    assert deleted.status == 204, await deleted.text()
    # Space returns: new jobs are taken and every waiting job completes, with no restart.
    filler.unlink()
    again = await client.post("/generations", json={"numImages": 1}, headers={"Prefer": "wait=30"})
    assert again.status == 201 and (await again.json())["status"] == "completed"
    # Nothing is left processing: an outcome the full disk refused is recorded once it can be.
    jobs = await settle(client, timeout=60)
    deadline = time.monotonic() + 60
    while any(job["status"] != "completed" for job in jobs):
        assert time.monotonic() < deadline, [job["status"] for job in jobs]
        await asyncio.sleep(0.2)
        jobs = (await (await client.get("/generations", params={"limit": "200"})).json())["jobs"]
    codes = {row["code"] for row in db_rows(data, "SELECT json_extract(job, '$.error_code') AS code FROM events")}
    assert "storage_full" in codes  # the attempts the full disk failed, as retryable failures
    await client.close()
    # A restart on a disk that is full to the last byte: it starts, and serves.
    fill(small_disk, leave=0)
    client = await make_client(data_dir=data, **settings)
    assert (await client.get("/generations")).status == 200
    refused = await client.post("/generations", json={"numImages": 1})
    assert refused.status in (202, 503)
