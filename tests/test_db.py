"""The SQLite store's group-committing writer: many callers share one commit; one bad write fails
only its caller; migrations."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from imagegen.feed import Feed
from imagegen.jobs import uuid7
from imagegen.models import now_text
from imagegen.store import NewJob
from imagegen.store.sqlite import SQLiteStore

from .conftest import db_rows


@pytest.fixture
def backend() -> str:
    """The SQLite store itself (its writer, migrations, WAL, its snapshot SQL): SQLite only."""
    return "sqlite"


def new_job(num_images: int = 1, animal: str = "cat") -> NewJob:
    return NewJob(uuid7(), num_images, animal, None, now_text())


async def open_store(tmp_path: Path, feed: Feed | None = None) -> SQLiteStore:
    return await SQLiteStore.open(tmp_path / "data" / "imagegen.sqlite3", feed or Feed())


async def test_concurrent_writes_share_commits(tmp_path: Path) -> None:
    feed = Feed()
    db = await open_store(tmp_path, feed)
    batches: list[int] = []
    feed.subscribe(lambda events: batches.append(len(events)))
    try:
        created = await asyncio.gather(*(db.create(new_job(), None, None) for _ in range(50)))
        job_ids = [event.job_id for event in created]
    finally:
        await db.close()
    assert len(set(job_ids)) == 50
    assert sum(batches) == 50 and len(batches) <= 2, batches
    assert db_rows(tmp_path / "data", "SELECT count(*) AS n FROM jobs")[0]["n"] == 50


async def test_a_failing_write_fails_alone(tmp_path: Path) -> None:
    db = await open_store(tmp_path)

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
            db._write(insert("a")), db._write(insert("bad")), db._write(insert("b")), return_exceptions=True
        )
    finally:
        await db.close()
    assert results[0] == "a" and results[2] == "b"
    assert isinstance(results[1], sqlite3.IntegrityError)
    ids = [row["id"] for row in db_rows(tmp_path / "data", "SELECT id FROM jobs ORDER BY seq")]
    assert ids == ["a", "b"]


async def test_migrations_run_once_and_leave_wal_mode(tmp_path: Path) -> None:
    from imagegen.store.sqlite import migrations

    path = tmp_path / "data" / "imagegen.sqlite3"
    for _ in range(2):
        db = await SQLiteStore.open(path, Feed())
        await db.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(migrations())
    conn.close()


async def test_a_database_newer_than_the_release_is_refused(tmp_path: Path) -> None:
    from imagegen.errors import StartupError

    path = tmp_path / "data" / "imagegen.sqlite3"
    await (await SQLiteStore.open(path, Feed())).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StartupError, match="schema version 99, newer than this release"):
        await SQLiteStore.open(path, Feed())


async def test_a_cancelled_caller_still_gets_its_write_committed(tmp_path: Path) -> None:
    feed = Feed()
    db = await open_store(tmp_path, feed)
    published: list[str] = []
    feed.subscribe(lambda events: published.extend(event.name for event in events))
    try:
        task = asyncio.create_task(db.create(new_job(2, "owl"), None, None))
        await asyncio.sleep(0)  # let it queue its write
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await db.close()  # close() drains the queued writes first
    assert db_rows(tmp_path / "data", "SELECT count(*) AS n FROM jobs")[0]["n"] == 1
    # ... and the feed heard of it (so the dispatcher queues it), not left for the next restart.
    assert published == ["job.created"]


async def test_a_created_events_snapshot_is_what_sqlite_would_write(client, tmp_path: Path) -> None:
    # Creates write their job.created snapshot in Python (the hot path); every other event's
    # snapshot is SQLite's json_object. Both must describe the row the same way.
    from imagegen.store.sqlite import _SNAPSHOT

    response = await client.post("/generations", json={"numImages": 2, "animal": "owl", "prompt": 'a "quoted" 100% owl'})
    job_id = (await response.json())["jobId"]
    conn = sqlite3.connect(tmp_path / "data" / "imagegen.sqlite3")
    try:
        (written,) = conn.execute("SELECT job FROM events WHERE job_id = ? AND name = 'job.created'", (job_id,)).fetchone()
        # The row as it was at creation: the worker may have moved it on since.
        (expected,) = conn.execute(
            f"SELECT {_SNAPSHOT} FROM (SELECT seq, id, 'pending' AS status, num_images, animal, prompt, '[]' AS images,"
            " 0 AS attempts, NULL AS error_code, NULL AS error_message, NULL AS error_retryable, created_at,"
            " created_at AS updated_at, NULL AS started_at, NULL AS completed_at, NULL AS not_before, owner"
            " FROM jobs WHERE id = ?)",
            (job_id,),
        ).fetchone()
    finally:
        conn.close()
    assert json.loads(written) == json.loads(expected)
    assert list(json.loads(written)) == list(json.loads(expected))  # the same keys, in the same order
