"""The dispatcher: which job a free worker takes next, queue positions, and the pending count.

Two implementations, chosen by the backend:
- LocalDispatcher (SQLite, one process): an asyncio.Queue of job ids (a TenantQueue: tenants
  take turns), filled from the feed and, at start-up, from the pending jobs (after handing back
  what a crash left processing); retry backoffs wait on timers.
- DatabaseDispatcher (PostgreSQL, many nodes): the database hands out the next runnable job,
  tenants taking turns (FOR UPDATE SKIP LOCKED); the feed only wakes idle workers, within
  milliseconds of a commit on any node, and a short poll covers a wake-up that was missed.

Fairness is the same on both: round-robin over the tenants that have runnable jobs, oldest
first within a tenant (jobs made with auth off are one tenant of their own).

Both keep a QueueIndex from the feed: every pending job's place in creation order, for queue
positions (and on SQLite, the count that backpressure checks; on PostgreSQL the create's own
transaction counts).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import json
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import suppress
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from .config import SETTINGS, Settings
from . import logs
from .feed import FEED, Feed
from .metrics import METRICS, Metrics
from .models import Job
from .store import STORE, JobEvent, JobStore, PendingJob

if TYPE_CHECKING:
    from .store.postgres import PostgresStore

log = logging.getLogger(__name__)

# How long an idle worker on PostgreSQL waits for a wake-up before it asks the database
# anyway: what a lost notification (a dropped connection) costs at most.
CLAIM_POLL_S = 1.0


class QueueIndex:
    """Every pending job's seq, sorted: a job's queue position is its index here.

    Kept from the feed, so it is a cache of committed facts on every node; loaded at start-up
    from the database, with the events that arrive during the load applied after it.
    """

    def __init__(self) -> None:
        self._pending: dict[str, tuple[int, str | None]] = {}  # job id -> (seq, owner)
        self._order: list[int] = []
        self._by_owner: collections.Counter[str | None] = collections.Counter()
        self._loading: list[JobEvent] | None = None

    @property
    def count(self) -> int:
        return len(self._pending)

    def count_of(self, owner: str | None) -> int:
        """How many of `owner`'s jobs are pending."""
        return self._by_owner[owner]

    def position(self, job_id: str) -> int | None:
        """1 for the next pending job to be claimed; None if the job is not pending."""
        pending = self._pending.get(job_id)
        return None if pending is None else bisect.bisect_left(self._order, pending[0]) + 1

    async def load(self, store: JobStore) -> list[PendingJob]:
        """Fill the index from the database; returns the pending jobs, oldest first."""
        self._loading = []
        try:
            pending, as_of = await store.pending()
            for job in pending:
                self._track(job.job_id, job.seq, job.owner, True)
        finally:
            buffered, self._loading = self._loading, None
        self.on_events([event for event in buffered if event.seq > as_of])
        return pending

    def on_events(self, events: Sequence[JobEvent]) -> None:
        """Feed listener."""
        if self._loading is not None:
            self._loading.extend(events)
            return
        for event in events:
            self._track(event.job_id, event.job_seq, event.owner, event.pending)

    def _track(self, job_id: str, seq: int, owner: str | None, pending: bool) -> None:
        if pending and job_id not in self._pending:
            self._pending[job_id] = (seq, owner)
            bisect.insort(self._order, seq)
            self._by_owner[owner] += 1
        elif not pending and job_id in self._pending:
            seq, owner = self._pending.pop(job_id)
            del self._order[bisect.bisect_left(self._order, seq)]
            self._by_owner[owner] -= 1
            if not self._by_owner[owner]:
                del self._by_owner[owner]


class Dispatcher(Protocol):
    """Hands claimed jobs to the workers."""

    index: QueueIndex
    # Whether the store's create must count pending jobs itself (many nodes), or the index's
    # count, checked in memory before the create, is exact (one process).
    counts_in_database: bool

    async def start(self) -> None:
        """Subscribe to the feed and take up the jobs that are waiting."""

    async def next_job(self, owner: str, lease_s: float) -> Job:
        """Wait for a job this worker may draw, and claim it."""

    def job_done(self) -> None:
        """The job next_job returned is finished with (drawn, failed or handed back)."""

    def close(self) -> None: ...


def _seconds_until(timestamp: str) -> float:
    return (datetime.fromisoformat(timestamp) - datetime.now(UTC)).total_seconds()


def _not_before(event: JobEvent) -> str | None:
    return json.loads(event.snapshot).get("not_before")


class _FeedFollower:
    """What both dispatchers keep from the feed: the queue index, and timers for retries'
    backoffs; `_on_events` is each one's own reaction to a batch."""

    def __init__(self, feed: Feed) -> None:
        self._feed = feed
        self.index = QueueIndex()
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def _follow(self) -> None:
        self._feed.subscribe(self.index.on_events)
        self._feed.subscribe(self._on_events)

    def _on_events(self, events: Sequence[JobEvent]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop following the feed and forget scheduled retries (they are pending in the
        database: the next start, or another node, takes them up)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._feed.unsubscribe(self._on_events)
        self._feed.unsubscribe(self.index.on_events)


class _Turns:
    """Job ids by owner, owners in turn order: the first owner's oldest job goes next, and
    that owner then waits for every other owner's turn."""

    def __init__(self) -> None:
        self._owners: collections.OrderedDict[str | None, collections.deque[str]] = collections.OrderedDict()
        self._size = 0

    def __len__(self) -> int:  # asyncio.Queue's qsize() and empty() use len(self._queue)
        return self._size

    def __iter__(self) -> Iterator[tuple[str | None, str]]:  # for asyncio.Queue's repr
        return ((owner, job_id) for owner, waiting in self._owners.items() for job_id in waiting)

    def append(self, owner: str | None, job_id: str, first: bool = False) -> None:
        waiting = self._owners.get(owner)
        if waiting is None:
            waiting = self._owners[owner] = collections.deque()  # a new owner takes the last turn
        if first:
            waiting.appendleft(job_id)
        else:
            waiting.append(job_id)
        self._size += 1

    def pop_next(self) -> tuple[str | None, str]:
        owner, waiting = next(iter(self._owners.items()))
        job_id = waiting.popleft()
        if waiting:
            self._owners.move_to_end(owner)
        else:
            del self._owners[owner]
        self._size -= 1
        return owner, job_id


class TenantQueue(asyncio.Queue[tuple[str | None, str]]):
    """An asyncio.Queue of (owner, job id) that hands out jobs round-robin over owners, and
    each owner's jobs in the order they were put: one tenant's backlog cannot hold up another's.

    Built the way the standard library builds PriorityQueue and LifoQueue, by replacing the
    queue's storage (`_queue`) and its hooks, so waiting, task_done and join are asyncio.Queue's own.
    """

    def _init(self, maxsize: int) -> None:
        self._queue = _Turns()  # type: ignore[assignment]
        self._first = False

    def _put(self, item: tuple[str | None, str]) -> None:
        self._queue.append(*item, first=self._first)  # type: ignore[call-arg]

    def _get(self) -> tuple[str | None, str]:
        return self._queue.pop_next()  # type: ignore[attr-defined,no-any-return]

    def put_back(self, item: tuple[str | None, str]) -> None:
        """Return a job that was taken but could not be claimed to the head of its owner's
        line (put_nowait does the bookkeeping and wakes a getter; _put reads the flag)."""
        self._first = True
        try:
            self.put_nowait(item)
        finally:
            self._first = False


class LocalDispatcher(_FeedFollower):
    """SQLite: the queue of job ids is an asyncio.Queue, and the one process owns every job."""

    counts_in_database = False

    def __init__(self, store: JobStore, feed: Feed, settings: Settings, metrics: Metrics | None = None) -> None:
        super().__init__(feed)
        self._store = store
        self._metrics = metrics
        self._max_recoveries = settings.jobs.max_recoveries
        # Job ids waiting for a worker, by tenant. The database is the truth: this queue is
        # rebuilt from the pending jobs at every start.
        self.queue = TenantQueue()
        self.recovered: list[JobEvent] = []  # what start() handed back, for the start-up line

    async def start(self) -> None:
        # Alone on the file, so whatever is processing was running when the process died.
        # Handed back before subscribing: the pending jobs read next include those.
        self.recovered = await self._store.recover(self._max_recoveries)
        logs.event_transitions(self.recovered)
        if self._metrics is not None:
            self._metrics.recoveries.inc(len(self.recovered))
        self._follow()
        for job in await self.index.load(self._store):
            self._enqueue(job.owner, job.job_id, job.not_before)

    def _on_events(self, events: Sequence[JobEvent]) -> None:
        for event in events:
            # Queued from the commit itself, not from the creating request: a request
            # cancelled after its job committed must not leave the job waiting for a restart.
            if event.name in ("job.created", "job.requeued"):
                self.queue.put_nowait((event.owner, event.job_id))
            elif event.name == "job.retrying":
                self._enqueue(event.owner, event.job_id, _not_before(event))
            elif event.terminal and (timer := self._timers.pop(event.job_id, None)):
                timer.cancel()  # a retry that will never be wanted

    def _enqueue(self, owner: str | None, job_id: str, not_before: str | None) -> None:
        wait_s = _seconds_until(not_before) if not_before else 0.0
        if wait_s <= 0:
            self.queue.put_nowait((owner, job_id))
            return

        def enqueue() -> None:
            self._timers.pop(job_id, None)
            self.queue.put_nowait((owner, job_id))

        self._timers[job_id] = asyncio.get_running_loop().call_later(wait_s, enqueue)

    async def next_job(self, owner: str, lease_s: float) -> Job:
        while True:
            job_owner, job_id = await self.queue.get()
            try:
                claimed = await self._store.claim(job_id, owner, lease_s)
            except Exception:
                # The database failed the claim (a full disk, an I/O error): the job is still
                # pending, and this queue is its only way to a worker until the next start.
                self.queue.task_done()
                self.queue.put_back((job_owner, job_id))
                raise
            except BaseException:
                self.queue.task_done()  # stopping: the next start reloads whatever is pending
                raise
            if claimed is not None:
                return claimed.job
            self.queue.task_done()  # no longer pending: canceled, or claimed already

    def job_done(self) -> None:
        self.queue.task_done()


class DatabaseDispatcher(_FeedFollower):
    """PostgreSQL: the database decides who draws what; the feed wakes idle workers."""

    counts_in_database = True

    def __init__(self, store: PostgresStore, feed: Feed, settings: Settings) -> None:
        super().__init__(feed)
        self._store = store
        self._wake = asyncio.Event()

    async def start(self) -> None:
        # No recovery here: jobs another node is drawing carry its live lease; the rescuer
        # (maintenance.py) hands back only jobs whose lease expired.
        self._follow()
        await self.index.load(self._store)
        self._wake.set()

    def _on_events(self, events: Sequence[JobEvent]) -> None:
        for event in events:
            if event.name in ("job.created", "job.requeued"):
                self._wake.set()
            elif event.name == "job.retrying" and (not_before := _not_before(event)):
                # Every node wakes when the backoff ends; the database gives the job to one.
                loop = asyncio.get_running_loop()
                self._timers[event.job_id] = loop.call_later(max(0.0, _seconds_until(not_before)), self._wake.set)
            elif event.terminal and (timer := self._timers.pop(event.job_id, None)):
                timer.cancel()

    async def next_job(self, owner: str, lease_s: float) -> Job:
        while True:
            # Cleared before asking, so a commit that lands while we ask wakes us again.
            self._wake.clear()
            claimed = await self._store.claim_next(owner, lease_s)
            if claimed is not None:
                return claimed.job
            with suppress(TimeoutError):
                async with asyncio.timeout(CLAIM_POLL_S):
                    await self._wake.wait()

    def job_done(self) -> None:
        pass


DISPATCHER = web.AppKey("dispatcher", Dispatcher)


async def dispatcher_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the dispatcher follows the feed while the app runs."""
    store = app[STORE]
    dispatcher: Dispatcher
    if store.backend == "postgres":
        dispatcher = DatabaseDispatcher(store, app[FEED], app[SETTINGS])  # type: ignore[arg-type]
    else:
        dispatcher = LocalDispatcher(store, app[FEED], app[SETTINGS], app.get(METRICS))
    await dispatcher.start()
    app[DISPATCHER] = dispatcher
    yield
    dispatcher.close()
