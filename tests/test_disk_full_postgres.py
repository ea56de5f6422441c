"""A full disk under PostgreSQL: the tables fill their disk (an 8 MiB tmpfs holding the
database's tablespace), and the service answers as it does for SQLite's full disk: writes 503
problem+json with Retry-After (never 500), no job left processing, and jobs succeed again once
space returns, with no restart.

The write-ahead log stays on the big disk. When the WAL's own disk fills, PostgreSQL itself stops
(it PANICs rather than lose a commit) and the service then answers as for any unreachable
database: that is the outage test in test_database_outage.py.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from . import pgserver
from .conftest import TestDatabase
from .test_disk_full import TERMINAL, fill, mounted_small_disk, settle


@pytest.fixture
def backend() -> str:
    return "postgres"


@pytest.fixture(scope="module")
def server() -> Iterator[pgserver.PrivatePostgres]:
    """A private server of this module's own: its tablespace directory must be given to the user
    the server runs as, which only a server we started lets us know."""
    with pgserver.PrivatePostgres() as private:
        yield private


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """Under /tmp, not pytest's tmp_path: the server's unprivileged user must reach it, and
    pytest's directories are root's alone."""
    mount = Path(tempfile.mkdtemp(prefix="imagegen-disk-", dir="/tmp"))
    mount.chmod(0o755)
    try:
        with mounted_small_disk(mount):
            yield mount
    finally:
        mount.rmdir()


@pytest.fixture
def database(server: pgserver.PrivatePostgres, small_disk: Path, tmp_path: Path) -> Iterator[TestDatabase]:
    """A database whose tables and indexes (the migrations create them) live on the small disk."""
    import psycopg

    place = small_disk / "tablespace"
    place.mkdir()
    if server.os_owner:
        os.chown(place, *server.os_owner)
    url = server.create_database("diskfull")
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLESPACE small LOCATION '{place}'")
        conn.execute("ALTER DATABASE diskfull SET default_tablespace = small")
    try:
        yield TestDatabase("postgres", tmp_path / "data", url)
    finally:
        server.drop_database("diskfull")
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("DROP TABLESPACE small")


async def test_a_full_database_disk_answers_503_and_recovers_without_a_restart(
    make_client: Any, database: TestDatabase, small_disk: Path
) -> None:
    settings = {"provider": {"image_size": 64}, "workers": {"count": 2},
                "jobs": {"retry_base_s": 0.2, "retry_max_s": 0.5, "max_attempts": 100}}
    client = await make_client(**settings)
    first = await client.post("/generations", json={"numImages": 1}, headers={"Prefer": "wait=20"})
    assert first.status == 201
    (row,) = database.rows("SELECT pg_tablespace_location(t.oid) AS place FROM pg_tablespace t"
                           " JOIN pg_class c ON c.reltablespace = t.oid WHERE c.relname = 'jobs'")
    assert row["place"] == str(small_disk / "tablespace")  # the jobs table is on the small disk
    filler = fill(small_disk, leave=0)
    statuses = []
    for _ in range(60):
        response = await client.post("/generations", json={"numImages": 2, "prompt": "x" * 500})
        statuses.append(response.status)
        if response.status == 503:
            assert int(response.headers["Retry-After"]) > 0
            assert response.content_type == "application/problem+json"
            assert "disk is full" in (await response.json())["detail"]
        await asyncio.sleep(0.02)
    assert set(statuses) <= {202, 503} and 503 in statuses, statuses
    await asyncio.sleep(1)  # the workers meet the full disk too
    # Reads still work, and a DELETE is answered (PostgreSQL frees no disk space by deleting:
    # its VACUUM reuses the space later), as 204 or as 503, never as 500.
    assert (await client.get("/generations")).status == 200
    deleted = await client.delete(f"/generations/{(await first.json())['jobId']}")
    assert deleted.status in (204, 503), await deleted.text()
    # Space returns: new jobs are taken and every waiting job completes, with no restart.
    filler.unlink()
    again = await client.post("/generations", json={"numImages": 1}, headers={"Prefer": "wait=30"})
    assert again.status == 201 and (await again.json())["status"] == "completed"
    jobs = await settle(client, timeout=60)
    deadline = time.monotonic() + 60
    while any(job["status"] not in TERMINAL for job in jobs) or any(job["status"] != "completed" for job in jobs):
        assert time.monotonic() < deadline, [job["status"] for job in jobs]
        await asyncio.sleep(0.2)
        jobs = (await (await client.get("/generations", params={"limit": "200"})).json())["jobs"]
    # The attempts the full disk failed were recorded as retryable storage_full failures.
    codes = {row["code"] for row in database.rows("SELECT job::json->>'error_code' AS code FROM events")}
    assert "storage_full" in codes, codes
