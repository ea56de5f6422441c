"""The SQLite job store: one group-committing writer, a reader connection, and every SQLite SQL string.

Writes are small functions ("write ops") that run on the writer's own connection. The writer
task takes every op that is queued, runs them all inside one BEGIN IMMEDIATE transaction on the
connection's thread in a single call, commits once (one fsync under synchronous=FULL for the
whole batch), publishes the batch's events to the feed, and only then resolves each caller.
Reads use a separate connection and never wait behind the writer: WAL lets them see the last
committed state while a write is in progress.

One process owns the file, so the feed is fed straight from the commits (feed_is_synchronous)
and a starting process may treat every processing job as abandoned.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import aiosqlite

from ..errors import StartupError, StorageFull
from ..feed import Feed
from ..models import Job, JobStatus, now_text
from . import Idempotency, JobEvent, KeyReused, NewJob, PendingJob, events_query, list_query
from .sqlite_deliveries import INSERT_WEBHOOK, PRUNE_DELIVERIES, PRUNE_WEBHOOKS, SQLiteDeliveries

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
# A write: runs on the writer's thread, inside the batch's transaction. Returns raw values;
# the op's `finish` turns them into (result, events) on the event loop after the commit.
WriteOp = Callable[[sqlite3.Connection], Any]
Finish = Callable[[Any], tuple[Any, Sequence[JobEvent]]]

# Version 1 is the top-level schema.sql, read through imagegen/store/schema.sql (a symlink to it in
# a checkout, a copy in an installed wheel); each later version is one file in migrations/sqlite.
SCHEMA_V1 = Path(__file__).resolve().parent / "schema.sql"
MIGRATIONS = Path(__file__).resolve().parent / "migrations" / "sqlite"

# Upper bound on ops in one transaction, so one huge burst cannot hold the write lock for long.
MAX_BATCH = 512

# --- queries -------------------------------------------------------------------------------

SELECT_JOB = "SELECT * FROM jobs WHERE id = ?"

# Newest first; seq is the cursor, so rows inserted while a client walks the list never shift it.
# By (owner?, status?): with auth on a client sees only its own jobs (jobs_owner_seq).
LIST_JOBS = {
    (False, False): "SELECT * FROM jobs WHERE seq < ? ORDER BY seq DESC LIMIT ?",
    (False, True): "SELECT * FROM jobs WHERE status = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
    (True, False): "SELECT * FROM jobs WHERE owner = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
    (True, True): "SELECT * FROM jobs WHERE owner = ? AND status = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
}

CLAIM_JOB = """
UPDATE jobs SET status = 'processing', attempts = attempts + 1, lease_owner = ?3,
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
UPDATE jobs SET status = 'completed', completed_at = ?1, updated_at = ?1, lease_owner = NULL,
       error_code = NULL, error_message = NULL, error_retryable = NULL
WHERE id = ?2 AND status = 'processing' AND attempts = ?3 AND json_array_length(images) = num_images
"""

FAIL_JOB = """
UPDATE jobs SET status = 'failed', error_code = ?1, error_message = ?2, error_retryable = ?6,
       completed_at = ?3, updated_at = ?3, lease_owner = NULL
WHERE id = ?4 AND status = 'processing' AND attempts = ?5
"""

# A retryable failure: back to pending with the error kept, to be claimed again after ?5.
RETRY_JOB = """
UPDATE jobs SET status = 'pending', error_code = ?1, error_message = ?2, error_retryable = 1,
       not_before = ?5, updated_at = ?3, lease_owner = NULL
WHERE id = ?4 AND status = 'processing' AND attempts = ?6
"""

RELEASE_JOBS = """
UPDATE jobs SET status = 'pending', updated_at = ?1, lease_owner = NULL
WHERE status = 'processing' AND lease_owner = ?2
RETURNING id
"""

CANCEL_JOB = """
UPDATE jobs SET status = 'canceled', completed_at = ?1, updated_at = ?1, lease_owner = NULL,
       error_code = NULL, error_message = NULL, error_retryable = NULL
WHERE id = ?2 AND status IN ('pending', 'processing')
"""

# The row goes; its events stay (a stream replays the deletion) until retention prunes them.
DELETE_JOB = "DELETE FROM jobs WHERE id = ? AND status IN ('completed', 'failed', 'canceled')"
# A deleted job's idempotency keys go with it: a key may then create a job again.
DELETE_JOB_KEYS = "DELETE FROM idempotency_keys WHERE job_id = ?"

JOB_STATUS = "SELECT status FROM jobs WHERE id = ?"

# Retention: the terminal jobs that ended longest ago first (jobs_completed_at).
EXPIRED_JOBS = """
SELECT id FROM jobs WHERE completed_at < ? AND status IN ('completed', 'failed', 'canceled')
ORDER BY completed_at LIMIT ?
"""

# At start-up, a job found processing was running when the process died. One that has been
# running in max_recoveries crashes already is failed (a poison job), the rest are handed back.
FAIL_POISON_JOBS = """
UPDATE jobs SET status = 'failed', error_code = 'crashed_repeatedly', error_retryable = 0,
       error_message = 'The service stopped unexpectedly while drawing this job ' || (recoveries + 1)
                       || ' times; it is not tried again.',
       recoveries = recoveries + 1, completed_at = ?1, updated_at = ?1, lease_owner = NULL
WHERE status = 'processing' AND recoveries + 1 >= ?2
RETURNING id
"""
RECOVER_JOBS = """
UPDATE jobs SET status = 'pending', recoveries = recoveries + 1, updated_at = ?, lease_owner = NULL
WHERE status = 'processing'
RETURNING id
"""

PENDING_JOBS = "SELECT id, seq, not_before, owner FROM jobs WHERE status = 'pending' ORDER BY seq"

# Keys are per tenant ('' with auth off): two tenants' equal keys are two keys.
IDEMPOTENCY_KEY = "SELECT request_hash, job_id FROM idempotency_keys WHERE owner = ? AND key = ?"
INSERT_IDEMPOTENCY_KEY = (
    "INSERT INTO idempotency_keys (owner, key, request_hash, job_id, created_at) VALUES (?, ?, ?, ?, ?)"
)
PRUNE_IDEMPOTENCY_KEYS = "DELETE FROM idempotency_keys WHERE created_at < ?"

# What an event row is read as. The job's seq and status are pulled out of the snapshot by
# SQLite, so the service can keep its queue index without parsing every snapshot in Python.
EVENT_COLUMNS = (
    "seq, name, job_id, job, json_extract(job, '$.seq') AS job_seq, json_extract(job, '$.status') AS status, "
    "json_extract(job, '$.owner') AS owner"
)

# The event for a change just made to job ?2, with the job row as it now is: the snapshot is
# built by SQLite in the same transaction, so it is exactly what was committed.
_SNAPSHOT = """json_object(
           'seq', seq, 'id', id, 'status', status, 'num_images', num_images, 'animal', animal,
           'prompt', prompt, 'images', images, 'attempts', attempts, 'error_code', error_code,
           'error_message', error_message, 'error_retryable', error_retryable,
           'created_at', created_at, 'updated_at', updated_at, 'started_at', started_at,
           'completed_at', completed_at, 'not_before', not_before, 'owner', owner)"""
INSERT_EVENT = f"""
INSERT INTO events (job_id, name, job, created_at)
SELECT id, ?1, {_SNAPSHOT}, updated_at
FROM jobs WHERE id = ?2
RETURNING {EVENT_COLUMNS}
"""

# Many new jobs, and then their job.created events, in one statement each (a group commit's
# creates): the VALUES rows are appended. _created_snapshot writes those snapshots itself, with
# _SNAPSHOT's keys in its order (tests/test_db.py checks they agree).
INSERT_JOBS = "INSERT INTO jobs (id, num_images, animal, prompt, created_at, updated_at, owner) VALUES "
INSERT_JOBS_ROW = "(?, ?, ?, ?, ?, ?, ?)"
INSERT_EVENTS = "INSERT INTO events (job_id, name, job, created_at) VALUES "
INSERT_EVENTS_ROW = "(?, ?, ?, ?)"

# Replay pages: events after an id, in commit order.
EVENTS_AFTER = {
    "all": f"SELECT {EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
    "job": f"SELECT {EVENT_COLUMNS} FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
    # One tenant's (auth on): the owner is read from the snapshot, as EVENT_COLUMNS does.
    "owner": f"SELECT {EVENT_COLUMNS} FROM events WHERE json_extract(job, '$.owner') = ? AND seq > ? "
             "ORDER BY seq LIMIT ?",
}
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

# The readiness check's write: one row of meta, the Unix time in milliseconds of the last check.
HEALTH_CHECK = """
INSERT INTO meta (key, value) VALUES ('health_checked_at', ?1)
ON CONFLICT (key) DO UPDATE SET value = ?1
"""

# For /metrics, at scrape time (both through jobs_status_seq).
JOB_COUNTS = "SELECT status, count(*) AS n FROM jobs GROUP BY status"
OLDEST_PENDING = "SELECT created_at FROM jobs WHERE status = 'pending' ORDER BY seq LIMIT 1"


# --- connections and migrations --------------------------------------------------------------


async def _connect(path: Path) -> aiosqlite.Connection:
    # isolation_level=None: autocommit mode, so transactions are exactly the BEGINs we issue.
    conn = await aiosqlite.connect(path, isolation_level=None)
    # Closed on any failure: an open connection's thread would keep the process alive.
    try:
        conn.row_factory = sqlite3.Row
        await conn.execute("PRAGMA synchronous = FULL")
        await conn.execute("PRAGMA busy_timeout = 5000")
        await conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        await conn.close()
        raise
    return conn


def migrations() -> list[tuple[int, str]]:
    """Every schema version with the script that makes it from the one before, in order."""
    steps = [(1, SCHEMA_V1.read_text(encoding="utf-8"))]
    for path in sorted(MIGRATIONS.glob("*.sql")):
        steps.append((int(path.name.split("_", 1)[0]), path.read_text(encoding="utf-8")))
    assert [version for version, _ in steps] == list(range(1, len(steps) + 1)), "migrations must be 1, 2, 3, ..."
    return steps


def _migrate(conn: sqlite3.Connection) -> int:
    """Bring the database to the newest schema version, under SQLite's write lock.

    PRAGMA user_version counts the versions applied. A database made by the first release
    says 0 but has the version-1 tables (schema.sql is idempotent, so applying it is safe).
    """
    conn.execute("PRAGMA journal_mode = WAL")  # cannot change inside a transaction
    steps = migrations()
    conn.execute("BEGIN IMMEDIATE")  # a second process migrating waits here, then finds it done
    try:
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        if current > len(steps):
            raise StartupError(
                f"the database is at schema version {current}, newer than this release knows ({len(steps)}): "
                "run the newer release, or restore a backup"
            )
        for version, script in steps[current:]:
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
        # Written even when nothing was to migrate: it proves the file writable at start-up
        # (SQLite opens a read-only file read-only without a word, and the first write fails).
        conn.execute(f"PRAGMA user_version = {len(steps)}")
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return len(steps)


def _statements(script: str) -> list[str]:
    """The statements of a migration script (executescript would commit our transaction)."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip() and not buffer.strip().upper().startswith("PRAGMA JOURNAL_MODE"):
                statements.append(buffer)
            buffer = ""
    return statements


async def _on_connection_thread(conn: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run `fn(sqlite3_connection)` on the aiosqlite connection's own thread, as one call.

    aiosqlite's public methods each make one trip to its thread and back through the event
    loop; a batch of writes made that way costs two trips per write, each waiting its turn on
    a busy loop (measured: ~250 us per create, capping creates near 4,000/s). `_execute` is
    the method those public methods use; aiosqlite is pinned, and every test exercises this.
    """
    return await conn._execute(lambda: fn(conn._conn))


# --- the data directory's lock and the database file ----------------------------------------

LOCK_FILE = "imagegen.lock"


def _lock_data_dir(data_dir: Path) -> IO[bytes]:
    """Create `data_dir` if needed and take its exclusive lock, with this process's pid in it.

    The lock is held for the store's life (the kernel drops it when the process dies, even by
    kill -9): a second process on the same data directory would take over the first one's
    running jobs as abandoned, so it is refused, naming the owner.
    """
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create the data directory {data_dir}: {exc.strerror or exc}") from None
    path = data_dir / LOCK_FILE
    try:
        # Not truncated on open: the owner's pid must stay readable until we hold the lock.
        lock = open(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+b")
    except OSError as exc:
        raise StartupError(
            f"cannot write in the data directory {data_dir}: {exc.strerror or exc}"
        ) from None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = lock.read(32).decode("ascii", "replace").strip()
            who = f" (pid {owner})" if owner.isdigit() else ""
            raise StartupError(
                f"the data directory {data_dir} is in use by another imagegen process{who}: on SQLite one "
                "process owns it; stop that one, or give this one another storage.data_dir"
            ) from None
        try:
            lock.truncate(0)
            lock.write(f"{os.getpid()}\n".encode())
            lock.flush()
        except OSError as exc:
            raise StartupError(
                f"cannot write in the data directory {data_dir}: {exc.strerror or exc}"
            ) from None
    except BaseException:
        lock.close()
        raise
    return lock


def _create_if_missing(path: Path) -> None:
    """Make a new, migrated database at `path` if there is none, atomically.

    Built under a temporary name and renamed into place, so that a file at `path` is always a
    database this service finished making: an empty file there (truncated by accident, say)
    is then refused instead of being taken for a new database while the jobs are lost.
    """
    if path.exists():
        if path.stat().st_size == 0:
            raise StartupError(
                f"the database {path} is an empty file (0 bytes), not a database: restore a backup, "
                "or move it away to start with a new database"
            )
        return
    tmp = path.with_name(path.name + ".new")
    for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
        leftover.unlink(missing_ok=True)  # from a start that died while creating it
    conn = sqlite3.connect(tmp, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = FULL")
        _migrate(conn)
    finally:
        conn.close()  # the last connection: the WAL is checkpointed into the file and removed
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)


def _database_problem(path: Path, exc: sqlite3.Error) -> str:
    message = str(exc)
    if "readonly" in message or "read-only" in message:
        return f"cannot write the database {path}: {message}"
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
        # "file is not a database", "database disk image is malformed": corrupt or truncated.
        return (
            f"the database {path} is unreadable ({message}): it is corrupt or not an imagegen database; "
            "restore a backup, or move it away to start with a new database"
        )
    return f"cannot open the database {path}: {message}"


# --- the group-committing writer ------------------------------------------------------------


class _Pending:
    """A queued write and the future its caller awaits; `frees`: it may use the disk reserve."""

    __slots__ = ("op", "finish", "future", "frees")

    def __init__(self, op: WriteOp, finish: Finish, future: asyncio.Future[Any], frees: bool = False) -> None:
        self.op = op
        self.finish = finish
        self.future = future
        self.frees = frees


# --- a full disk -------------------------------------------------------------------------------

# A file of this size is kept beside the database while there is room, and removed when the disk
# fills up, as databases keep a reserve: the writes that free space (a delete, retention) then
# still commit, while every other write is refused with StorageFull until space returns.
RESERVE_FILE = "imagegen.reserve"
RESERVE_BYTES = 1024 * 1024
# Taken again only with this much free beyond it, so it is not taken and released in turn.
RESERVE_HEADROOM = RESERVE_BYTES


def _disk_full(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def _hold_reserve(path: Path) -> bool:
    """Create the reserve file if it is missing and the disk has room for it; whether it is held."""
    if path.exists():
        return True
    if shutil.disk_usage(path.parent).free < RESERVE_HEADROOM + RESERVE_BYTES:
        return False
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as file:
            file.write(b"\0" * RESERVE_BYTES)  # written, not sparse: the space must really be taken
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    return True


def _release_reserve(path: Path) -> bool:
    """Remove the reserve file; whether there was one to free."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _no_events(result: Any) -> tuple[Any, Sequence[JobEvent]]:
    return result, ()


def _event_rows(rows: list[Any]) -> tuple[JobEvent | None, Sequence[JobEvent]]:
    events = [_event(row) for row in rows]
    return (events[0] if events else None), events


def _event_list(rows: list[Any]) -> tuple[list[JobEvent], Sequence[JobEvent]]:
    events = [_event(row) for row in rows]
    return events, events


def _event(row: Any) -> JobEvent:
    return JobEvent(row["seq"], row["name"], row["job_id"], row["job"], row["job_seq"], row["status"], row["owner"])


class SQLiteStore(SQLiteDeliveries):
    """The service's SQLite file: writes are group-committed, reads never wait on them."""

    backend = "sqlite"
    feed_is_synchronous = True

    def __init__(
        self, writer: aiosqlite.Connection, reader: aiosqlite.Connection, feed: Feed, lock: IO[bytes],
        metrics: Metrics | None = None,
    ) -> None:
        self._writer = writer
        self._lock = lock
        self._reader = reader
        self._feed = feed
        self._metrics = metrics
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._reserve = Path(RESERVE_FILE)  # beside the database: set by open()
        self._reserve_held = False
        self._next_reserve_try = 0.0

    @classmethod
    async def open(cls, path: Path, feed: Feed, metrics: Metrics | None = None) -> SQLiteStore:
        """Open (creating if needed) the database at `path` and migrate it to the newest schema.

        Holds the data directory's lock (imagegen.lock) until close: one process owns the file.
        Every failure is a StartupError in one line, with nothing left open.
        """
        lock = await asyncio.to_thread(_lock_data_dir, path.parent)
        writer = reader = None
        reserve = path.parent / RESERVE_FILE
        try:
            try:
                # A start on a full disk must still write (the migration check, the WAL): the
                # reserve makes that room, and is taken again once there is space.
                await asyncio.to_thread(_release_reserve, reserve)
                await asyncio.to_thread(_create_if_missing, path)
                writer = await _connect(path)
                await _on_connection_thread(writer, _migrate)
                reader = await _connect(path)
                store = cls(writer, reader, feed, lock, metrics)
                store._reserve = reserve
                store._reserve_held = await asyncio.to_thread(_hold_reserve, reserve)
                latest, _ = await store.horizon()
            except sqlite3.Error as exc:
                raise StartupError(_database_problem(path, exc)) from None
            except OSError as exc:
                raise StartupError(f"cannot open the database {path}: {exc.strerror or exc}") from None
        except BaseException:
            for conn in (reader, writer):
                if conn is not None:
                    await conn.close()
            lock.close()
            raise
        feed.last_seq = latest
        store._task = asyncio.create_task(store._write_loop(), name="imagegen-db-writer")
        return store

    async def close(self) -> None:
        """Finish every queued write, then close both connections and release the lock."""
        try:
            if self._task is not None:
                await self._queue.join()
                self._task.cancel()
                try:
                    await self._task
                except asyncio.CancelledError:
                    pass
        finally:
            try:
                await self._reader.close()
                await self._writer.close()
            finally:
                self._lock.close()  # closing the file releases the flock

    async def _write(self, op: WriteOp, finish: Finish = _no_events, frees: bool = False) -> Any:
        """Run `op(connection)` in the next group commit; once committed, return its result
        as `finish` makes it on the event loop (the feed gets the events `finish` names).

        `op` runs on the writer's thread inside the batch's transaction: it must only run SQL
        and stay short. The caller may be cancelled while waiting; the write still happens,
        as a unit.
        """
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(op, finish, future, frees))
        # A cancelled caller cancels only this future; the op stays queued and commits, and
        # the writer skips resolving a future that is already done.
        return await future

    async def _fetch_one(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        # execute_fetchall is one trip to the connection's thread; execute + fetch + close would be three.
        rows = await self._reader.execute_fetchall(sql, params)
        return rows[0] if rows else None

    async def _fetch_all(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return list(await self._reader.execute_fetchall(sql, params))

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            # Whatever queued up while the previous batch was committing goes in this one.
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            ops = [item.op for item in batch]
            started = time.perf_counter()
            try:
                outcomes = await _on_connection_thread(self._writer, lambda conn: _commit(conn, ops))
                outcomes = await self._when_full(batch, outcomes)
            except Exception as exc:
                # Only a broken connection gets here: fail the callers, keep the writer alive.
                log.exception("write batch failed")
                outcomes = [(False, exc)] * len(batch)
            finished = [_finish(item, ok, raw) for item, (ok, raw) in zip(batch, outcomes, strict=True)]
            # The feed hears of the batch after its commit and before any caller does, so
            # anything kept from the feed is never older than what a caller was told.
            committed = [event for ok, _, events in finished if ok for event in events]
            self._feed.publish(committed)
            if self._metrics is not None:
                self._metrics.commit_duration.observe(time.perf_counter() - started)
                self._metrics.commit_batch.observe(len(batch))
                self._metrics.committed(committed)
            for item, (ok, result, _) in zip(batch, finished, strict=True):
                if not item.future.done():
                    if ok:
                        item.future.set_result(result)
                    else:
                        item.future.set_exception(result)
                self._queue.task_done()

    async def _when_full(self, batch: list[_Pending], outcomes: list[tuple[bool, Any]]) -> list[tuple[bool, Any]]:
        """The batch's outcomes once a full disk is dealt with: the writes that free space run
        again on the reserve, if it is held; the rest fail with StorageFull (503, retryable)."""
        full = [i for i, (ok, raw) in enumerate(outcomes) if not ok and _disk_full(raw)]
        if not full:
            if not self._reserve_held and time.monotonic() >= self._next_reserve_try:
                self._next_reserve_try = time.monotonic() + 1.0
                self._reserve_held = await asyncio.to_thread(_hold_reserve, self._reserve)
            return outcomes
        outcomes = list(outcomes)
        freeing = [i for i in full if batch[i].frees]
        if freeing and await asyncio.to_thread(_release_reserve, self._reserve):
            log.warning("the disk is full: released the %d MiB reserve so that jobs can end and be deleted",
                        RESERVE_BYTES // 2**20)
            self._reserve_held = False
            ops = [batch[i].op for i in freeing]
            for i, outcome in zip(freeing, await _on_connection_thread(self._writer, lambda conn: _commit(conn, ops))):
                outcomes[i] = outcome
        for i, (ok, raw) in enumerate(outcomes):
            if not ok and _disk_full(raw):
                outcomes[i] = (False, StorageFull())
        return outcomes

    # --- admission and reads ---------------------------------------------------------------

    async def create(
        self, new: NewJob, idempotency: Idempotency | None, max_pending: int | None, tenant_max_pending: int | None = None
    ) -> JobEvent | KeyReused:
        # The limits are enforced by the dispatcher's in-memory counts on SQLite (one process
        # sees every commit), not here: counting in the writer would slow every create.
        assert max_pending is None and tenant_max_pending is None, "SQLite admission is counted in memory"
        owner = new.owner or ""
        op: WriteOp = _NewJob(new)
        if idempotency is not None:
            new_job = op

            def op(conn: sqlite3.Connection) -> Any:
                used = conn.execute(IDEMPOTENCY_KEY, (owner, idempotency.key)).fetchone()
                if used is not None:
                    return KeyReused(used["job_id"], used["request_hash"] == idempotency.request_hash)
                conn.execute(
                    INSERT_IDEMPOTENCY_KEY, (owner, idempotency.key, idempotency.request_hash, new.job_id, new.now)
                )
                return new_job(conn)

        return await self._write(op, _created)

    async def idempotency_key_job(self, key: str, owner: str | None) -> str | None:
        row = await self._fetch_one(IDEMPOTENCY_KEY, (owner or "", key))
        return None if row is None else row["job_id"]

    async def get(self, job_id: str) -> Job | None:
        row = await self._fetch_one(SELECT_JOB, (job_id,))
        return None if row is None else Job.from_row(row)

    async def list(self, below_seq: int, limit: int, status: JobStatus | None, owner: str | None = None) -> list[Job]:
        rows = await self._fetch_all(*list_query(LIST_JOBS, below_seq, limit, status, owner))
        return [Job.from_row(row) for row in rows]

    async def job_counts(self) -> tuple[dict[str, int], str | None]:
        rows = await self._fetch_all(JOB_COUNTS)
        oldest = await self._fetch_one(OLDEST_PENDING)
        return {row["status"]: row["n"] for row in rows}, (None if oldest is None else oldest["created_at"])

    async def check_write(self) -> None:
        # Through the group-committing writer like every write: it proves the writer alive too.
        now_ms = time.time_ns() // 1_000_000

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(HEALTH_CHECK, (now_ms,))

        await self._write(op)

    async def pending(self) -> tuple[list[PendingJob], int]:
        def read(conn: sqlite3.Connection) -> tuple[list[Any], int]:
            conn.execute("BEGIN")  # one snapshot for both reads
            try:
                return conn.execute(PENDING_JOBS).fetchall(), conn.execute(EVENT_HORIZON).fetchone()["latest"]
            finally:
                conn.execute("COMMIT")

        rows, latest = await _on_connection_thread(self._reader, read)
        return [PendingJob(row["id"], row["seq"], row["not_before"], row["owner"]) for row in rows], latest

    # --- the workers' side -----------------------------------------------------------------

    async def claim(self, job_id: str, owner: str, lease_s: float) -> JobEvent | None:
        # One process owns the file, so no lease can lapse while it runs: the owner is kept
        # only to say which process drew the job.
        return await self._change("job.processing", job_id, CLAIM_JOB, (now_text(), job_id, owner))

    async def add_image(self, job: Job, path: str, owner: str) -> JobEvent | None:
        params = (path, now_text(), job.job_id, job.attempts, len(job.images))
        return await self._change("job.progress", job.job_id, ADD_IMAGE, params)

    async def complete(self, job: Job, owner: str) -> JobEvent | None:
        params = (now_text(), job.job_id, job.attempts)
        return await self._change("job.completed", job.job_id, COMPLETE_JOB, params)

    async def fail(self, job: Job, code: str, message: str, retryable: bool, owner: str) -> JobEvent | None:
        params = (code, message, now_text(), job.job_id, job.attempts, int(retryable))
        return await self._change("job.failed", job.job_id, FAIL_JOB, params)

    async def retry(self, job: Job, code: str, message: str, not_before: str, owner: str) -> JobEvent | None:
        params = (code, message, now_text(), job.job_id, not_before, job.attempts)
        return await self._change("job.retrying", job.job_id, RETRY_JOB, params)

    async def release_all(self, owner: str) -> list[JobEvent]:
        def release(conn: sqlite3.Connection) -> list[Any]:
            rows = []
            for (job_id,) in conn.execute(RELEASE_JOBS, (now_text(), owner)).fetchall():
                rows += conn.execute(INSERT_EVENT, ("job.requeued", job_id)).fetchall()
            return rows

        return await self._write(release, _event_list)

    async def heartbeat(self, job_ids: list[str], owner: str, lease_s: float) -> int:
        return 0  # no leases: nobody else could take this process's jobs

    async def recover(self, max_recoveries: int) -> list[JobEvent]:
        def recover_all(conn: sqlite3.Connection) -> list[Any]:
            now = now_text()
            rows = []
            for (job_id,) in conn.execute(FAIL_POISON_JOBS, (now, max_recoveries)).fetchall():
                rows += conn.execute(INSERT_EVENT, ("job.failed", job_id)).fetchall()
            for (job_id,) in conn.execute(RECOVER_JOBS, (now,)).fetchall():
                rows += conn.execute(INSERT_EVENT, ("job.requeued", job_id)).fetchall()
            return rows

        return await self._write(recover_all, _event_list)

    # --- control ---------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> JobEvent | None:
        return await self._change("job.canceled", job_id, CANCEL_JOB, (now_text(), job_id))

    async def delete(self, job_id: str) -> JobEvent | JobStatus | None:
        def op(conn: sqlite3.Connection) -> Any:
            row = conn.execute(JOB_STATUS, (job_id,)).fetchone()
            if row is None or JobStatus(row["status"]) not in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED):
                return None if row is None else JobStatus(row["status"])
            # The event carries the job as it was, so it is written before the row goes.
            rows = conn.execute(INSERT_EVENT, ("job.deleted", job_id)).fetchall()
            conn.execute(DELETE_JOB, (job_id,))
            conn.execute(DELETE_JOB_KEYS, (job_id,))
            return rows

        return await self._write(op, lambda r: _event_rows(r) if isinstance(r, list) else (r, ()), frees=True)

    async def expire(self, completed_before: str, limit: int) -> list[JobEvent]:
        def op(conn: sqlite3.Connection) -> list[Any]:
            rows = []
            for (job_id,) in conn.execute(EXPIRED_JOBS, (completed_before, limit)).fetchall():
                # As a DELETE does it: the event carries the job as it was, so it goes first.
                rows += conn.execute(INSERT_EVENT, ("job.deleted", job_id)).fetchall()
                conn.execute(DELETE_JOB, (job_id,))
                conn.execute(DELETE_JOB_KEYS, (job_id,))
            return rows

        return await self._write(op, _event_list, frees=True)

    async def existing(self, job_ids: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(job_ids), 500):  # below SQLite's limit on parameters
            chunk = job_ids[start:start + 500]
            sql = f"SELECT id FROM jobs WHERE id IN ({', '.join('?' * len(chunk))})"
            found.update(row["id"] for row in await self._fetch_all(sql, tuple(chunk)))
        return found

    async def _change(self, name: str, job_id: str, sql: str, params: tuple[Any, ...], frees: bool = False) -> JobEvent | None:
        return await self._write(_event_op(name, job_id, sql, params), _event_rows, frees)

    # --- the event log ---------------------------------------------------------------------

    async def events_after(
        self, seq: int, job_id: str | None, limit: int, owner: str | None = None
    ) -> list[JobEvent]:
        rows = await self._fetch_all(*events_query(EVENTS_AFTER, seq, limit, job_id, owner))
        return [_event(row) for row in rows]

    async def latest_event(self, job_id: str) -> JobEvent | None:
        row = await self._fetch_one(LATEST_JOB_EVENT, (job_id,))
        return None if row is None else _event(row)

    async def horizon(self) -> tuple[int, int]:
        row = await self._fetch_one(EVENT_HORIZON)
        assert row is not None
        return row["latest"], row["pruned"]

    async def prune(self, keep_events: int, keys_before: str) -> int:
        latest, _ = await self.horizon()
        cutoff = latest - keep_events

        def op(conn: sqlite3.Connection) -> int:
            if cutoff > 0:
                conn.execute(PRUNE_EVENTS, (cutoff,))
                conn.execute(SET_PRUNED_THROUGH, (cutoff,))
            conn.execute(PRUNE_IDEMPOTENCY_KEYS, (keys_before,))
            conn.execute(PRUNE_DELIVERIES)  # of jobs that are gone, once finished
            conn.execute(PRUNE_WEBHOOKS)
            return cutoff

        return await self._write(op, frees=True)


def _finish(item: _Pending, ok: bool, raw: Any) -> tuple[bool, Any, Sequence[JobEvent]]:
    if not ok:
        return False, raw, ()
    try:
        result, events = item.finish(raw)
        return True, result, events
    except Exception as exc:  # committed, but its result could not be read: the caller hears of it
        log.exception("reading a committed write's result failed")
        return False, exc, ()


def _run(conn: sqlite3.Connection, ops: list[WriteOp]) -> list[Any]:
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


def _commit(conn: sqlite3.Connection, ops: list[WriteOp]) -> list[tuple[bool, Any]]:
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


def _event_op(name: str, job_id: str, sql: str, params: tuple[Any, ...]) -> WriteOp:
    """A write op: one conditional statement on job `job_id`, its row count checked, and if it
    changed the row, the event `name` in the same transaction. Returns the raw event rows."""

    def op(conn: sqlite3.Connection) -> list[Any]:
        if conn.execute(sql, params).rowcount != 1:
            return []  # the condition did not hold (e.g. the job moved on): nothing happened
        return conn.execute(INSERT_EVENT, (name, job_id)).fetchall()

    return op


def _created(raw: Any) -> tuple[JobEvent | KeyReused, Sequence[JobEvent]]:
    if isinstance(raw, KeyReused):
        return raw, ()
    event = JobEvent(raw[0], "job.created", raw[1], raw[2], raw[3], "pending", raw[4])
    return event, (event,)


def _insert_jobs(conn: sqlite3.Connection, new_jobs: list[_NewJob]) -> list[tuple[int, str, str, int, str | None]]:
    """Insert many jobs and their job.created events, one statement each; each job's event
    as (seq, job id, snapshot, job seq, owner).

    This is the hot path of POST /generations, and the writer thread must win the GIL back from
    the busy event loop for every statement and every row it reads: so no RETURNING. The rows
    one INSERT makes get consecutive seqs, ending at lastrowid, and everything else in an event
    is known before the insert.
    """
    count = len(new_jobs)
    first_job = _last_rowid(conn.execute(
        INSERT_JOBS + ", ".join([INSERT_JOBS_ROW] * count),
        [value for new_job in new_jobs for value in new_job.params],
    )) - count + 1
    for new_job in new_jobs:
        if new_job.webhook is not None:  # before the events: their outbox trigger reads it
            hook = new_job.webhook
            conn.execute(INSERT_WEBHOOK, (new_job.params[0], new_job.params[6], hook.url, hook.host, hook.events_json))
    snapshots = [f'{{"seq":{first_job + i},{new_job.snapshot_tail}' for i, new_job in enumerate(new_jobs)]
    first_event = _last_rowid(conn.execute(
        INSERT_EVENTS + ", ".join([INSERT_EVENTS_ROW] * count),
        [
            value
            for new_job, snapshot in zip(new_jobs, snapshots, strict=True)
            for value in (new_job.params[0], "job.created", snapshot, new_job.params[4])
        ],
    )) - count + 1
    return [
        (first_event + i, new_job.params[0], snapshots[i], first_job + i, new_job.params[6])
        for i, new_job in enumerate(new_jobs)
    ]


def _last_rowid(cursor: sqlite3.Cursor) -> int:
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def created_snapshot_tail(new: NewJob) -> str:
    """A new job's snapshot after its seq, as _SNAPSHOT writes it (keys and order).

    Written out rather than json.dumps of a dict: this runs for every create, and only the
    free-text values need encoding (the id is a UUID, now a timestamp, num_images an int).
    """
    return (
        f'"id":"{new.job_id}","status":"pending","num_images":{int(new.num_images)},'
        f'"animal":{json.dumps(new.animal)},"prompt":{json.dumps(new.prompt)},"images":"[]","attempts":0,'
        f'"error_code":null,"error_message":null,"error_retryable":null,'
        f'"created_at":"{new.now}","updated_at":"{new.now}","started_at":null,"completed_at":null,'
        f'"not_before":null,"owner":{json.dumps(new.owner)}}}'
    )


class _NewJob:
    """The write op of a create; a group commit's many run as one (run_together)."""

    __slots__ = ("params", "snapshot_tail", "webhook")
    run_together = staticmethod(_insert_jobs)

    def __init__(self, new: NewJob) -> None:
        # INSERT_JOBS_ROW's values: id, num_images, animal, prompt, created_at, updated_at, owner
        self.params = (new.job_id, new.num_images, new.animal, new.prompt, new.now, new.now, new.owner)
        self.snapshot_tail = created_snapshot_tail(new)
        self.webhook = new.webhook

    def __call__(self, conn: sqlite3.Connection) -> tuple[int, str, str, int, str | None]:
        return _insert_jobs(conn, [self])[0]
