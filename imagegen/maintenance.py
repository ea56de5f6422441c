"""Background upkeep on every node: job, event and idempotency-key retention, the sweep of image
files nothing points at, and (PostgreSQL) the rescue of jobs whose worker node stopped heartbeating.

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
from .metrics import METRICS, Metrics
from .storage import IMAGES, ImageStore
from .store import STORE, JobStore

log = logging.getLogger(__name__)


# Jobs deleted per retention transaction: small, so that no batch holds the writer (or on
# PostgreSQL the event counter) long while requests wait.
EXPIRE_BATCH = 100

# On a shared data directory (PostgreSQL), a temporary image file is another node's write in
# progress until it is this old; on SQLite the one process has written none yet at start-up.
STALE_TEMP_S = 3600.0


async def expire_jobs(store: JobStore, images: ImageStore, retention_days: float) -> int:
    """Delete the terminal jobs older than the retention, in small batches, and then their
    image files (after the rows are gone, so no URL points at a file that is going)."""
    before = timestamp_in(-retention_days * 86_400)
    deleted = 0
    while True:
        events = await store.expire(before, EXPIRE_BATCH)
        logs.event_transitions(events)
        for event in events:
            await images.delete_job(event.job_id)
        deleted += len(events)
        if len(events) < EXPIRE_BATCH:
            return deleted
        await asyncio.sleep(0)  # let requests in between batches


async def sweep_images(store: JobStore, images: ImageStore) -> int:
    """Remove what a crash or a race left on disk: the image directories of jobs that no longer
    exist (a kill between a delete's commit and its files' removal) and stale temporary files."""
    on_disk = await asyncio.to_thread(images.job_dirs)
    existing = await store.existing(on_disk) if on_disk else set()
    stale_after = 0.0 if store.backend == "sqlite" else STALE_TEMP_S
    return await images.sweep([job_id for job_id in on_disk if job_id not in existing], stale_after)


async def maintain_forever(
    store: JobStore, images: ImageStore, settings: Settings, metrics: Metrics | None = None
) -> None:
    """Sweep the image files once; then prune and expire every events.prune_interval_s (a first
    pass at once); on PostgreSQL rescue every half lease."""
    try:
        swept = await sweep_images(store, images)
        if swept:
            log.info("removed %d image files or directories that no job points at", swept)
    except Exception:
        log.exception("sweeping the image directory failed")
    prune_every = settings.events.prune_interval_s
    # A lease expires lease_s after the last heartbeat; checking twice per lease rescues a
    # dead node's jobs within 1.5 leases of its last heartbeat.
    rescue_every = settings.workers.lease_s / 2 if store.backend == "postgres" else None
    next_prune = time.monotonic()
    while True:
        try:
            if rescue_every is not None:
                rescued = await store.recover(settings.jobs.max_recoveries)
                if metrics is not None:
                    metrics.rescues.inc(len(rescued))
                if rescued:
                    log.warning("rescued %d jobs whose worker stopped heartbeating", len(rescued))
                    logs.event_transitions(rescued)
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + prune_every
                await store.prune(settings.events.retention, timestamp_in(-settings.jobs.idempotency_ttl_s))
                if settings.storage.retention_days > 0:
                    expired = await expire_jobs(store, images, settings.storage.retention_days)
                    if expired:
                        log.info("deleted %d jobs older than %g days", expired, settings.storage.retention_days)
        except Exception:
            log.exception("background upkeep failed; trying again later")
        await asyncio.sleep(min(prune_every, rescue_every or prune_every))


async def maintenance_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the upkeep task runs while the app runs."""
    task = asyncio.create_task(
        maintain_forever(app[STORE], app[IMAGES], app[SETTINGS], app.get(METRICS)), name="imagegen-maintenance"
    )
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
