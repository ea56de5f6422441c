"""Live job events: fan-out of committed events to stream subscribers, replay, and retention.

Every job change is written to the events table in the same transaction as the change
(jobs.py), and reaches the Broadcaster only after that commit (db.after_commit), so a
subscriber never sees a state that was not committed. A subscriber is registered *before*
its stream reads the table, so replay plus live delivery has no gap; the stream drops live
events it has already replayed (ids are strictly increasing), so it has no duplicate.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from . import db
from .config import SETTINGS
from .jobs import JOBS, JobEvent, JobService, committed_events

log = logging.getLogger(__name__)

# Rows fetched per replay query: large enough to be quick, small enough to stream early.
REPLAY_PAGE = 500


class Subscription:
    """One stream's bounded buffer of live events, for every job or for one job."""

    def __init__(self, job_id: str | None, limit: int) -> None:
        self.job_id = job_id
        self._limit = limit
        self._events: collections.deque[JobEvent] = collections.deque()
        self._ready = asyncio.Event()
        self.closed: str | None = None  # why the subscription ended, once it has
        self.on_overflow: Callable[[], None] | None = None

    def push(self, event: JobEvent) -> None:
        if self.closed is not None:
            return
        if len(self._events) >= self._limit:
            # Never block the publisher: a subscriber that fell this far behind is cut off,
            # and resumes from its Last-Event-ID when it reconnects.
            self.close("overflow")
            if self.on_overflow is not None:
                self.on_overflow()
            return
        self._events.append(event)
        self._ready.set()

    def close(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
            self._events.clear()
            self._ready.set()

    async def next(self) -> JobEvent | None:
        """The next live event, or None once the subscription is closed."""
        events = await self._wait()
        return events.popleft() if events else None

    async def take(self) -> list[JobEvent]:
        """Every live event waiting (at least one), or [] once the subscription is closed.

        A stream that fell a little behind catches up with one write instead of one per event.
        """
        events = await self._wait()
        taken = list(events)
        events.clear()
        return taken

    async def _wait(self) -> collections.deque[JobEvent]:
        while not self._events:
            if self.closed is not None:
                return self._events
            self._ready.clear()
            await self._ready.wait()
        return self._events


class Broadcaster:
    """Delivers each committed job event to the subscriptions that follow it."""

    def __init__(self, buffer: int) -> None:
        self._buffer = buffer
        self._all: set[Subscription] = set()
        self._by_job: dict[str, set[Subscription]] = collections.defaultdict(set)
        self._closing = False

    @property
    def subscriber_count(self) -> int:
        return len(self._all) + sum(len(subs) for subs in self._by_job.values())

    def subscribe(self, job_id: str | None = None) -> Subscription:
        subscription = Subscription(job_id, self._buffer)
        if self._closing:
            subscription.close("shutdown")
        elif job_id is None:
            self._all.add(subscription)
        else:
            self._by_job[job_id].add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscription.close("unsubscribed")
        if subscription.job_id is None:
            self._all.discard(subscription)
            return
        followers = self._by_job.get(subscription.job_id)
        if followers is not None:
            followers.discard(subscription)
            if not followers:
                del self._by_job[subscription.job_id]

    def publish(self, results: list[Any]) -> None:
        """db.after_commit hook: fan the batch's events out, in commit order."""
        for event in committed_events(results):
            for subscription in list(self._all):
                subscription.push(event)
            for subscription in list(self._by_job.get(event.job_id, ())):
                subscription.push(event)

    def close_all(self) -> None:
        """End every subscription (shutdown): their streams finish at once."""
        self._closing = True
        for subscription in [*self._all, *(s for subs in self._by_job.values() for s in subs)]:
            subscription.close("shutdown")


class ReplayGap(Exception):
    """Retention pruned events a replay still had to send."""


class EventLog:
    """Reads the events table for replay and keeps it within its retention."""

    def __init__(self, database: db.Database, retention: int) -> None:
        self._db = database
        self._retention = retention

    async def horizon(self) -> tuple[int, int]:
        """(latest, pruned): ids above `pruned` up to `latest` can be replayed."""
        row = await self._db.fetch_one(db.EVENT_HORIZON)
        assert row is not None
        return row["latest"], row["pruned"]

    async def after(self, seq: int, job_id: str | None = None) -> AsyncIterator[JobEvent]:
        """Every retained event after `seq` (of one job, if given), page by page, in order.

        Raises ReplayGap if retention pruned events after `seq` while the replay went on.
        """
        while True:
            if job_id is None:
                rows = await self._db.fetch_all(db.EVENTS_AFTER, (seq, REPLAY_PAGE))
            else:
                rows = await self._db.fetch_all(db.JOB_EVENTS_AFTER, (job_id, seq, REPLAY_PAGE))
            _, pruned = await self.horizon()
            if pruned > seq:
                raise ReplayGap(f"events after {seq} were pruned during the replay")
            for row in rows:
                yield JobEvent.from_row(row)
            if len(rows) < REPLAY_PAGE:
                return
            seq = rows[-1]["seq"]

    async def latest_of(self, job_id: str) -> JobEvent | None:
        row = await self._db.fetch_one(db.LATEST_JOB_EVENT, (job_id,))
        return None if row is None else JobEvent.from_row(row)

    async def prune(self) -> int:
        """Delete all but the newest `retention` events; return the new pruned-through id."""
        latest, _ = await self.horizon()
        cutoff = latest - self._retention

        def op(conn: Any) -> int:
            if cutoff > 0:
                conn.execute(db.PRUNE_EVENTS, (cutoff,))
                conn.execute(db.SET_PRUNED_THROUGH, (cutoff,))
            return cutoff

        return await self._db.write(op)


BROADCASTER = web.AppKey("broadcaster", Broadcaster)
EVENT_LOG = web.AppKey("event_log", EventLog)


async def events_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the broadcaster hears every commit; a task prunes old events."""
    settings = app[SETTINGS].events
    database = app[db.DATABASE]
    broadcaster = Broadcaster(settings.subscriber_buffer)
    database.after_commit.append(broadcaster.publish)
    event_log = EventLog(database, settings.retention)
    app[BROADCASTER] = broadcaster
    app[EVENT_LOG] = event_log
    pruner = asyncio.create_task(
        _prune_forever(event_log, app[JOBS], settings.prune_interval_s), name="imagegen-pruner"
    )
    yield
    broadcaster.close_all()
    pruner.cancel()
    await asyncio.gather(pruner, return_exceptions=True)
    database.after_commit.remove(broadcaster.publish)


async def _prune_forever(event_log: EventLog, jobs: JobService, interval_s: float) -> None:
    """Keep the events table within its retention, and forget expired idempotency keys."""
    while True:
        try:
            await event_log.prune()
            await jobs.prune_idempotency_keys()
        except Exception:
            log.exception("pruning old events or idempotency keys failed; trying again later")
        await asyncio.sleep(interval_s)


async def end_streams(app: web.Application) -> None:
    """on_shutdown: open streams end now, so they do not hold the server's exit."""
    if BROADCASTER in app:
        app[BROADCASTER].close_all()
