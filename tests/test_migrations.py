"""Schema migrations: a database made by the first release (version 1, tests/fixtures/schema-v1.sql,
the schema.sql it shipped) opened by this release keeps every job, event and image."""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from imagegen.store.sqlite import migrations

from .conftest import wait_for_status

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "schema-v1.sql"


@pytest.fixture
def backend() -> str:
    return "sqlite"  # the version-1 release had only SQLite


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _snapshot(conn: sqlite3.Connection, job_id: str) -> str:
    # What version 1 wrote as an event's job: its row as JSON, without the later columns.
    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    keys = ["seq", "id", "status", "num_images", "animal", "prompt", "images", "attempts", "error_code",
            "error_message", "error_retryable", "created_at", "updated_at", "started_at", "completed_at"]
    return json.dumps({key: row[key] for key in keys})


def make_version_1_database(data_dir: Path) -> dict[str, bytes]:
    """A data directory as the first release left it: a completed job with two images, a job
    that was processing when it stopped, a pending one, their events and an idempotency key."""
    data_dir.mkdir(parents=True)
    conn = sqlite3.connect(data_dir / "imagegen.sqlite3")
    conn.row_factory = sqlite3.Row
    conn.executescript(FIXTURE.read_text(encoding="utf-8"))
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 0  # version 1 never set it
    now = "2026-11-30T12:00:00.000Z"
    images = {}
    jobs = [
        ("00000000-0000-7000-8000-000000000001", "completed", 2, '["images/00000000-0000-7000-8000-000000000001/0.png",'
         ' "images/00000000-0000-7000-8000-000000000001/1.png"]'),
        ("00000000-0000-7000-8000-000000000002", "processing", 2, "[]"),
        ("00000000-0000-7000-8000-000000000003", "pending", 1, "[]"),
    ]
    for job_id, status, num_images, paths in jobs:
        conn.execute(
            "INSERT INTO jobs (id, status, num_images, animal, images, attempts, created_at, updated_at, completed_at)"
            " VALUES (?, 'pending', ?, 'owl', '[]', 0, ?, ?, NULL)",
            (job_id, num_images, now, now),
        )
        conn.execute("INSERT INTO events (job_id, name, job, created_at) VALUES (?, 'job.created', ?, ?)",
                     (job_id, _snapshot(conn, job_id), now))
        if status != "pending":
            conn.execute("UPDATE jobs SET status = 'processing', attempts = 1, started_at = ? WHERE id = ?", (now, job_id))
            conn.execute("INSERT INTO events (job_id, name, job, created_at) VALUES (?, 'job.processing', ?, ?)",
                         (job_id, _snapshot(conn, job_id), now))
        if status == "completed":
            conn.execute("UPDATE jobs SET status = 'completed', images = ?, completed_at = ? WHERE id = ?", (paths, now, job_id))
            conn.execute("INSERT INTO events (job_id, name, job, created_at) VALUES (?, 'job.completed', ?, ?)",
                         (job_id, _snapshot(conn, job_id), now))
            for index, path in enumerate(json.loads(paths)):
                images[path] = _png((40 * index, 120, 200))
                (data_dir / path).parent.mkdir(parents=True, exist_ok=True)
                (data_dir / path).write_bytes(images[path])
    conn.execute("INSERT INTO idempotency_keys VALUES ('key-1', 'hash', ?, ?)", (jobs[0][0], now))
    conn.commit()
    conn.close()
    return images


async def test_a_version_1_database_is_migrated_with_everything_intact(make_client, tmp_path: Path) -> None:
    data = tmp_path / "data"
    images = make_version_1_database(data)
    before = sqlite3.connect(data / "imagegen.sqlite3")
    before.row_factory = sqlite3.Row
    old_events = [dict(row) for row in before.execute("SELECT * FROM events ORDER BY seq")]
    old_jobs = {row["id"]: dict(row) for row in before.execute("SELECT * FROM jobs")}
    before.close()

    client = await make_client(data)
    completed, processing, pending = sorted(old_jobs)

    conn = sqlite3.connect(data / "imagegen.sqlite3")
    conn.row_factory = sqlite3.Row
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(migrations())
        # Every version-1 event is still there, unchanged, before anything this release wrote.
        events = [dict(row) for row in conn.execute("SELECT * FROM events ORDER BY seq")]
        assert events[: len(old_events)] == old_events
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (completed,)).fetchone()
        assert {key: row[key] for key in old_jobs[completed]} == old_jobs[completed]
        assert conn.execute("SELECT job_id FROM idempotency_keys WHERE key = 'key-1'").fetchone()[0] == completed
    finally:
        conn.close()

    # The API serves the old job and its images byte for byte...
    body = await (await client.get(f"/generations/{completed}")).json()
    assert body["status"] == "completed" and len(body["imageUrls"]) == 2
    for index, path in enumerate(sorted(images)):
        response = await client.get(f"/images/{completed}/{index}.png")
        assert response.status == 200 and await response.read() == images[path]
    # ... the job that was processing when version 1 stopped is recovered and finished, and the
    # pending one is drawn.
    for job_id in (processing, pending):
        assert (await wait_for_status(client, job_id, {"completed", "failed"}))["status"] == "completed"


async def test_postgres_nodes_starting_together_migrate_once(pg_server) -> None:
    import asyncio

    import psycopg

    from imagegen.store import postgres

    url = pg_server.create_database("imagegen_migrate_together")
    try:
        # Three nodes' start-ups at once: the advisory lock makes one migrate, the others wait
        # and then find nothing to do (no "relation already exists").
        await asyncio.gather(*(postgres._migrate(url) for _ in range(3)))
        with psycopg.connect(url) as conn:
            versions = [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
            assert versions == [version for version, _ in postgres.migrations()]
            assert conn.execute("SELECT last FROM event_counter").fetchone() == (0,)
    finally:
        pg_server.drop_database("imagegen_migrate_together")


async def test_a_postgres_database_newer_than_the_release_is_refused(pg_server) -> None:
    import psycopg

    from imagegen.errors import StartupError
    from imagegen.store import postgres

    url = pg_server.create_database("imagegen_migrate_newer")
    try:
        await postgres._migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO schema_migrations (version) VALUES (99)")
        with pytest.raises(StartupError, match="schema version 99, newer than this release"):
            await postgres._migrate(url)
    finally:
        pg_server.drop_database("imagegen_migrate_newer")
