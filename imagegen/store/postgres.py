"""The PostgreSQL job store, for many processes on many machines: every PostgreSQL SQL string.

- Each change is one transaction on a pooled connection (psycopg 3 with psycopg-pool), shielded
  from the caller's cancellation so it commits or rolls back as a unit, as on SQLite.
- Event ids come from a one-row counter updated as the last statement of each writing
  transaction (see migrations/postgres/001_schema.sql), so commit order is id order on every
  node; the same statement NOTIFYs, delivered at commit.
- The feed of every node is filled from the events table by one reader task, woken by that
  NOTIFY (on its own listening connection), by this node's own commits, and by a short poll
  that covers a notification lost with a dropped connection.
- Workers claim the oldest runnable job with FOR UPDATE SKIP LOCKED and hold it under a lease
  that their node's heartbeat extends; results are fenced on the attempt and on a live lease.
- Maintenance (rescue, pruning) takes a transaction-scoped advisory lock, so one node at a
  time does each pass and a node dying mid-pass loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from ..config import StorageSettings
from ..errors import StartupError
from ..feed import Feed
from ..models import Job, JobStatus, now_text
from . import Idempotency, JobEvent, KeyReused, NewJob, PendingJob, QueueLimit

log = logging.getLogger(__name__)

T = TypeVar("T")
Connection = psycopg.AsyncConnection[dict[str, Any]]

MIGRATIONS = Path(__file__).resolve().parent / "migrations" / "postgres"
CHANNEL = "imagegen_events"

# Advisory lock keys (any bigint; these spell "imagegen" and a step).
MIGRATE_LOCK = 0x696D6167_656E0001
RESCUE_LOCK = 0x696D6167_656E0002
PRUNE_LOCK = 0x696D6167_656E0003

# How long the feed's reader waits for a wake-up before it looks anyway: what a notification
# lost with a dropped connection costs at most.
FEED_POLL_S = 0.5
# Events read per query by the feed's reader.
FEED_PAGE = 1000
CONNECT_TIMEOUT_S = 5

# --- queries -------------------------------------------------------------------------------

# The job row as an event's snapshot: the same keys, in the same order, as SQLite's.
_SNAPSHOT = """json_build_object(
    'seq', j.seq, 'id', j.id, 'status', j.status, 'num_images', j.num_images, 'animal', j.animal,
    'prompt', j.prompt, 'images', j.images, 'attempts', j.attempts, 'error_code', j.error_code,
    'error_message', j.error_message, 'error_retryable', j.error_retryable,
    'created_at', j.created_at, 'updated_at', j.updated_at, 'started_at', j.started_at,
    'completed_at', j.completed_at, 'not_before', j.not_before)::text"""

EVENT_COLUMNS = "seq, name, job_id, job, job_seq, status"

# The events of a transaction's changes, (job id, name) in order, with ids from the counter:
# the last statement of every writing transaction, so the counter's row lock is held for the
# shortest time (to commit). pg_notify is queued here and delivered at commit.
APPEND_EVENTS = f"""
WITH counter AS (
    UPDATE event_counter SET last = last + cardinality(%(job_ids)s::text[]) RETURNING last
), changes AS (
    SELECT * FROM unnest(%(job_ids)s::text[], %(names)s::text[]) WITH ORDINALITY AS c(job_id, name, n)
), notified AS (
    SELECT pg_notify('{CHANNEL}', '')
)
INSERT INTO events (seq, job_id, name, job, job_seq, status, created_at)
SELECT counter.last - cardinality(%(job_ids)s::text[]) + changes.n, j.id, changes.name, {_SNAPSHOT},
       j.seq, j.status, j.updated_at
FROM counter, notified, changes JOIN jobs j ON j.id = changes.job_id
RETURNING {EVENT_COLUMNS}
"""

# Taken first by a create: creates then run one at a time, so the pending count is exact.
LOCK_COUNTER = "SELECT last FROM event_counter FOR UPDATE"
PENDING_COUNT = "SELECT count(*) AS n FROM jobs WHERE status = 'pending'"
INSERT_JOB = """
INSERT INTO jobs (id, num_images, animal, prompt, created_at, updated_at)
VALUES (%(id)s, %(num_images)s, %(animal)s, %(prompt)s, %(now)s, %(now)s)
"""
IDEMPOTENCY_KEY = "SELECT request_hash, job_id FROM idempotency_keys WHERE key = %s"
INSERT_IDEMPOTENCY_KEY = "INSERT INTO idempotency_keys (key, request_hash, job_id, created_at) VALUES (%s, %s, %s, %s)"

SELECT_JOB = "SELECT * FROM jobs WHERE id = %s"
LIST_JOBS = "SELECT * FROM jobs WHERE seq < %s ORDER BY seq DESC LIMIT %s"
LIST_JOBS_BY_STATUS = "SELECT * FROM jobs WHERE status = %s AND seq < %s ORDER BY seq DESC LIMIT %s"
PENDING_JOBS = "SELECT id, seq, not_before FROM jobs WHERE status = 'pending' ORDER BY seq"
LAST_EVENT = "SELECT last FROM event_counter"

_LEASE = "lease_owner = %(owner)s, lease_expires_at = now() + make_interval(secs => %(lease_s)s)"

# The oldest runnable pending job, skipping rows another node is claiming this instant.
CLAIM_NEXT = f"""
UPDATE jobs SET status = 'processing', attempts = attempts + 1, {_LEASE},
       started_at = coalesce(started_at, %(now)s), updated_at = %(now)s
WHERE seq = (
    SELECT seq FROM jobs
    WHERE status = 'pending' AND (not_before IS NULL OR not_before <= %(now)s)
    ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED
)
RETURNING id
"""
CLAIM_JOB = f"""
UPDATE jobs SET status = 'processing', attempts = attempts + 1, {_LEASE},
       started_at = coalesce(started_at, %(now)s), updated_at = %(now)s
WHERE id = %(id)s AND status = 'pending'
"""

# Fenced on the attempt and on a live lease of this node: a node that was paused past its
# lease cannot write, even before another node has rescued the job.
_HELD = ("id = %(id)s AND status = 'processing' AND attempts = %(attempts)s "
         "AND lease_owner = %(owner)s AND lease_expires_at > now()")

ADD_IMAGE = f"""
UPDATE jobs SET images = (images::jsonb || to_jsonb(%(path)s::text))::text, updated_at = %(now)s
WHERE {_HELD} AND jsonb_array_length(images::jsonb) = %(count)s
"""
COMPLETE_JOB = f"""
UPDATE jobs SET status = 'completed', completed_at = %(now)s, updated_at = %(now)s,
       lease_owner = NULL, lease_expires_at = NULL,
       error_code = NULL, error_message = NULL, error_retryable = NULL
WHERE {_HELD} AND jsonb_array_length(images::jsonb) = num_images
"""
FAIL_JOB = f"""
UPDATE jobs SET status = 'failed', error_code = %(code)s, error_message = %(message)s,
       error_retryable = %(retryable)s, completed_at = %(now)s, updated_at = %(now)s,
       lease_owner = NULL, lease_expires_at = NULL
WHERE {_HELD}
"""
RETRY_JOB = f"""
UPDATE jobs SET status = 'pending', error_code = %(code)s, error_message = %(message)s, error_retryable = 1,
       not_before = %(not_before)s, updated_at = %(now)s, lease_owner = NULL, lease_expires_at = NULL
WHERE {_HELD}
"""
# A graceful shutdown hands a job back even if its lease lapsed meanwhile (nobody else took it,
# or the attempt would not match).
RELEASE_JOB = """
UPDATE jobs SET status = 'pending', updated_at = %(now)s, lease_owner = NULL, lease_expires_at = NULL
WHERE id = %(id)s AND status = 'processing' AND attempts = %(attempts)s AND lease_owner = %(owner)s
"""
HEARTBEAT = f"UPDATE jobs SET {_LEASE} WHERE lease_owner = %(owner)s AND status = 'processing'"

CANCEL_JOB = """
UPDATE jobs SET status = 'canceled', completed_at = %(now)s, updated_at = %(now)s,
       lease_owner = NULL, lease_expires_at = NULL,
       error_code = NULL, error_message = NULL, error_retryable = NULL
WHERE id = %(id)s AND status IN ('pending', 'processing')
"""

# Locked first, so the delete takes the counter's lock last, like every other writer.
LOCK_JOB_STATUS = "SELECT status FROM jobs WHERE id = %s FOR UPDATE"
DELETE_JOB = "DELETE FROM jobs WHERE id = %s"
DELETE_JOB_KEYS = "DELETE FROM idempotency_keys WHERE job_id = %s"

TRY_LOCK = "SELECT pg_try_advisory_xact_lock(%s) AS locked"

# Jobs whose lease expired: their node died or stalled. Those abandoned max_recoveries times
# fail (a poison job), the rest go back to pending.
FAIL_POISON_JOBS = """
UPDATE jobs SET status = 'failed', error_code = 'crashed_repeatedly', error_retryable = 0,
       error_message = 'The worker drawing this job stopped unexpectedly ' || (recoveries + 1)
                       || ' times; it is not tried again.',
       recoveries = recoveries + 1, completed_at = %(now)s, updated_at = %(now)s,
       lease_owner = NULL, lease_expires_at = NULL
WHERE status = 'processing' AND lease_expires_at < now() AND recoveries + 1 >= %(max_recoveries)s
RETURNING id
"""
RESCUE_JOBS = """
UPDATE jobs SET status = 'pending', recoveries = recoveries + 1, updated_at = %(now)s,
       lease_owner = NULL, lease_expires_at = NULL
WHERE status = 'processing' AND lease_expires_at < now()
RETURNING id
"""

EVENTS_AFTER = f"SELECT {EVENT_COLUMNS} FROM events WHERE seq > %s ORDER BY seq LIMIT %s"
JOB_EVENTS_AFTER = f"SELECT {EVENT_COLUMNS} FROM events WHERE job_id = %s AND seq > %s ORDER BY seq LIMIT %s"
LATEST_JOB_EVENT = f"SELECT {EVENT_COLUMNS} FROM events WHERE job_id = %s ORDER BY seq DESC LIMIT 1"
EVENT_HORIZON = """
SELECT (SELECT last FROM event_counter) AS latest,
       coalesce((SELECT value FROM meta WHERE key = 'events_pruned_through'), 0) AS pruned
"""
PRUNE_EVENTS = "DELETE FROM events WHERE seq <= %s"
SET_PRUNED_THROUGH = """
INSERT INTO meta (key, value) VALUES ('events_pruned_through', %(cutoff)s)
ON CONFLICT (key) DO UPDATE SET value = greatest(meta.value, %(cutoff)s)
"""
PRUNE_IDEMPOTENCY_KEYS = "DELETE FROM idempotency_keys WHERE created_at < %s"

MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,                -- a migration file's number
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def migrations() -> list[tuple[int, str]]:
    """Every schema version with its script, in order."""
    steps = [(int(path.name.split("_", 1)[0]), path.read_text(encoding="utf-8")) for path in sorted(MIGRATIONS.glob("*.sql"))]
    assert [version for version, _ in steps] == list(range(1, len(steps) + 1)), "migrations must be 1, 2, 3, ..."
    return steps


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _connect_error(url: str, exc: Exception) -> StartupError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    password = urlsplit(url).password
    if password:
        reason = reason.replace(password, "***")
    return StartupError(f"cannot connect to PostgreSQL at {redacted(url)}: {reason}")


def _event(row: dict[str, Any]) -> JobEvent:
    return JobEvent(row["seq"], row["name"], row["job_id"], row["job"], row["job_seq"], row["status"])


async def _migrate(url: str) -> None:
    """Apply the migrations this database lacks, once, however many nodes start together."""
    try:
        conn = await psycopg.AsyncConnection.connect(url, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.Error as exc:
        raise _connect_error(url, exc) from None
    async with conn:
        async with conn.transaction():
            # The other nodes wait here, then find every version applied.
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            await conn.execute(MIGRATIONS_TABLE)
            cur = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
            row = await cur.fetchone()
            current = row[0] if row else 0
            steps = migrations()
            if current > len(steps):
                raise StartupError(
                    f"the database is at schema version {current}, newer than this release knows "
                    f"({len(steps)}): run the newer release"
                )
            for version, script in steps[current:]:
                await conn.execute(script.encode())  # no parameters: several statements may run in one call
                await conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                log.info("database migrated to schema version %d", version)


class PostgresStore:
    """Jobs and events in PostgreSQL, shared by every node."""

    backend = "postgres"
    # The feed trails the commits (it reads them back from the table), so what it carries may
    # be a few milliseconds older than the database.
    feed_is_synchronous = False

    def __init__(self, url: str, pool: AsyncConnectionPool[Connection], feed: Feed) -> None:
        self._url = url
        self._pool = pool
        self._feed = feed
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._writes: set[asyncio.Task[Any]] = set()

    @classmethod
    async def open(cls, settings: StorageSettings, feed: Feed) -> PostgresStore:
        """Connect, migrate, and start following the event log (from its current end)."""
        url = settings.database_url
        await _migrate(url)
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=settings.pool_size,
            # Autocommit: a read is one round trip; writes open their transaction explicitly.
            kwargs={"autocommit": True, "row_factory": dict_row},
            open=False,
            name="imagegen",
        )
        try:
            await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        except Exception as exc:
            await pool.close()
            raise _connect_error(url, exc) from None
        store = cls(url, pool, feed)
        latest, _ = await store.horizon()
        feed.last_seq = latest
        store._tasks = [
            asyncio.create_task(store._listen_forever(), name="imagegen-pg-listener"),
            asyncio.create_task(store._follow_forever(), name="imagegen-pg-feed"),
        ]
        return store

    async def close(self) -> None:
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._pool.close()

    # --- the feed --------------------------------------------------------------------------

    async def _listen_forever(self) -> None:
        """Keep a LISTEN connection open; each notification wakes the feed's reader."""
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._wake.set()  # anything committed while we were not listening
                    async for _ in conn.notifies():
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("lost the PostgreSQL notification connection (%s); reconnecting", type(exc).__name__)
            await asyncio.sleep(1.0)  # the reader's poll covers the gap

    async def _follow_forever(self) -> None:
        """Read new events from the table into the feed, in id (= commit) order."""
        while True:
            with suppress(TimeoutError):
                async with asyncio.timeout(FEED_POLL_S):
                    await self._wake.wait()
            self._wake.clear()
            try:
                while True:
                    events = await self.events_after(self._feed.last_seq, None, FEED_PAGE)
                    self._feed.publish(events)
                    if len(events) < FEED_PAGE:
                        break
            except Exception as exc:
                log.warning("reading the event log failed (%s); trying again", exc)

    # --- transactions ----------------------------------------------------------------------

    async def _write(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        """Run `work` in one transaction that commits or rolls back whole even if the caller is
        cancelled meanwhile (as SQLite's queued writes do); then wake the feed's reader."""
        task = asyncio.ensure_future(self._transaction(work))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return await asyncio.shield(task)

    async def _transaction(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        async with self._pool.connection() as conn:
            async with conn.transaction():
                result = await work(conn)
        self._wake.set()
        return result

    async def _append(self, conn: Connection, changes: list[tuple[str, str]]) -> list[JobEvent]:
        """The events of this transaction's changes: its last statement (see APPEND_EVENTS)."""
        if not changes:
            return []
        params = {"job_ids": [job_id for job_id, _ in changes], "names": [name for _, name in changes]}
        cur = await conn.execute(APPEND_EVENTS, params)
        return sorted((_event(row) for row in await cur.fetchall()), key=lambda event: event.seq)

    async def _change(self, name: str, sql: str, params: dict[str, Any]) -> JobEvent | None:
        """One conditional UPDATE of job params["id"], its row count checked, and its event."""

        async def work(conn: Connection) -> JobEvent | None:
            cur = await conn.execute(sql, params)
            if cur.rowcount != 1:
                return None  # the condition did not hold (e.g. the job moved on): nothing happened
            return (await self._append(conn, [(params["id"], name)]))[0]

        return await self._write(work)

    async def _fetch_one(self, sql: str, params: Any = ()) -> dict[str, Any] | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchone()

    async def _fetch_all(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchall()

    # --- admission and reads ---------------------------------------------------------------

    async def create(
        self, new: NewJob, idempotency: Idempotency | None, max_pending: int | None
    ) -> JobEvent | KeyReused:
        async def work(conn: Connection) -> JobEvent | KeyReused:
            if max_pending is not None:
                await conn.execute(LOCK_COUNTER)
            if idempotency is not None:
                cur = await conn.execute(IDEMPOTENCY_KEY, (idempotency.key,))
                used = await cur.fetchone()
                if used is not None:
                    return KeyReused(used["job_id"], used["request_hash"] == idempotency.request_hash)
            if max_pending is not None:
                cur = await conn.execute(PENDING_COUNT)
                row = await cur.fetchone()
                assert row is not None
                if row["n"] >= max_pending:
                    raise QueueLimit(row["n"])
            await conn.execute(
                INSERT_JOB,
                {"id": new.job_id, "num_images": new.num_images, "animal": new.animal, "prompt": new.prompt, "now": new.now},
            )
            if idempotency is not None:
                await conn.execute(INSERT_IDEMPOTENCY_KEY, (idempotency.key, idempotency.request_hash, new.job_id, new.now))
            return (await self._append(conn, [(new.job_id, "job.created")]))[0]

        return await self._write(work)

    async def idempotency_key_job(self, key: str) -> str | None:
        row = await self._fetch_one(IDEMPOTENCY_KEY, (key,))
        return None if row is None else row["job_id"]

    async def get(self, job_id: str) -> Job | None:
        row = await self._fetch_one(SELECT_JOB, (job_id,))
        return None if row is None else Job.from_row(row)

    async def list(self, below_seq: int, limit: int, status: JobStatus | None) -> list[Job]:
        if status is None:
            rows = await self._fetch_all(LIST_JOBS, (below_seq, limit))
        else:
            rows = await self._fetch_all(LIST_JOBS_BY_STATUS, (status.value, below_seq, limit))
        return [Job.from_row(row) for row in rows]

    async def pending(self) -> tuple[list[PendingJob], int]:
        async with self._pool.connection() as conn:
            # One snapshot for both reads.
            async with conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                latest = await (await conn.execute(LAST_EVENT)).fetchone()
                rows = await (await conn.execute(PENDING_JOBS)).fetchall()
        assert latest is not None
        return [PendingJob(row["id"], row["seq"], row["not_before"]) for row in rows], latest["last"]

    # --- the workers' side -----------------------------------------------------------------

    async def claim_next(self, owner: str, lease_s: float) -> JobEvent | None:
        """The oldest pending job that is due, claimed under `owner`'s lease; None if none is."""

        async def work(conn: Connection) -> JobEvent | None:
            cur = await conn.execute(CLAIM_NEXT, {"owner": owner, "lease_s": lease_s, "now": now_text()})
            row = await cur.fetchone()
            if row is None:
                return None
            return (await self._append(conn, [(row["id"], "job.processing")]))[0]

        return await self._write(work)

    async def claim(self, job_id: str, owner: str, lease_s: float) -> JobEvent | None:
        params = {"id": job_id, "owner": owner, "lease_s": lease_s, "now": now_text()}
        return await self._change("job.processing", CLAIM_JOB, params)

    def _held(self, job: Job, owner: str, **params: Any) -> dict[str, Any]:
        return {"id": job.job_id, "attempts": job.attempts, "owner": owner, "now": now_text(), **params}

    async def add_image(self, job: Job, path: str, owner: str) -> JobEvent | None:
        return await self._change("job.progress", ADD_IMAGE, self._held(job, owner, path=path, count=len(job.images)))

    async def complete(self, job: Job, owner: str) -> JobEvent | None:
        return await self._change("job.completed", COMPLETE_JOB, self._held(job, owner))

    async def fail(self, job: Job, code: str, message: str, retryable: bool, owner: str) -> JobEvent | None:
        params = self._held(job, owner, code=code, message=message, retryable=int(retryable))
        return await self._change("job.failed", FAIL_JOB, params)

    async def retry(self, job: Job, code: str, message: str, not_before: str, owner: str) -> JobEvent | None:
        params = self._held(job, owner, code=code, message=message, not_before=not_before)
        return await self._change("job.retrying", RETRY_JOB, params)

    async def release(self, job: Job, owner: str) -> JobEvent | None:
        return await self._change("job.requeued", RELEASE_JOB, self._held(job, owner))

    async def heartbeat(self, owner: str, lease_s: float) -> int:
        async with self._pool.connection() as conn:
            cur = await conn.execute(HEARTBEAT, {"owner": owner, "lease_s": lease_s})
            return cur.rowcount

    async def recover(self, max_recoveries: int) -> list[JobEvent]:
        async def work(conn: Connection) -> list[JobEvent]:
            locked = await (await conn.execute(TRY_LOCK, (RESCUE_LOCK,))).fetchone()
            if not (locked and locked["locked"]):
                return []  # another node is rescuing right now
            params = {"now": now_text(), "max_recoveries": max_recoveries}
            failed = [row["id"] for row in await (await conn.execute(FAIL_POISON_JOBS, params)).fetchall()]
            rescued = [row["id"] for row in await (await conn.execute(RESCUE_JOBS, params)).fetchall()]
            changes = [(job_id, "job.failed") for job_id in failed] + [(job_id, "job.requeued") for job_id in rescued]
            return await self._append(conn, changes)

        return await self._write(work)

    # --- control ---------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> JobEvent | None:
        return await self._change("job.canceled", CANCEL_JOB, {"id": job_id, "now": now_text()})

    async def delete(self, job_id: str) -> JobEvent | JobStatus | None:
        async def work(conn: Connection) -> JobEvent | JobStatus | None:
            row = await (await conn.execute(LOCK_JOB_STATUS, (job_id,))).fetchone()
            if row is None:
                return None
            status = JobStatus(row["status"])
            if not status.terminal:
                return status
            # The event carries the job as it was, so it is written before the row goes.
            events = await self._append(conn, [(job_id, "job.deleted")])
            await conn.execute(DELETE_JOB, (job_id,))
            await conn.execute(DELETE_JOB_KEYS, (job_id,))
            return events[0]

        return await self._write(work)

    # --- the event log ---------------------------------------------------------------------

    async def events_after(self, seq: int, job_id: str | None, limit: int) -> list[JobEvent]:
        if job_id is None:
            rows = await self._fetch_all(EVENTS_AFTER, (seq, limit))
        else:
            rows = await self._fetch_all(JOB_EVENTS_AFTER, (job_id, seq, limit))
        return [_event(row) for row in rows]

    async def latest_event(self, job_id: str) -> JobEvent | None:
        row = await self._fetch_one(LATEST_JOB_EVENT, (job_id,))
        return None if row is None else _event(row)

    async def horizon(self) -> tuple[int, int]:
        row = await self._fetch_one(EVENT_HORIZON)
        assert row is not None
        return row["latest"], row["pruned"]

    async def prune(self, keep_events: int, keys_before: str) -> int:
        async def work(conn: Connection) -> int:
            locked = await (await conn.execute(TRY_LOCK, (PRUNE_LOCK,))).fetchone()
            row = await (await conn.execute(EVENT_HORIZON)).fetchone()
            assert row is not None
            if not (locked and locked["locked"]):
                return row["pruned"]  # another node is pruning right now
            cutoff = row["latest"] - keep_events
            if cutoff > 0:
                await conn.execute(PRUNE_EVENTS, (cutoff,))
                await conn.execute(SET_PRUNED_THROUGH, {"cutoff": cutoff})
            await conn.execute(PRUNE_IDEMPOTENCY_KEYS, (keys_before,))
            return max(cutoff, row["pruned"])

        return await self._write(work)
