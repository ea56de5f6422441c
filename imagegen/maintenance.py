"""Background upkeep on every node: event and idempotency-key retention, and (PostgreSQL) the
rescue of jobs whose worker node stopped heartbeating.

On PostgreSQL every node runs this loop, and the store lets one node at a time do each pass
(a transaction-scoped advisory lock), so the work survives any node dying.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from . import logs
from .config import SETTINGS, Settings
from .jobs import timestamp_in
from .store import STORE, JobStore

log = logging.getLogger(__name__)


async def maintain_forever(store: JobStore, settings: Settings) -> None:
    """Prune every events.prune_interval_s; on PostgreSQL rescue every half lease."""
    prune_every = settings.events.prune_interval_s
    # A lease expires lease_s after the last heartbeat; checking twice per lease rescues a
    # dead node's jobs within 1.5 leases of its last heartbeat.
    rescue_every = settings.workers.lease_s / 2 if store.backend == "postgres" else None
    next_prune = time.monotonic()
    while True:
        try:
            if rescue_every is not None:
                rescued = await store.recover(settings.jobs.max_recoveries)
                if rescued:
                    log.warning("rescued %d jobs whose worker stopped heartbeating", len(rescued))
                    logs.event_transitions(rescued)
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + prune_every
                await store.prune(settings.events.retention, timestamp_in(-settings.jobs.idempotency_ttl_s))
        except Exception:
            log.exception("background upkeep failed; trying again later")
        await asyncio.sleep(min(prune_every, rescue_every or prune_every))


async def maintenance_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the upkeep task runs while the app runs."""
    task = asyncio.create_task(maintain_forever(app[STORE], app[SETTINGS]), name="imagegen-maintenance")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
