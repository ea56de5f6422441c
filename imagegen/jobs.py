"""The job service: admission (validation, idempotency, backpressure), reads, cancel and delete.

The store commits each change with its event; the dispatcher hands jobs to the workers; this
service decides what a client may ask for and raises domain errors when it may not.

Every method takes the caller's `tenant` (None with auth off: every job is visible). A job of
another tenant, or of none, is not found, exactly as a job that does not exist: a job's owner
never changes, so checking it before acting on the job is as good as checking it in the write.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .config import SETTINGS, Settings
from .dispatch import DISPATCHER, Dispatcher
from .errors import IdempotencyKeyReused, InvalidJob, JobConflict, JobNotFound, QueueFull
from . import logs
from .feed import FEED, Feed
from .auth import Tenant
from .models import Job, JobStatus, now_text, time_text
from .storage import IMAGES, ImageStore
from .store import STORE, Idempotency, JobEvent, JobStore, KeyReused, NewJob, QueueLimit
from .store.deliveries import Webhook
from .webhooks import DEFAULT_WEBHOOK_EVENTS, SIGNER
from .webhooks.addresses import check_url


def uuid7() -> str:
    """A new job id: a version-7 UUID (RFC 9562), its first 48 bits the time in milliseconds.

    Ids that grow with time are appended to the end of the id indexes instead of landing at
    random places in them, which makes the inserts of a busy writer several times cheaper.
    """
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 9562 variant
    text = f"{value:032x}"  # uuid.UUID's own formatting, without building the object
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def request_hash(num_images: int, animal: str | None, prompt: str | None, webhook: Webhook | None = None) -> str:
    """A fingerprint of a create request's meaning, to tell a retried request from a new one."""
    meaning: list[Any] = [num_images, animal, prompt]
    if webhook is not None:  # appended only when present: the fingerprints of older keys still match
        meaning += [webhook.url, list(webhook.events)]
    canonical = json.dumps(meaning, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def timestamp_in(seconds: float) -> str:
    """now + `seconds`, in the API's time format."""
    return time_text(time.time_ns() // 1_000_000 + int(seconds * 1000))


@dataclass(frozen=True)
class Created:
    """What POST /generations made: the job's id, and whether an earlier request with the same
    Idempotency-Key made it (nothing new was created)."""

    job_id: str
    replayed: bool = False


# How many jobs the service keeps in memory for reads (a few MB at most).
RECENT_JOBS = 10_000

# Retry-After of a 429 for a full queue: long enough for workers to take a few jobs, short
# enough that a client does not give up.
RETRY_AFTER_FULL_S = 5


class JobService:
    """Creates, reads, cancels and deletes jobs; each change is one committed event."""

    def __init__(
        self, store: JobStore, feed: Feed, dispatcher: Dispatcher, images: ImageStore, settings: Settings,
        webhooks_on: bool = False,
    ) -> None:
        self._store = store
        self._feed = feed
        self._dispatcher = dispatcher
        self._images = images
        self._settings = settings.jobs
        self._webhooks = settings.webhooks
        # Whether the webhook secret is set: without it no receiver could verify a delivery,
        # so a create that asks for a webhook is refused.
        self.webhooks_on = webhooks_on
        self._max_pending = settings.workers.max_pending
        self._admitting = 0  # creates admitted but not yet committed (counted in memory)
        self._admitting_of: collections.Counter[str | None] = collections.Counter()  # the same, by tenant
        # The most recently changed jobs, each as its latest committed event, so that polling
        # skips the database. Kept only where the feed hears of a commit before its writer
        # does (SQLite): an entry is then never older than what the database would return.
        # Across nodes the feed trails other nodes' commits, so reads go to the database.
        self._recent: collections.OrderedDict[str, JobEvent] | None = None
        if store.feed_is_synchronous:
            self._recent = collections.OrderedDict()
            feed.subscribe(self._remember)

    def _remember(self, events: Sequence[JobEvent]) -> None:
        recent = self._recent
        assert recent is not None
        for event in events:
            if event.name == "job.deleted":
                recent.pop(event.job_id, None)
            else:
                recent[event.job_id] = event
                recent.move_to_end(event.job_id)
                if len(recent) > RECENT_JOBS:
                    recent.popitem(last=False)

    def close(self) -> None:
        self._feed.unsubscribe(self._remember)

    # --- reads -----------------------------------------------------------------------------

    def queue_position(self, job_id: str) -> int | None:
        """1 for the next pending job to be claimed; None if the job is not pending."""
        return self._dispatcher.index.position(job_id)

    def latest(self, job_id: str) -> JobEvent | None:
        """The job's last committed event, if it is kept in memory (the hot path of polling).

        Not moved to the end: what stays in memory is what changed last, not what was read
        last, which keeps this, the commonest read, to one dict lookup.
        """
        return None if self._recent is None else self._recent.get(job_id)

    def latest_visible(self, job_id: str, tenant: Tenant | None) -> JobEvent | None:
        """latest(), if `tenant` may see the job."""
        latest = self.latest(job_id)
        return latest if latest is not None and visible(latest.owner, tenant) else None

    async def find(self, job_id: str, tenant: Tenant | None) -> Job | None:
        """The job, if it exists and `tenant` may see it."""
        latest = self.latest(job_id)
        if latest is not None:
            job: Job | None = latest.job
        else:
            job = await self._store.get(job_id)
            # A commit that landed while we read has already put the newer state in _recent; a
            # job read from its row is not cached (only committed events are), so none is stale.
            latest = self.latest(job_id)
            if latest is not None:
                job = latest.job
        return job if job is not None and visible(job.owner, tenant) else None

    async def get(self, job_id: str, tenant: Tenant | None) -> Job:
        job = await self.find(job_id, tenant)
        if job is None:
            raise JobNotFound(f"No job has the id {job_id}")
        return job

    async def list(
        self, limit: int, below_seq: int | None, status: JobStatus | None, tenant: Tenant | None
    ) -> tuple[list[Job], int | None]:
        """A page of `tenant`'s jobs, newest first, below `below_seq`; and where the next page starts."""
        # One extra row tells whether there is a next page without a second query.
        jobs = await self._store.list(below_seq or 2**63 - 1, limit + 1, status, owner_filter(tenant))
        return jobs[:limit], (jobs[limit - 1].seq if len(jobs) > limit else None)

    # --- admission -------------------------------------------------------------------------

    async def create(
        self,
        num_images: int,
        animal: str | None,
        prompt: str | None = None,
        idempotency_key: str | None = None,
        tenant: Tenant | None = None,
        webhook_url: str | None = None,
        webhook_events: Sequence[str] | None = None,
    ) -> Created:
        """Commit a new pending job of `tenant`'s (the dispatcher hears of it from the feed).

        With an idempotency key, a repeat of an earlier request (of the same tenant) returns
        that request's job instead, and the same key with a different request is refused.
        Beyond workers.max_pending jobs waiting, or the tenant's own max_pending, QueueFull.
        """
        limit = self._settings.max_images_per_job
        if num_images > limit:
            raise InvalidJob(f"numImages must be at most {limit}", field="numImages", reason=f"greater than {limit}")
        if animal is not None and animal not in self._settings.animals:
            raise InvalidJob(
                f"animal must be one of {', '.join(self._settings.animals)}",
                field="animal",
                reason="not a configured animal",
            )
        webhook = self._webhook(webhook_url, webhook_events)
        idempotency = (
            Idempotency(idempotency_key, request_hash(num_images, animal, prompt, webhook)) if idempotency_key else None
        )
        in_database = self._dispatcher.counts_in_database
        owner = tenant.name if tenant is not None else None
        tenant_limit = tenant.max_pending if tenant is not None else None
        # One process: counted on the event loop, between admission and commit, so concurrent
        # requests cannot together overshoot a limit. A repeat of an idempotent request
        # creates nothing, so it is not refused for a full queue.
        if not in_database:
            index = self._dispatcher.index
            if index.count + self._admitting >= self._max_pending:
                full = self._full(index.count)
            elif tenant_limit is not None and index.count_of(owner) + self._admitting_of[owner] >= tenant_limit:
                full = self._full(index.count_of(owner), tenant=True)
            else:
                full = None
            if full is not None and not (idempotency_key and await self._store.idempotency_key_job(idempotency_key, owner)):
                raise full
        new = NewJob(
            uuid7(), num_images, animal or random.choice(self._settings.animals), prompt, now_text(), owner, webhook
        )
        self._admitting += 1
        self._admitting_of[owner] += 1
        try:
            if in_database:
                result = await self._store.create(new, idempotency, self._max_pending, tenant_limit)
            else:
                result = await self._store.create(new, idempotency, None)
        except QueueLimit as exc:
            raise self._full(exc.pending, exc.tenant) from None
        finally:
            self._admitting -= 1
            self._admitting_of[owner] -= 1
            if not self._admitting_of[owner]:
                del self._admitting_of[owner]
        if isinstance(result, KeyReused):
            if not result.same_body:
                raise IdempotencyKeyReused()
            return Created(result.job_id, replayed=True)
        logs.event_transitions([result])
        return Created(new.job_id)

    def _webhook(self, url: str | None, events: Sequence[str] | None) -> Webhook | None:
        """The webhook a create asks for, checked (InvalidJob naming the field otherwise)."""
        if url is None:
            if events is not None:
                raise InvalidJob("webhookEvents needs a webhook", field="webhookEvents", reason="given without webhook")
            return None
        if not self.webhooks_on:
            raise InvalidJob(
                "This server sends no webhooks: its webhook signing secret is not set",
                field="webhook", reason="webhooks are not configured",
            )
        try:
            parts = check_url(url, self._webhooks.allowed_ports)
        except ValueError as exc:
            raise InvalidJob(f"webhook {exc}", field="webhook", reason=str(exc)) from None
        chosen = tuple(dict.fromkeys(events)) if events is not None else DEFAULT_WEBHOOK_EVENTS
        assert parts.hostname is not None
        # The receiver, as concurrency is bounded per receiver: its host and port (an origin).
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return Webhook(url, f"{parts.hostname.lower()}:{port}", chosen)

    @staticmethod
    def _full(pending: int, tenant: bool = False) -> QueueFull:
        whose = "of yours are waiting, the most this service queues for one API key" if tenant else (
            "are waiting, the most this service queues"
        )
        return QueueFull(f"{pending} jobs {whose}; try again later", retry_after_s=RETRY_AFTER_FULL_S)

    # --- control ---------------------------------------------------------------------------

    async def cancel(self, job_id: str, tenant: Tenant | None) -> Job:
        """pending or processing -> canceled (the worker drawing it, on any node, hears of it
        from the feed and stops)."""
        # Read first (JobNotFound unless it is the tenant's), for the log line's "from": the
        # committed event says only where the job went. A claim between the two reads shows
        # as pending -> canceled; the change itself is decided by the store alone.
        before = await self.get(job_id, tenant)
        event = await self._store.cancel(job_id)
        if event is not None:
            logs.event_transitions([event], before.status.value)
            return event.job
        job = await self.get(job_id, tenant)  # JobNotFound if there is no such job
        raise JobConflict(f"The job is already {job.status.value}: only pending or processing jobs can be canceled")

    async def delete(self, job_id: str, tenant: Tenant | None) -> None:
        """Remove a terminal job and its image files (its events stay until pruned)."""
        if tenant is not None:
            await self.get(job_id, tenant)  # JobNotFound unless it is the tenant's
        result = await self._store.delete(job_id)
        if result is None:
            raise JobNotFound(f"No job has the id {job_id}")
        if isinstance(result, JobStatus):
            raise JobConflict(f"The job is {result.value}: cancel it first, or wait until it ends")
        logs.event_transitions([result])
        # After the row is gone, so no URL points at files that are going.
        await self._images.delete_job(job_id)


def visible(owner: str | None, tenant: Tenant | None) -> bool:
    """Whether a job owned by `owner` is `tenant`'s to see: with auth off (no tenant) every
    job is; with auth on only the tenant's own (a job made with auth off is nobody's)."""
    return tenant is None or owner == tenant.name


def owner_filter(tenant: Tenant | None) -> str | None:
    """The owner a store query is narrowed to: the tenant's name, or None for every job."""
    return None if tenant is None else tenant.name


JOBS = web.AppKey("jobs", JobService)


async def jobs_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the job service."""
    service = JobService(
        app[STORE], app[FEED], app[DISPATCHER], app[IMAGES], app[SETTINGS], webhooks_on=app.get(SIGNER) is not None
    )
    app[JOBS] = service
    yield
    service.close()
