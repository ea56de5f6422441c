"""The job store: one small protocol of domain operations, with a SQLite and a PostgreSQL backend.

Every SQL string lives in its backend's module (`sqlite.py`, `postgres.py`); nothing else
imports a database driver. Each change commits the job's new state and its event in one
transaction and returns the events it committed; after the commit the store publishes them,
in commit order, to the one feed of committed changes (`feed.py`) that everything reacting to a
change follows.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from ..config import SETTINGS, Settings
from ..feed import FEED, Feed
from ..metrics import METRICS, Metrics
from ..models import TERMINAL, Job, JobStatus
from ..storage import check_data_dir
from .deliveries import Attempt, Delivery, DeliveryStatus, Webhook


class JobEvent:
    """A committed change of a job: its id in the event log, its name, the job after it.

    A plain class with slots rather than a frozen dataclass: every create makes one, on the
    event loop's busiest path, and a frozen dataclass's __init__ is several times slower.
    Treat it as immutable.
    """

    __slots__ = ("seq", "name", "job_id", "snapshot", "job_seq", "status", "owner", "_job", "renderings")

    def __init__(
        self, seq: int, name: str, job_id: str, snapshot: str, job_seq: int, status: str, owner: str | None = None
    ) -> None:
        self.seq = seq
        self.name = name
        self.job_id = job_id
        self.snapshot = snapshot  # the job's row as JSON, exactly as committed with this event
        self.job_seq = job_seq  # the job's own seq (its place in creation order)
        self.status = status  # the job's status after the change
        self.owner = owner  # the job's tenant (None: made with auth off), to filter streams by
        self._job: Job | None = None
        # Whoever renders this event for clients (the HTTP layer) keeps its renderings here:
        # a committed event never changes, so thousands of subscribers and pollers share one.
        self.renderings: dict[Any, bytes] | None = None

    def __repr__(self) -> str:
        return f"JobEvent({self.seq}, {self.name!r}, {self.job_id!r}, status={self.status!r})"

    @property
    def job(self) -> Job:
        # Parsed on first use: most events of a busy server (a create with nobody streaming)
        # are never looked at beyond their job id and status.
        if self._job is None:
            self._job = Job.from_row(json.loads(self.snapshot))
        return self._job

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def pending(self) -> bool:
        return self.status == JobStatus.PENDING


@dataclass(frozen=True)
class NewJob:
    """A job to create: everything but its seq, which the database assigns."""

    job_id: str
    num_images: int
    animal: str
    prompt: str | None
    now: str  # created_at and updated_at
    owner: str | None = None  # the tenant creating it; None with auth off
    webhook: Webhook | None = None  # where its chosen events are POSTed, if anywhere


@dataclass(frozen=True)
class Idempotency:
    """The Idempotency-Key a create came with, and the fingerprint of its body."""

    key: str
    request_hash: str


@dataclass(frozen=True)
class KeyReused:
    """The create found its Idempotency-Key already used: by this job, for this body or not."""

    job_id: str
    same_body: bool


@dataclass(frozen=True)
class PendingJob:
    """A pending job as the dispatcher needs it: its id, creation order and backoff."""

    job_id: str
    seq: int
    not_before: str | None
    owner: str | None = None


class QueueLimit(Exception):
    """The store refused a create: `pending` jobs are waiting, the most allowed (of the
    creating tenant's own, if `tenant`, else of all)."""

    def __init__(self, pending: int, tenant: bool = False) -> None:
        super().__init__(f"{pending} jobs are pending")
        self.pending = pending
        self.tenant = tenant


class JobStore(Protocol):
    """What the service needs of a database: each method one domain operation, one transaction."""

    backend: str  # "sqlite" or "postgres"
    # True where a commit reaches the feed before the writer hears it committed (SQLite, one
    # process): an in-memory copy kept from the feed is then never older than the database.
    feed_is_synchronous: bool

    # --- admission and reads ---
    async def create(
        self, new: NewJob, idempotency: Idempotency | None, max_pending: int | None, tenant_max_pending: int | None = None
    ) -> JobEvent | KeyReused:
        """Commit a new pending job and its job.created event; with `max_pending` (or
        `tenant_max_pending`), raise QueueLimit instead if that many jobs (of `new.owner`'s)
        are already pending, counted in the transaction. Idempotency keys are per owner."""
    async def idempotency_key_job(self, key: str, owner: str | None) -> str | None: ...
    async def get(self, job_id: str) -> Job | None: ...
    async def list(self, below_seq: int, limit: int, status: JobStatus | None, owner: str | None = None) -> list[Job]:
        """Jobs with seq below `below_seq`, newest first; only `owner`'s if given."""
    async def pending(self) -> tuple[list[PendingJob], int]:
        """Every pending job, oldest first, and the id of the last event that state includes."""

    # --- the workers' side: results are fenced on the attempt (and on PostgreSQL the lease) ---
    async def claim(self, job_id: str, owner: str, lease_s: float) -> JobEvent | None: ...
    async def add_image(self, job: Job, path: str, owner: str) -> JobEvent | None: ...
    async def complete(self, job: Job, owner: str) -> JobEvent | None: ...
    async def fail(self, job: Job, code: str, message: str, retryable: bool, owner: str) -> JobEvent | None: ...
    async def retry(self, job: Job, code: str, message: str, not_before: str, owner: str) -> JobEvent | None: ...
    async def release_all(self, owner: str) -> list[JobEvent]:
        """Hand back every job `owner` holds (a graceful stop): pending again, at once."""
    async def heartbeat(self, job_ids: list[str], owner: str, lease_s: float) -> int:
        """Extend `owner`'s leases on these jobs by `lease_s`, where they have not lapsed yet."""
    async def recover(self, max_recoveries: int) -> list[JobEvent]:
        """Hand back the processing jobs nobody draws any more: on SQLite every one (the one
        process calls it as it starts), on PostgreSQL those whose lease expired (any node, one
        at a time). A job found abandoned `max_recoveries` times fails instead (a poison job)."""

    # --- control ---
    async def cancel(self, job_id: str) -> JobEvent | None: ...
    async def delete(self, job_id: str) -> JobEvent | JobStatus | None:
        """Remove a terminal job: its job.deleted event, or the status that kept it, or None."""

    async def expire(self, completed_before: str, limit: int) -> list[JobEvent]:
        """Delete up to `limit` terminal jobs that ended before `completed_before`, with their
        idempotency keys, each with its job.deleted event (retention). On PostgreSQL one node
        at a time does it; the others get []."""
    async def existing(self, job_ids: list[str]) -> set[str]:
        """Which of these jobs exist."""

    # --- the event log ---
    async def events_after(
        self, seq: int, job_id: str | None, limit: int, owner: str | None = None
    ) -> list[JobEvent]:
        """Events after `seq` in id order: of one job, or only of `owner`'s jobs, if given."""
    async def latest_event(self, job_id: str) -> JobEvent | None: ...
    async def horizon(self) -> tuple[int, int]:
        """(latest, pruned): events with ids above `pruned`, up to `latest`, can be replayed."""
    async def prune(self, keep_events: int, keys_before: str) -> int:
        """Keep the newest `keep_events` events and the idempotency keys made since
        `keys_before`, and drop the finished webhook deliveries (and webhooks) of jobs that
        are gone; return the new pruned-through event id. On PostgreSQL one node at a
        time does it; the others return at once."""

    # --- webhook deliveries (store/deliveries.py; each backend's *_deliveries.py) ---
    async def claim_deliveries(
        self, owner: str, now_ms: int, lease_ms: int, limit: int, busy_hosts: Sequence[str]
    ) -> list[Delivery]:
        """Lease to `owner` up to `limit` due deliveries, each its job's earliest pending one, none to `busy_hosts`."""
    async def record_attempt(
        self, owner: str, delivery: Delivery, attempt: Attempt, status: DeliveryStatus, next_at_ms: int | None
    ) -> None:
        """Append the attempt, set the delivery's status (and next attempt), lift its lease: if
        `owner` still holds that lease (else another took it over, and nothing is recorded)."""
    async def release_deliveries(self, owner: str, delivery_ids: Sequence[str] | None = None) -> None: ...
    async def deliveries_of(self, job_id: str) -> list[Delivery]: ...
    async def retry_delivery(self, job_id: str, delivery_id: str, now_ms: int, now: str) -> Delivery | None:
        """A failed or given-up delivery pending again, due now; None if there is no such
        delivery; DeliveryNotRetryable if it is pending or delivered."""
    async def next_delivery_due(self) -> int | None:
        """When the soonest pending delivery is due (Unix ms), None if none is pending."""

    # --- operations (health and metrics) ---
    async def check_write(self) -> None:
        """Commit one small write (a row of `meta`), as every write is committed; raise if the
        database cannot. The readiness check: its caller bounds it with a timeout."""
    async def job_counts(self) -> tuple[dict[str, int], str | None]:
        """How many jobs are in each status (absent: none), and when the oldest pending job was
        created (None: none is pending)."""

    async def close(self) -> None: ...


def list_query(
    queries: dict[tuple[bool, bool], str], below_seq: int, limit: int, status: JobStatus | None, owner: str | None
) -> tuple[str, tuple[Any, ...]]:
    """A backend's list query for the filters given, keyed (by owner?, by status?), and its
    parameters: owner, status, below_seq, limit, in that order, each filter only if given."""
    filters = (*((owner,) if owner is not None else ()), *((status.value,) if status is not None else ()))
    return queries[(owner is not None, status is not None)], (*filters, below_seq, limit)


def events_query(
    queries: dict[str, str], seq: int, limit: int, job_id: str | None, owner: str | None
) -> tuple[str, tuple[Any, ...]]:
    """A backend's replay query, keyed "all", "job" (one job's) or "owner" (one tenant's), and
    its parameters: the job or owner if given, then seq, then limit."""
    if job_id is not None:
        return queries["job"], (job_id, seq, limit)
    if owner is not None:
        return queries["owner"], (owner, seq, limit)
    return queries["all"], (seq, limit)


STORE = web.AppKey("store", JobStore)


async def open_store(settings: Settings, feed: Feed, metrics: Metrics | None = None) -> JobStore:
    """Open the configured backend (migrating its schema), publishing to `feed`; with `metrics`,
    it counts what it commits and how long its writes take."""
    if settings.storage.backend == "postgres":
        from .postgres import PostgresStore

        return await PostgresStore.open(settings.storage, feed, metrics)
    from .sqlite import SQLiteStore

    return await SQLiteStore.open(settings.database_path, feed, metrics)


async def store_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the store is open while the app runs, and closes last."""
    settings = app[SETTINGS]
    # The image directory first: the store is the first resource to open, and on SQLite the
    # database lives there too. Each failure is one StartupError, with nothing left open.
    await asyncio.to_thread(check_data_dir, settings.storage.data_dir)
    store = await open_store(settings, app[FEED], app.get(METRICS))
    app[STORE] = store
    # In a finally: when a later context fails at start-up, aiohttp skips this cleanup and
    # run_app only closes the suspended generator; without it, open connections' threads
    # would keep the process alive after the error.
    try:
        yield
    finally:
        await store.close()
