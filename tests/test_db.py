"""The group-committing writer: many callers share one commit; one bad write fails only its caller."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from imagegen.config import Settings
from imagegen.db import Database
from imagegen.jobs import JobService

from .conftest import db_rows


async def test_concurrent_writes_share_commits(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "data" / "imagegen.sqlite3")
    batches: list[int] = []
    db.after_commit.append(lambda results: batches.append(len(results)))
    service = JobService(db, Settings())
    try:
        created = await asyncio.gather(*(service.create(1, "cat") for _ in range(50)))
        job_ids = [c.job_id for c in created]
    finally:
        await db.close()
    assert len(set(job_ids)) == 50
    assert sum(batches) == 50 and len(batches) <= 2, batches
    assert db_rows(tmp_path / "data", "SELECT count(*) AS n FROM jobs")[0]["n"] == 50


async def test_a_failing_write_fails_alone(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "data" / "imagegen.sqlite3")

    def insert(value: str):
        def op(conn):
            conn.execute(
                "INSERT INTO jobs (id, num_images, animal, created_at, updated_at) VALUES (?, ?, 'cat', 'x', 'x')",
                (value, 0 if value == "bad" else 1),  # num_images 0 breaks a CHECK constraint
            )
            return value

        return op

    try:
        results = await asyncio.gather(
            db.write(insert("a")), db.write(insert("bad")), db.write(insert("b")), return_exceptions=True
        )
    finally:
        await db.close()
    assert results[0] == "a" and results[2] == "b"
    assert isinstance(results[1], sqlite3.IntegrityError)
    ids = [row["id"] for row in db_rows(tmp_path / "data", "SELECT id FROM jobs ORDER BY seq")]
    assert ids == ["a", "b"]


async def test_schema_is_applied_idempotently_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "data" / "imagegen.sqlite3"
    for _ in range(2):
        db = await Database.open(path)
        await db.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


async def test_a_cancelled_caller_still_gets_its_write_committed(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "data" / "imagegen.sqlite3")
    service = JobService(db, Settings())
    try:
        task = asyncio.create_task(service.create(2, "owl"))
        await asyncio.sleep(0)  # let it queue its write
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await db.close()  # close() drains the queued writes first
    assert db_rows(tmp_path / "data", "SELECT count(*) AS n FROM jobs")[0]["n"] == 1
    # ... and it is queued for the workers, not left waiting for the next restart.
    assert service.queue.qsize() == 1


async def test_a_created_events_snapshot_is_what_sqlite_would_write(client, tmp_path: Path) -> None:
    # Creates write their job.created snapshot in Python (the hot path); every other event's
    # snapshot is SQLite's json_object. Both must describe the row the same way.
    from imagegen.db import _SNAPSHOT

    response = await client.post("/generations", json={"numImages": 2, "animal": "owl", "prompt": 'a "quoted" 100% owl'})
    job_id = (await response.json())["jobId"]
    conn = sqlite3.connect(tmp_path / "data" / "imagegen.sqlite3")
    try:
        (written,) = conn.execute("SELECT job FROM events WHERE job_id = ? AND name = 'job.created'", (job_id,)).fetchone()
        # The row as it was at creation: the worker may have moved it on since.
        (expected,) = conn.execute(
            f"SELECT {_SNAPSHOT} FROM (SELECT seq, id, 'pending' AS status, num_images, animal, prompt, '[]' AS images,"
            " 0 AS attempts, NULL AS error_code, NULL AS error_message, NULL AS error_retryable, created_at,"
            " created_at AS updated_at, NULL AS started_at, NULL AS completed_at FROM jobs WHERE id = ?)",
            (job_id,),
        ).fetchone()
    finally:
        conn.close()
    assert json.loads(written) == json.loads(expected)
    assert list(json.loads(written)) == list(json.loads(expected))  # the same keys, in the same order
