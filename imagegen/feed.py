"""The one feed of committed changes: job events in commit order, for everything that reacts.

The store publishes to it: on SQLite right after each local commit, on PostgreSQL from the
events table whenever a NOTIFY (or a short poll) says there is more, so on every node it carries
every node's changes in the same order. The broadcaster (event streams), the read cache, the
dispatcher (queue, positions, wake-ups) and the worker pool (cancels) subscribe to it; nobody
looks for events in a write's results.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from .store import JobEvent

log = logging.getLogger(__name__)

Listener = Callable[[Sequence["JobEvent"]], None]


class Feed:
    """Hands each batch of committed events, in order, to every listener, synchronously."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self.last_seq = 0  # the id of the last event published

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def publish(self, events: Sequence[JobEvent]) -> None:
        """Called by the store with events just committed, ids increasing."""
        if not events:
            return
        self.last_seq = events[-1].seq
        for listener in self._listeners:
            try:
                listener(events)
            except Exception:  # one broken listener must not starve the others
                log.exception("a feed listener failed")


FEED = web.AppKey("feed", Feed)
