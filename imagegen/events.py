"""Live job events: fan-out of committed events to stream subscribers, and replay.

Every job change is written to the event log in the same transaction as the change, and
reaches the Broadcaster only through the feed, after that commit, so a subscriber never sees
a state that was not committed. A subscriber is registered *before* its stream reads the log,
so replay plus live delivery has no gap; the stream drops live events it has already replayed
(ids are strictly increasing in commit order, on every node), so it has no duplicate.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable, Sequence

from aiohttp import web

from .config import SETTINGS
from .feed import FEED
from .store import JobEvent, JobStore

# Rows fetched per replay query: large enough to be quick, small enough to stream early.
REPLAY_PAGE = 500


class Subscription:
    """One stream's bounded buffer of live events, for every job or for one job."""

    def __init__(self, job_id: str | None, limit: int, owner: str | None = None) -> None:
        self.job_id = job_id
        self.owner = owner  # for every job's stream with auth on: only this tenant's jobs
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
        # Every-job subscriptions of one tenant (auth on): they see only its jobs' events.
        self._by_owner: dict[str, set[Subscription]] = collections.defaultdict(set)
        self._by_job: dict[str, set[Subscription]] = collections.defaultdict(set)
        self._closing = False

    @property
    def subscriber_count(self) -> int:
        return len(self._all) + sum(len(subs) for groups in (self._by_owner, self._by_job) for subs in groups.values())

    def subscribe(self, job_id: str | None = None, owner: str | None = None) -> Subscription:
        """Follow one job's events, or every job's (of `owner` only, if given)."""
        subscription = Subscription(job_id, self._buffer, owner)
        if self._closing:
            subscription.close("shutdown")
        elif job_id is not None:
            self._by_job[job_id].add(subscription)
        elif owner is not None:
            self._by_owner[owner].add(subscription)
        else:
            self._all.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscription.close("unsubscribed")
        if subscription.job_id is None and subscription.owner is None:
            self._all.discard(subscription)
            return
        groups, key = (self._by_job, subscription.job_id) if subscription.job_id is not None else (
            self._by_owner, subscription.owner
        )
        followers = groups.get(key)  # type: ignore[arg-type]
        if followers is not None:
            followers.discard(subscription)
            if not followers:
                del groups[key]  # type: ignore[arg-type]

    def publish(self, events: Sequence[JobEvent]) -> None:
        """Feed listener: fan the batch's events out, in commit order."""
        by_owner = self._by_owner
        for event in events:
            for subscription in list(self._all):
                subscription.push(event)
            if by_owner and event.owner is not None:
                for subscription in list(by_owner.get(event.owner, ())):
                    subscription.push(event)
            for subscription in list(self._by_job.get(event.job_id, ())):
                subscription.push(event)

    def close_all(self) -> None:
        """End every subscription (shutdown): their streams finish at once."""
        self._closing = True
        groups = (*self._by_owner.values(), *self._by_job.values())
        for subscription in [*self._all, *(s for subs in groups for s in subs)]:
            subscription.close("shutdown")


class ReplayGap(Exception):
    """Retention pruned events a replay still had to send."""


async def replay(
    store: JobStore, seq: int, job_id: str | None = None, owner: str | None = None
) -> AsyncIterator[JobEvent]:
    """Every retained event after `seq` (of one job, or of `owner`'s jobs, if given), page by
    page, in order.

    Raises ReplayGap if retention pruned events after `seq` while the replay went on.
    """
    while True:
        events = await store.events_after(seq, job_id, REPLAY_PAGE, owner)
        _, pruned = await store.horizon()
        if pruned > seq:
            raise ReplayGap(f"events after {seq} were pruned during the replay")
        for event in events:
            yield event
        if len(events) < REPLAY_PAGE:
            return
        seq = events[-1].seq


BROADCASTER = web.AppKey("broadcaster", Broadcaster)


async def broadcaster_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the broadcaster follows the feed while the app runs."""
    broadcaster = Broadcaster(app[SETTINGS].events.subscriber_buffer)
    app[FEED].subscribe(broadcaster.publish)
    app[BROADCASTER] = broadcaster
    yield
    broadcaster.close_all()
    app[FEED].unsubscribe(broadcaster.publish)


async def end_streams(app: web.Application) -> None:
    """on_shutdown: open streams end now, so they do not hold the server's exit."""
    if BROADCASTER in app:
        app[BROADCASTER].close_all()
