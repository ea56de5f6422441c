"""SQLite access: one group-committing writer, a reader connection, and every SQL string.

Writes are submitted as small async functions ("write ops") that run on the writer's own
connection. The writer task takes every op that is queued, runs them all inside one
BEGIN IMMEDIATE transaction, commits once (one fsync under synchronous=FULL for the whole
batch), and only then resolves each caller. Reads use a separate connection and never wait
behind the writer: WAL lets them see the last committed state while a write is in progress.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
from aiohttp import web

log = logging.getLogger(__name__)

T = TypeVar("T")
WriteOp = Callable[[aiosqlite.Connection], Awaitable[T]]

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema.sql"

# Upper bound on ops in one transaction, so one huge burst cannot hold the write lock for long.
MAX_BATCH = 512

# --- queries -------------------------------------------------------------------------------

INSERT_JOB = """
INSERT INTO jobs (id, num_images, animal, prompt, created_at, updated_at)
VALUES (?, ?, ?, ?, ?, ?)
RETURNING *
"""

SELECT_JOB = "SELECT * FROM jobs WHERE id = ?"

# Newest first; seq is the cursor, so rows inserted while a client walks the list never shift it.
LIST_JOBS = "SELECT * FROM jobs WHERE seq < ? ORDER BY seq DESC LIMIT ?"
LIST_JOBS_BY_STATUS = "SELECT * FROM jobs WHERE status = ? AND seq < ? ORDER BY seq DESC LIMIT ?"

CLAIM_JOB = """
UPDATE jobs SET status = 'processing', attempts = attempts + 1,
       started_at = coalesce(started_at, ?1), updated_at = ?1
WHERE id = ?2 AND status = 'pending'
RETURNING *
"""

# Fenced on the attempt: a worker whose claim was superseded cannot write.
ADD_IMAGE = """
UPDATE jobs SET images = json_insert(images, '$[#]', ?1), updated_at = ?2
WHERE id = ?3 AND status = 'processing' AND attempts = ?4 AND json_array_length(images) = ?5
RETURNING *
"""

COMPLETE_JOB = """
UPDATE jobs SET status = 'completed', completed_at = ?1, updated_at = ?1
WHERE id = ?2 AND status = 'processing' AND attempts = ?3 AND json_array_length(images) = num_images
RETURNING *
"""

FAIL_JOB = """
UPDATE jobs SET status = 'failed', error_code = ?1, error_message = ?2, error_retryable = ?6,
       completed_at = ?3, updated_at = ?3
WHERE id = ?4 AND status = 'processing' AND attempts = ?5
RETURNING *
"""

RELEASE_JOB = """
UPDATE jobs SET status = 'pending', updated_at = ?1
WHERE id = ?2 AND status = 'processing' AND attempts = ?3
RETURNING *
"""

RECOVER_JOBS = "UPDATE jobs SET status = 'pending', updated_at = ? WHERE status = 'processing' RETURNING *"

PENDING_JOB_IDS = "SELECT id FROM jobs WHERE status = 'pending' ORDER BY seq"

INSERT_EVENT = "INSERT INTO events (job_id, name, job, created_at) VALUES (?, ?, ?, ?) RETURNING seq"


# --- connections ---------------------------------------------------------------------------


async def _connect(path: Path) -> aiosqlite.Connection:
    # isolation_level=None: autocommit mode, so transactions are exactly the BEGINs we issue.
    conn = await aiosqlite.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    await conn.execute("PRAGMA synchronous = FULL")
    await conn.execute("PRAGMA busy_timeout = 5000")
    await conn.execute("PRAGMA foreign_keys = ON")
    return conn


@dataclass
class _Pending:
    op: WriteOp[Any]
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Database:
    """The service's SQLite file: `write` ops are group-committed, `fetch_*` reads never wait on them."""

    def __init__(self, writer: aiosqlite.Connection, reader: aiosqlite.Connection) -> None:
        self._writer = writer
        self._reader = reader
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        # Called with the results of each committed batch, after the commit: events go out
        # only for state that is on disk.
        self.after_commit: list[Callable[[list[Any]], None]] = []

    @classmethod
    async def open(cls, path: Path) -> Database:
        """Open (creating if needed) the database at `path` and apply schema.sql."""
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = await _connect(path)
        try:
            await writer.executescript(SCHEMA_PATH.read_text(encoding="utf-8"))
            reader = await _connect(path)
        except BaseException:
            await writer.close()
            raise
        db = cls(writer, reader)
        db._task = asyncio.create_task(db._write_loop(), name="imagegen-db-writer")
        return db

    async def close(self) -> None:
        """Finish every queued write, then close both connections."""
        if self._task is not None:
            await self._queue.join()
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self._reader.close()
        await self._writer.close()

    async def write(self, op: WriteOp[T]) -> T:
        """Run `op` in the next group commit; return its result once it is committed.

        The caller may be cancelled while waiting; the write still happens, as a unit.
        """
        pending = _Pending(op)
        self._queue.put_nowait(pending)
        return await asyncio.shield(pending.future)

    # execute_fetchall is one trip to the connection's thread; execute + fetch + close would be three.
    async def fetch_one(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        rows = await self._reader.execute_fetchall(sql, params)
        return rows[0] if rows else None

    async def fetch_all(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return list(await self._reader.execute_fetchall(sql, params))

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            # Whatever queued up while the previous batch was committing goes in this one.
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._commit_batch(batch)
            except Exception as exc:
                # Only a broken connection gets here (rollback itself failed): fail the callers,
                # keep the writer alive for the next batch.
                log.exception("write batch failed")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _commit_batch(self, batch: list[_Pending]) -> None:
        conn = self._writer
        try:
            await conn.execute("BEGIN IMMEDIATE")
            results = [await item.op(conn) for item in batch]
            await conn.commit()
        except Exception:
            await _rollback(conn)
            if len(batch) == 1:
                await self._commit_alone(batch[0])
                return
            # One op failed (or the commit did): give each op its own transaction, so only
            # the faulty one fails and the others still commit.
            for item in batch:
                await self._commit_alone(item)
            return
        self._resolve(batch, results)

    async def _commit_alone(self, item: _Pending) -> None:
        conn = self._writer
        try:
            await conn.execute("BEGIN IMMEDIATE")
            result = await item.op(conn)
            await conn.commit()
        except Exception as exc:
            await _rollback(conn)
            if not item.future.done():
                item.future.set_exception(exc)
            return
        self._resolve([item], [result])

    def _resolve(self, batch: list[_Pending], results: list[Any]) -> None:
        for hook in self.after_commit:
            try:
                hook(results)
            except Exception:
                log.exception("after-commit hook failed")
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)


async def _rollback(conn: aiosqlite.Connection) -> None:
    if conn.in_transaction:
        await conn.rollback()


DATABASE = web.AppKey("database", Database)


def database_context(path: Path) -> Callable[[web.Application], AsyncIterator[None]]:
    """Cleanup context: the database is open while the app runs."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        db = await Database.open(path)
        app[DATABASE] = db
        # In a finally: when a later context fails at start-up, aiohttp skips this cleanup and
        # run_app only closes the suspended generator. Without it, the open connections' threads
        # would keep the process alive after the error.
        try:
            yield
        finally:
            await db.close()

    return context
