"""SQLite access: one group-committing writer, a reader connection, and every SQL string.

Writes are submitted as small functions ("write ops") that run on the writer's own
connection. The writer task takes every op that is queued, runs them all inside one
BEGIN IMMEDIATE transaction on the connection's thread in a single call, commits once (one
fsync under synchronous=FULL for the whole batch), and only then resolves each caller. Reads use a separate connection and never wait
behind the writer: WAL lets them see the last committed state while a write is in progress.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
from aiohttp import web

log = logging.getLogger(__name__)

T = TypeVar("T")
# A write: runs on the writer's thread, inside the batch's transaction.
WriteOp = Callable[[sqlite3.Connection], T]

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema.sql"

# Upper bound on ops in one transaction, so one huge burst cannot hold the write lock for long.
MAX_BATCH = 512

# --- queries -------------------------------------------------------------------------------

SELECT_JOB = "SELECT * FROM jobs WHERE id = ?"

# Newest first; seq is the cursor, so rows inserted while a client walks the list never shift it.
LIST_JOBS = "SELECT * FROM jobs WHERE seq < ? ORDER BY seq DESC LIMIT ?"
LIST_JOBS_BY_STATUS = "SELECT * FROM jobs WHERE status = ? AND seq < ? ORDER BY seq DESC LIMIT ?"

CLAIM_JOB = """
UPDATE jobs SET status = 'processing', attempts = attempts + 1,
       started_at = coalesce(started_at, ?1), updated_at = ?1
WHERE id = ?2 AND status = 'pending'
"""

# Fenced on the attempt: a worker whose claim was superseded cannot write.
ADD_IMAGE = """
UPDATE jobs SET images = json_insert(images, '$[#]', ?1), updated_at = ?2
WHERE id = ?3 AND status = 'processing' AND attempts = ?4 AND json_array_length(images) = ?5
"""

# A completed or canceled job shows no error, though an earlier attempt may have failed.
COMPLETE_JOB = """
UPDATE jobs SET status = 'completed', completed_at = ?1, updated_at = ?1,
       error_code = NULL, error_message = NULL, error_retryable = NULL
WHERE id = ?2 AND status = 'processing' AND attempts = ?3 AND json_array_length(images) = num_images
"""

FAIL_JOB = """
UPDATE jobs SET status = 'failed', error_code = ?1, error_message = ?2, error_retryable = ?6,
       completed_at = ?3, updated_at = ?3
WHERE id = ?4 AND status = 'processing' AND attempts = ?5
"""

# A retryable failure: back to pending with the error kept, to be claimed again after ?5.
RETRY_JOB = """
UPDATE jobs SET status = 'pending', error_code = ?1, error_message = ?2, error_retryable = 1,
       not_before = ?5, updated_at = ?3
WHERE id = ?4 AND status = 'processing' AND attempts = ?6
"""

RELEASE_JOB = """
UPDATE jobs SET status = 'pending', updated_at = ?1
WHERE id = ?2 AND status = 'processing' AND attempts = ?3
"""

CANCEL_JOB = """
UPDATE jobs SET status = 'canceled', completed_at = ?1, updated_at = ?1,
       error_code = NULL, error_message = NULL, error_retryable = NULL
WHERE id = ?2 AND status IN ('pending', 'processing')
"""

# The row goes; its events stay (a stream replays the deletion) until retention prunes them.
DELETE_JOB = "DELETE FROM jobs WHERE id = ? AND status IN ('completed', 'failed', 'canceled')"
# A deleted job's idempotency keys go with it: a key may then create a job again.
DELETE_JOB_KEYS = "DELETE FROM idempotency_keys WHERE job_id = ?"

JOB_STATUS = "SELECT status FROM jobs WHERE id = ?"

# At start-up, a job found processing was running when the process died. One that has been
# running in max_recoveries crashes already is failed (a poison job), the rest are handed back.
FAIL_POISON_JOBS = """
UPDATE jobs SET status = 'failed', error_code = 'crashed_repeatedly', error_retryable = 0,
       error_message = 'The service stopped unexpectedly while drawing this job ' || (recoveries + 1)
                       || ' times; it is not tried again.',
       recoveries = recoveries + 1, completed_at = ?1, updated_at = ?1
WHERE status = 'processing' AND recoveries + 1 >= ?2
RETURNING id
"""
RECOVER_JOBS = """
UPDATE jobs SET status = 'pending', recoveries = recoveries + 1, updated_at = ?
WHERE status = 'processing'
RETURNING id
"""

PENDING_JOBS = "SELECT id, seq, not_before FROM jobs WHERE status = 'pending' ORDER BY seq"

IDEMPOTENCY_KEY = "SELECT request_hash, job_id FROM idempotency_keys WHERE key = ?"
INSERT_IDEMPOTENCY_KEY = "INSERT INTO idempotency_keys (key, request_hash, job_id, created_at) VALUES (?, ?, ?, ?)"
PRUNE_IDEMPOTENCY_KEYS = "DELETE FROM idempotency_keys WHERE created_at < ?"

# What an event row is read as. The job's seq and status are pulled out of the snapshot by
# SQLite, so the service can keep its queue index without parsing every snapshot in Python.
EVENT_COLUMNS = (
    "seq, name, job_id, job, json_extract(job, '$.seq') AS job_seq, json_extract(job, '$.status') AS status"
)

# The event for a change just made to job ?2, with the job row as it now is: the snapshot is
# built by SQLite in the same transaction, so it is exactly what was committed.
_SNAPSHOT = """json_object(
           'seq', seq, 'id', id, 'status', status, 'num_images', num_images, 'animal', animal,
           'prompt', prompt, 'images', images, 'attempts', attempts, 'error_code', error_code,
           'error_message', error_message, 'error_retryable', error_retryable,
           'created_at', created_at, 'updated_at', updated_at, 'started_at', started_at,
           'completed_at', completed_at)"""
INSERT_EVENT = f"""
INSERT INTO events (job_id, name, job, created_at)
SELECT id, ?1, {_SNAPSHOT}, updated_at
FROM jobs WHERE id = ?2
RETURNING {EVENT_COLUMNS}
"""

# Many new jobs, and then their job.created events, in one statement each (a group commit's
# creates): the VALUES rows are appended. jobs._NewJob writes those snapshots itself, with
# _SNAPSHOT's keys in its order (tests/test_db.py checks they agree).
INSERT_JOBS = "INSERT INTO jobs (id, num_images, animal, prompt, created_at, updated_at) VALUES "
INSERT_JOBS_ROW = "(?, ?, ?, ?, ?, ?)"
INSERT_EVENTS = "INSERT INTO events (job_id, name, job, created_at) VALUES "
INSERT_EVENTS_ROW = "(?, ?, ?, ?)"

# Replay pages: events after an id, in commit order.
EVENTS_AFTER = f"SELECT {EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?"
JOB_EVENTS_AFTER = f"SELECT {EVENT_COLUMNS} FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?"
LATEST_JOB_EVENT = f"SELECT {EVENT_COLUMNS} FROM events WHERE job_id = ? ORDER BY seq DESC LIMIT 1"

# What a resuming client can be given: ids above `pruned` and up to `latest`.
EVENT_HORIZON = """
SELECT (SELECT coalesce(max(seq), 0) FROM events) AS latest,
       coalesce((SELECT value FROM meta WHERE key = 'events_pruned_through'), 0) AS pruned
"""

# Keep the newest `retention` events; remember the highest id deleted, so resuming below it
# is known to have missed events even once the table is empty.
PRUNE_EVENTS = "DELETE FROM events WHERE seq <= ?"
SET_PRUNED_THROUGH = """
INSERT INTO meta (key, value) VALUES ('events_pruned_through', ?1)
ON CONFLICT (key) DO UPDATE SET value = max(value, ?1)
"""


# --- connections ---------------------------------------------------------------------------


async def _connect(path: Path) -> aiosqlite.Connection:
    # isolation_level=None: autocommit mode, so transactions are exactly the BEGINs we issue.
    conn = await aiosqlite.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    await conn.execute("PRAGMA synchronous = FULL")
    await conn.execute("PRAGMA busy_timeout = 5000")
    await conn.execute("PRAGMA foreign_keys = ON")
    return conn


async def _on_connection_thread(conn: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run `fn(sqlite3_connection)` on the aiosqlite connection's own thread, as one call.

    aiosqlite's public methods each make one trip to its thread and back through the event
    loop; a batch of writes made that way costs two trips per write, each waiting its turn on
    a busy loop (measured: ~250 us per create, capping creates near 4,000/s). `_execute` is
    the method those public methods use; aiosqlite is pinned, and every test exercises this.
    """
    return await conn._execute(lambda: fn(conn._conn))


class _Pending:
    """A queued write and the future its caller awaits."""

    __slots__ = ("op", "finish", "future")

    def __init__(self, op: WriteOp[Any], finish: Callable[[Any], Any] | None, future: asyncio.Future[Any]) -> None:
        self.op = op
        self.finish = finish
        self.future = future


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

    async def write(self, op: WriteOp[Any], finish: Callable[[Any], T] | None = None) -> T:
        """Run `op(connection)` in the next group commit; once committed, return its result,
        passed through `finish` on the event loop if given (the after-commit hooks see the same).

        `op` runs on the writer's thread inside the batch's transaction: it must only run SQL
        and stay short (no awaiting, no I/O besides the database). The caller may be cancelled
        while waiting; the write still happens, as a unit.
        """
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(op, finish, future))
        # A cancelled caller cancels only this future; the op stays queued and commits, and
        # the writer skips resolving a future that is already done.
        return await future

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
            ops = [item.op for item in batch]
            try:
                outcomes = await _on_connection_thread(self._writer, lambda conn: _commit(conn, ops))
            except Exception as exc:
                # Only a broken connection gets here: fail the callers, keep the writer alive.
                log.exception("write batch failed")
                outcomes = [(False, exc)] * len(batch)
            outcomes = [_finish(item, ok, result) for item, (ok, result) in zip(batch, outcomes, strict=True)]
            committed = [result for ok, result in outcomes if ok]
            if committed:
                for hook in self.after_commit:
                    try:
                        hook(committed)
                    except Exception:
                        log.exception("after-commit hook failed")
            for item, (ok, result) in zip(batch, outcomes, strict=True):
                if not item.future.done():
                    if ok:
                        item.future.set_result(result)
                    else:
                        item.future.set_exception(result)
                self._queue.task_done()


def _finish(item: _Pending, ok: bool, result: Any) -> tuple[bool, Any]:
    if not ok or item.finish is None:
        return ok, result
    try:
        return True, item.finish(result)
    except Exception as exc:  # committed, but its result could not be read: the caller hears of it
        log.exception("reading a committed write's result failed")
        return False, exc


def _run(conn: sqlite3.Connection, ops: list[WriteOp[Any]]) -> list[Any]:
    """Run the ops in order. Consecutive ops that share a `run_together` function (say, creates)
    run through it as one group: one statement for all of them instead of a few each, which
    matters because every statement is a trip through the GIL the event loop is busy with."""
    results: list[Any] = []
    start = 0
    while start < len(ops):
        together = getattr(ops[start], "run_together", None)
        end = start + 1
        while together is not None and end < len(ops) and getattr(ops[end], "run_together", None) is together:
            end += 1
        results.extend(together(conn, ops[start:end]) if together else [ops[start](conn)])
        start = end
    return results


def _commit(conn: sqlite3.Connection, ops: list[WriteOp[Any]]) -> list[tuple[bool, Any]]:
    """On the writer thread: every op in one transaction and one commit (one fsync).

    If any op fails, the batch is rolled back and each op is retried in a transaction of its
    own, so only the faulty one fails. Returns (committed, result or exception) per op.
    """
    try:
        conn.execute("BEGIN IMMEDIATE")
        results = _run(conn, ops)
        conn.commit()
        return [(True, result) for result in results]
    except Exception as exc:
        if conn.in_transaction:
            conn.rollback()
        if len(ops) == 1:
            return [(False, exc)]
    return [_commit(conn, [op])[0] for op in ops]


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
