"""The PostgreSQL job store, for many processes on many machines: every PostgreSQL SQL string.

- Each change is one statement with its event (a create, one function call), run in autocommit
  mode on a pooled connection (psycopg 3 with psycopg-pool): its own transaction, shielded from
  the caller's cancellation so it commits or rolls back as a unit, as on SQLite.
- Event ids come from a one-row counter that each writing statement updates after the job rows
  it locks (see migrations/postgres/001_schema.sql), so commit order is id order on every node;
  the same statement NOTIFYs, delivered at commit.
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
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ..config import StorageSettings
from ..errors import DatabaseUnavailable, StartupError, StorageFull
from ..feed import Feed
from ..models import Job, JobStatus, now_text
from .postgres_deliveries import INSERT_WEBHOOK, PRUNE_DELIVERIES, PRUNE_WEBHOOKS, PostgresDeliveries
from . import Idempotency, JobEvent, KeyReused, NewJob, PendingJob, QueueLimit, events_query, list_query

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

Connection = psycopg.AsyncConnection[dict[str, Any]]

MIGRATIONS = Path(__file__).resolve().parent / "migrations" / "postgres"
CHANNEL = "imagegen_events"

# Advisory lock keys (any bigint; these spell "imagegen" and a step).
MIGRATE_LOCK = 0x696D6167_656E0001
RESCUE_LOCK = 0x696D6167_656E0002
PRUNE_LOCK = 0x696D6167_656E0003
RETENTION_LOCK = 0x696D6167_656E0004

# How long the feed's reader waits for a wake-up before it looks anyway: what a notification
# lost with a dropped connection costs at most.
FEED_POLL_S = 0.5
# Events read per query by the feed's reader.
FEED_PAGE = 1000
CONNECT_TIMEOUT_S = 5
# How long a request waits for a pooled connection before it is told the database is unavailable
# (503): with the server down, a client hears so in seconds, not after psycopg_pool's 30 s.
POOL_WAIT_S = 5
# SQLSTATEs that mean the connection, or the server, is gone (class 08: connection exceptions;
# 57P01-57P03: the server is shutting down, crashed, or cannot take connections yet).
CONNECTION_LOST = ("57P01", "57P02", "57P03")

# --- queries -------------------------------------------------------------------------------

EVENT_COLUMNS = "seq, name, job_id, job, job_seq, status, owner"


def _with_events(change: str, name: str, also: str = "", after_counter: str = "") -> str:
    """One statement: `change` (an UPDATE or DELETE of jobs ending in `RETURNING jobs AS job`)
    and, for each row it touched, its event `name` (an SQL expression over `job`, the row after
    the change), with ids from the counter and a NOTIFY delivered at commit. `also` adds
    statements that go with the change (CTEs that may read `changed`); `after_counter`, ones
    that must lock rows only after the counter (they read `counter`, which makes PostgreSQL run
    the counter's UPDATE first: sibling data-modifying CTEs otherwise run in no set order, and
    two claims locking the same rows in opposite orders would deadlock).

    One statement in autocommit mode is its own transaction: it locks the job rows first and
    the counter last, and holds the counter's lock only while the server commits, never across
    a round trip to this busy process.
    """
    return f"""
WITH changed AS ({change}),{also}
counter AS (
    UPDATE event_counter SET last = last + (SELECT count(*) FROM changed)
    WHERE EXISTS (SELECT 1 FROM changed)
    RETURNING last
),{after_counter}
numbered AS (
    SELECT job, row_number() OVER (ORDER BY (job).seq) AS n, count(*) OVER () AS total FROM changed
),
notified AS (SELECT pg_notify('{CHANNEL}', '') FROM counter)
INSERT INTO events (seq, job_id, name, job, job_seq, status, owner, created_at)
SELECT counter.last - numbered.total + numbered.n, (job).id, {name}, imagegen_snapshot(job),
       (job).seq, (job).status, (job).owner, (job).updated_at
FROM numbered, counter, notified
RETURNING {EVENT_COLUMNS}
"""


CREATE_JOB = """
SELECT * FROM imagegen_create_job(
    %(id)s, %(num_images)s, %(animal)s, %(prompt)s, %(now)s, %(key)s, %(request_hash)s, %(max_pending)s,
    %(owner)s, %(owner_max_pending)s
)
"""
# Keys are per tenant ('' with auth off): two tenants' equal keys are two keys.
IDEMPOTENCY_KEY = "SELECT request_hash, job_id FROM idempotency_keys WHERE owner = %s AND key = %s"

SELECT_JOB = "SELECT * FROM jobs WHERE id = %s"
# Newest first; seq is the cursor, so rows inserted while a client walks the list never shift it.
# By (owner?, status?): with auth on a client sees only its own jobs (jobs_owner_seq).
LIST_JOBS = {
    (False, False): "SELECT * FROM jobs WHERE seq < %s ORDER BY seq DESC LIMIT %s",
    (False, True): "SELECT * FROM jobs WHERE status = %s AND seq < %s ORDER BY seq DESC LIMIT %s",
    (True, False): "SELECT * FROM jobs WHERE owner = %s AND seq < %s ORDER BY seq DESC LIMIT %s",
    (True, True): "SELECT * FROM jobs WHERE owner = %s AND status = %s AND seq < %s ORDER BY seq DESC LIMIT %s",
}
PENDING_JOBS = "SELECT id, seq, not_before, owner FROM jobs WHERE status = 'pending' ORDER BY seq"
LAST_EVENT = "SELECT last FROM event_counter"

_LEASE = "lease_owner = %(owner)s, lease_expires_at = now() + make_interval(secs => %(lease_s)s)"
_CLAIM = f"""status = 'processing', attempts = attempts + 1, {_LEASE},
       started_at = coalesce(started_at, %(now)s), updated_at = %(now)s"""

# The next runnable pending job, skipping rows another node is claiming this instant: the
# oldest job of the tenant whose turn is oldest (tenant_turns), so tenants' backlogs are
# drawn round-robin; the claim records the tenant's turn (as its event id: increasing in commit
# order), under the counter's lock, which every claim takes first. Every pending job is looked
# at, which workers.max_pending bounds.
CLAIM_NEXT = _with_events(f"""
UPDATE jobs SET {_CLAIM}
WHERE seq = (
    SELECT j.seq FROM jobs j LEFT JOIN tenant_turns t ON t.owner = coalesce(j.owner, '')
    WHERE j.status = 'pending' AND (j.not_before IS NULL OR j.not_before <= %(now)s)
    ORDER BY t.last_claim NULLS FIRST, j.seq LIMIT 1 FOR UPDATE OF j SKIP LOCKED
)
RETURNING jobs AS job""", "'job.processing'", after_counter="""
turn AS (
    INSERT INTO tenant_turns (owner, last_claim)
    SELECT coalesce((job).owner, ''), counter.last FROM changed, counter
    ON CONFLICT (owner) DO UPDATE SET last_claim = excluded.last_claim
),""")
CLAIM_JOB = _with_events(f"""
UPDATE jobs SET {_CLAIM} WHERE id = %(id)s AND status = 'pending' RETURNING jobs AS job""", "'job.processing'")

# Fenced on the attempt and on a live lease of this node: a node that was paused past its
# lease cannot write, even before another node has rescued the job.
_HELD = ("id = %(id)s AND status = 'processing' AND attempts = %(attempts)s "
         "AND lease_owner = %(owner)s AND lease_expires_at > now()")
_NO_LEASE = "lease_owner = NULL, lease_expires_at = NULL"

ADD_IMAGE = _with_events(f"""
UPDATE jobs SET images = (images::jsonb || to_jsonb(%(path)s::text))::text, updated_at = %(now)s
WHERE {_HELD} AND jsonb_array_length(images::jsonb) = %(count)s
RETURNING jobs AS job""", "'job.progress'")
# A completed or canceled job shows no error, though an earlier attempt may have failed.
COMPLETE_JOB = _with_events(f"""
UPDATE jobs SET status = 'completed', completed_at = %(now)s, updated_at = %(now)s, {_NO_LEASE},
       error_code = NULL, error_message = NULL, error_retryable = NULL
WHERE {_HELD} AND jsonb_array_length(images::jsonb) = num_images
RETURNING jobs AS job""", "'job.completed'")
FAIL_JOB = _with_events(f"""
UPDATE jobs SET status = 'failed', error_code = %(code)s, error_message = %(message)s,
       error_retryable = %(retryable)s, completed_at = %(now)s, updated_at = %(now)s, {_NO_LEASE}
WHERE {_HELD}
RETURNING jobs AS job""", "'job.failed'")
# A retryable failure: back to pending with the error kept, to be claimed again after not_before.
RETRY_JOB = _with_events(f"""
UPDATE jobs SET status = 'pending', error_code = %(code)s, error_message = %(message)s, error_retryable = 1,
       not_before = %(not_before)s, updated_at = %(now)s, {_NO_LEASE}
WHERE {_HELD}
RETURNING jobs AS job""", "'job.retrying'")
# A graceful stop hands back what the node holds, even a lease that lapsed meanwhile (had
# another node rescued the job, the owner would no longer be this node).
RELEASE_JOBS = _with_events(f"""
UPDATE jobs SET status = 'pending', updated_at = %(now)s, {_NO_LEASE}
WHERE status = 'processing' AND lease_owner = %(owner)s
RETURNING jobs AS job""", "'job.requeued'")
# Only leases still alive: once one has lapsed the job may be rescued at any moment, and a
# stalled node that wakes must not take it back.
HEARTBEAT = f"""
UPDATE jobs SET {_LEASE}
WHERE id = ANY(%(ids)s::text[]) AND lease_owner = %(owner)s AND status = 'processing' AND lease_expires_at > now()
"""

CANCEL_JOB = _with_events(f"""
UPDATE jobs SET status = 'canceled', completed_at = %(now)s, updated_at = %(now)s, {_NO_LEASE},
       error_code = NULL, error_message = NULL, error_retryable = NULL
WHERE id = %(id)s AND status IN ('pending', 'processing')
RETURNING jobs AS job""", "'job.canceled'")

# A deleted job's idempotency keys go with it (a key may then create a job again).
GONE_KEYS = "\ngone_keys AS (DELETE FROM idempotency_keys WHERE job_id IN (SELECT (job).id FROM changed)),"
# The row goes with its idempotency keys (a key may then create a job again); its events stay
# (a stream replays the deletion) until retention prunes them. The event carries the row as it was.
DELETE_JOB = _with_events(
    "DELETE FROM jobs WHERE id = %(id)s AND status IN ('completed', 'failed', 'canceled') RETURNING jobs AS job",
    "'job.deleted'",
    also=GONE_KEYS,
)
JOB_STATUS = "SELECT status FROM jobs WHERE id = %s"

# Retention: the terminal jobs that ended longest ago first (jobs_completed_at), deleted as a
# DELETE does it, one node at a time (the advisory lock, released with the statement).
EXPIRE_JOBS = _with_events(
    f"""DELETE FROM jobs WHERE id IN (
    SELECT id FROM jobs WHERE completed_at < %(before)s AND status IN ('completed', 'failed', 'canceled')
    ORDER BY completed_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED
) AND (SELECT pg_try_advisory_xact_lock({RETENTION_LOCK}))
RETURNING jobs AS job""",
    "'job.deleted'",
    also=GONE_KEYS,
)
EXISTING_JOBS = "SELECT id FROM jobs WHERE id = ANY(%s::text[])"

# Jobs whose lease expired: their node died or stalled. One such job abandoned max_recoveries
# times fails (a poison job), the rest go back to pending; one node at a time does this (the
# advisory lock, released when the statement's transaction ends).
RESCUE_JOBS = _with_events(f"""
UPDATE jobs SET
    status = CASE WHEN recoveries + 1 >= %(max_recoveries)s THEN 'failed' ELSE 'pending' END,
    error_code = CASE WHEN recoveries + 1 >= %(max_recoveries)s THEN 'crashed_repeatedly' ELSE error_code END,
    error_retryable = CASE WHEN recoveries + 1 >= %(max_recoveries)s THEN 0 ELSE error_retryable END,
    error_message = CASE WHEN recoveries + 1 >= %(max_recoveries)s
                         THEN 'The worker drawing this job stopped unexpectedly ' || (recoveries + 1)
                              || ' times; it is not tried again.'
                         ELSE error_message END,
    completed_at = CASE WHEN recoveries + 1 >= %(max_recoveries)s THEN %(now)s ELSE completed_at END,
    recoveries = recoveries + 1, updated_at = %(now)s, {_NO_LEASE}
WHERE status = 'processing' AND lease_expires_at < now() AND (SELECT pg_try_advisory_xact_lock({RESCUE_LOCK}))
RETURNING jobs AS job""", "CASE (job).status WHEN 'failed' THEN 'job.failed' ELSE 'job.requeued' END")

TRY_LOCK = "SELECT pg_try_advisory_xact_lock(%s) AS locked"

EVENTS_AFTER = {
    "all": f"SELECT {EVENT_COLUMNS} FROM events WHERE seq > %s ORDER BY seq LIMIT %s",
    "job": f"SELECT {EVENT_COLUMNS} FROM events WHERE job_id = %s AND seq > %s ORDER BY seq LIMIT %s",
    "owner": f"SELECT {EVENT_COLUMNS} FROM events WHERE owner = %s AND seq > %s ORDER BY seq LIMIT %s",
}
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

# The readiness check's write: one row of meta, the Unix time in milliseconds of the last check.
HEALTH_CHECK = """
INSERT INTO meta (key, value) VALUES ('health_checked_at', %(now_ms)s)
ON CONFLICT (key) DO UPDATE SET value = excluded.value
"""

# For /metrics, at scrape time (both through jobs_status_seq).
JOB_COUNTS = "SELECT status, count(*) AS n FROM jobs GROUP BY status"
OLDEST_PENDING = "SELECT created_at FROM jobs WHERE status = 'pending' ORDER BY seq LIMIT 1"

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
    return JobEvent(row["seq"], row["name"], row["job_id"], row["job"], row["job_seq"], row["status"], row["owner"])


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


class PostgresStore(PostgresDeliveries):
    """Jobs and events in PostgreSQL, shared by every node."""

    backend = "postgres"
    # The feed trails the commits (it reads them back from the table), so what it carries may
    # be a few milliseconds older than the database.
    feed_is_synchronous = False

    def __init__(
        self, url: str, pool: AsyncConnectionPool[Connection], feed: Feed, metrics: Metrics | None = None
    ) -> None:
        self._url = url
        self._pool = pool
        self._feed = feed
        self._metrics = metrics
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._writes: set[asyncio.Task[Any]] = set()

    @classmethod
    async def open(cls, settings: StorageSettings, feed: Feed, metrics: Metrics | None = None) -> PostgresStore:
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
            timeout=POOL_WAIT_S,
        )
        try:
            await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        except Exception as exc:
            await pool.close()
            raise _connect_error(url, exc) from None
        store = cls(url, pool, feed, metrics)
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

    # --- writes ----------------------------------------------------------------------------

    async def _write(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Run one writing statement (its own transaction, in autocommit mode) to its end even
        if the caller is cancelled meanwhile, as SQLite's queued writes are; then wake the feed's
        reader, so this node's streams hear of the change without waiting for the NOTIFY."""
        return await self._shielded(self._run(sql, params))

    async def _shielded(self, write: Awaitable[T]) -> T:
        """Await `write`, which runs to its end even if the caller is cancelled (close() waits for it)."""
        task = asyncio.ensure_future(write)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return await asyncio.shield(task)

    async def _run(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        async with self._connection() as conn:
            started = time.perf_counter()
            rows = await (await conn.execute(sql, params)).fetchall()
            if self._metrics is not None:
                self._metrics.commit_duration.observe(time.perf_counter() - started)
        self._wake.set()
        return rows

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        """A pooled connection. A full disk and a database that cannot be reached come out as the
        store's own errors (503 to a client; to a worker, wait and record the outcome again),
        not as psycopg's, which would be a 500. A full disk commits nothing; a lost connection
        may have lost only the answer to a commit, which a client's retry with its
        Idempotency-Key, and a worker's look at the job before it records again, both allow for."""
        try:
            async with self._pool.connection() as conn:
                yield conn
        except psycopg.errors.DiskFull:
            raise StorageFull() from None
        except PoolTimeout:
            raise DatabaseUnavailable() from None
        except psycopg.OperationalError as exc:
            state = exc.sqlstate
            if state is None or state.startswith("08") or state in CONNECTION_LOST:
                raise DatabaseUnavailable() from None
            raise

    def _committed(self, events: list[JobEvent]) -> list[JobEvent]:
        """`events`, committed by this node, counted in its metrics (the feed carries every node's)."""
        if self._metrics is not None:
            self._metrics.committed(events)
        return events

    async def _change(self, sql: str, params: dict[str, Any]) -> JobEvent | None:
        """A conditional change of one job with its event; None if the condition did not hold
        (e.g. the job moved on): then nothing happened."""
        rows = await self._write(sql, params)
        return self._committed([_event(rows[0])])[0] if rows else None

    async def _fetch_one(self, sql: str, params: Any = ()) -> dict[str, Any] | None:
        async with self._connection() as conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchone()

    async def _fetch_all(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        async with self._connection() as conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchall()

    # --- admission and reads ---------------------------------------------------------------

    async def create(
        self, new: NewJob, idempotency: Idempotency | None, max_pending: int | None, tenant_max_pending: int | None = None
    ) -> JobEvent | KeyReused:
        params = {
            "id": new.job_id, "num_images": new.num_images, "animal": new.animal, "prompt": new.prompt,
            "now": new.now, "key": idempotency.key if idempotency else None,
            "request_hash": idempotency.request_hash if idempotency else None,
            "max_pending": max_pending if max_pending is not None else 2**31 - 1,
            "owner": new.owner, "owner_max_pending": tenant_max_pending,
        }
        if new.webhook is None:
            (row,) = await self._write(CREATE_JOB, params)
        else:
            row = await self._write_with_webhook(new, params)
        if row["reused_job_id"] is not None:
            return KeyReused(row["reused_job_id"], row["same_body"])
        if row["pending"] is not None:
            raise QueueLimit(row["pending"], tenant=row["tenant_limited"])
        event = JobEvent(
            row["event_seq"], "job.created", new.job_id, row["snapshot"], row["job_seq"], "pending", new.owner
        )
        return self._committed([event])[0]

    async def _write_with_webhook(self, new: NewJob, params: dict[str, Any]) -> dict[str, Any]:
        """The create and its webhook in one transaction, the webhook row first, so the outbox
        trigger of the job.created event sees it. Pipelined: BEGIN, both statements and COMMIT
        go in one round trip, so the event counter's lock is not held across the network.
        When no job is made (a reused key, a full queue) the webhook row of the id that was never
        used stays, harmless, until the prune pass removes it with the webhooks of gone jobs."""
        assert new.webhook is not None
        hook = {"id": new.job_id, "owner": new.owner, "url": new.webhook.url, "host": new.webhook.host,
                "events": new.webhook.events_json}

        async def create() -> dict[str, Any]:
            async with self._connection() as conn:
                async with conn.pipeline():
                    async with conn.transaction():
                        await conn.execute(INSERT_WEBHOOK, hook)
                        cursor = await conn.execute(CREATE_JOB, params)
                    row = await cursor.fetchone()
            assert row is not None
            self._wake.set()
            return row

        return await self._shielded(create())

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
        # Not through _write: that one is shielded and runs to its end, and a check on a stuck
        # database must be abandoned (the caller's timeout cancels the statement).
        async with self._connection() as conn:
            await conn.execute(HEALTH_CHECK, {"now_ms": time.time_ns() // 1_000_000})

    async def pending(self) -> tuple[list[PendingJob], int]:
        async with self._connection() as conn:
            # One snapshot for both reads.
            async with conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                latest = await (await conn.execute(LAST_EVENT)).fetchone()
                rows = await (await conn.execute(PENDING_JOBS)).fetchall()
        assert latest is not None
        return [PendingJob(row["id"], row["seq"], row["not_before"], row["owner"]) for row in rows], latest["last"]

    # --- the workers' side -----------------------------------------------------------------

    async def claim_next(self, owner: str, lease_s: float) -> JobEvent | None:
        """The oldest pending job that is due, claimed under `owner`'s lease; None if none is."""
        return await self._change(CLAIM_NEXT, {"owner": owner, "lease_s": lease_s, "now": now_text()})

    async def claim(self, job_id: str, owner: str, lease_s: float) -> JobEvent | None:
        return await self._change(CLAIM_JOB, {"id": job_id, "owner": owner, "lease_s": lease_s, "now": now_text()})

    def _held(self, job: Job, owner: str, **params: Any) -> dict[str, Any]:
        return {"id": job.job_id, "attempts": job.attempts, "owner": owner, "now": now_text(), **params}

    async def add_image(self, job: Job, path: str, owner: str) -> JobEvent | None:
        return await self._change(ADD_IMAGE, self._held(job, owner, path=path, count=len(job.images)))

    async def complete(self, job: Job, owner: str) -> JobEvent | None:
        return await self._change(COMPLETE_JOB, self._held(job, owner))

    async def fail(self, job: Job, code: str, message: str, retryable: bool, owner: str) -> JobEvent | None:
        return await self._change(FAIL_JOB, self._held(job, owner, code=code, message=message, retryable=int(retryable)))

    async def retry(self, job: Job, code: str, message: str, not_before: str, owner: str) -> JobEvent | None:
        return await self._change(RETRY_JOB, self._held(job, owner, code=code, message=message, not_before=not_before))

    async def release_all(self, owner: str) -> list[JobEvent]:
        # A claim still in flight (its worker was stopped while it waited; the write itself
        # runs to its end) would commit after this release and hold its job until the lease
        # ran out: let every write in flight land first.
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)
        rows = await self._write(RELEASE_JOBS, {"owner": owner, "now": now_text()})
        return self._committed(sorted((_event(row) for row in rows), key=lambda event: event.seq))

    async def heartbeat(self, job_ids: list[str], owner: str, lease_s: float) -> int:
        async with self._connection() as conn:
            cur = await conn.execute(HEARTBEAT, {"ids": job_ids, "owner": owner, "lease_s": lease_s})
            return cur.rowcount

    async def recover(self, max_recoveries: int) -> list[JobEvent]:
        rows = await self._write(RESCUE_JOBS, {"now": now_text(), "max_recoveries": max_recoveries})
        return self._committed(sorted((_event(row) for row in rows), key=lambda event: event.seq))

    # --- control ---------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> JobEvent | None:
        return await self._change(CANCEL_JOB, {"id": job_id, "now": now_text()})

    async def delete(self, job_id: str) -> JobEvent | JobStatus | None:
        deleted = await self._change(DELETE_JOB, {"id": job_id})
        if deleted is not None:
            return deleted
        row = await self._fetch_one(JOB_STATUS, (job_id,))
        return None if row is None else JobStatus(row["status"])

    async def expire(self, completed_before: str, limit: int) -> list[JobEvent]:
        rows = await self._write(EXPIRE_JOBS, {"before": completed_before, "limit": limit})
        return self._committed(sorted((_event(row) for row in rows), key=lambda event: event.seq))

    async def existing(self, job_ids: list[str]) -> set[str]:
        return {row["id"] for row in await self._fetch_all(EXISTING_JOBS, (job_ids,))}

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
        async with self._connection() as conn:
            async with conn.transaction():
                locked = await (await conn.execute(TRY_LOCK, (PRUNE_LOCK,))).fetchone()
                row = await (await conn.execute(EVENT_HORIZON)).fetchone()
                assert row is not None and locked is not None
                if not locked["locked"]:
                    return row["pruned"]  # another node is pruning right now
                cutoff = row["latest"] - keep_events
                if cutoff > 0:
                    await conn.execute(PRUNE_EVENTS, (cutoff,))
                    await conn.execute(SET_PRUNED_THROUGH, {"cutoff": cutoff})
                await conn.execute(PRUNE_IDEMPOTENCY_KEYS, (keys_before,))
                await conn.execute(PRUNE_DELIVERIES)  # of jobs that are gone, once finished
                await conn.execute(PRUNE_WEBHOOKS)
                return max(cutoff, row["pruned"])
