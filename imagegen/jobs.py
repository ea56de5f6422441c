"""The job service: owns the job state machine, its events, and the queue of job ids to draw."""

from __future__ import annotations

import asyncio
import collections
import base64
import functools
import binascii
import json
import random
import re
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import db
from .config import SETTINGS, JobSettings
from .errors import InvalidRequest, JobNotFound
from .models import Job, JobStatus, now_text

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


@dataclass(frozen=True)
class JobEvent:
    """A committed change of a job: its id in the events table, its name, the job after it."""

    seq: int
    name: str
    job_id: str
    snapshot: str  # the job's row as JSON, exactly as committed with this event
    # The event as an SSE frame, per base URL: thousands of subscribers share one rendering.
    _frames: dict[str, bytes] = field(default_factory=dict, compare=False, repr=False)

    @functools.cached_property
    def job(self) -> Job:
        # Parsed on first use: most events of a busy server (a create with nobody streaming)
        # are never looked at beyond their job id.
        return Job.from_row(json.loads(self.snapshot))

    def frame(self, base_url: str) -> bytes:
        """This event as a server-sent-events frame, its data the job as GET would show it."""
        frame = self._frames.get(base_url)
        if frame is None:
            frame = b"id: %d\nevent: %s\ndata: %s\n\n" % (self.seq, self.name.encode(), self.job.to_json(base_url))
            self._frames[base_url] = frame
        return frame

    @classmethod
    def from_row(cls, row: Any) -> JobEvent:
        """From an events row: (seq, name, job_id, job snapshot as JSON)."""
        return cls(row["seq"], row["name"], row["job_id"], row["job"])

    @property
    def terminal(self) -> bool:
        return self.job.status.terminal


def committed_events(results: list[Any]) -> Iterator[JobEvent]:
    """The job events among the results of one committed batch of write ops, in commit order."""
    for result in results:
        if isinstance(result, list):
            yield from (item for item in result if isinstance(item, JobEvent))


@dataclass(frozen=True)
class JobPage:
    """One page of GET /generations."""

    jobs: list[Job]
    next_cursor: str | None


def parse_job_id(text: str) -> str:
    """The canonical (lowercase) form of a job id, or InvalidRequest if it is not a UUID."""
    if not _UUID.match(text):
        raise InvalidRequest(
            f"jobId must be a UUID like 550e8400-e29b-41d4-a716-446655440000, not {text[:64]!r}",
            invalid_params=[{"name": "jobId", "in": "path", "reason": "not a UUID"}],
        )
    return text.lower()


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The seq a cursor points below; InvalidRequest for anything this service did not hand out."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        version, _, number = text.partition(":")
        if version != "v1" or not number.isdigit():
            raise ValueError(text)
        return int(number)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidRequest(
            "cursor is not one this service returned as nextCursor",
            invalid_params=[{"name": "cursor", "in": "query", "reason": "unknown cursor"}],
        ) from None


def _event_op(name: str, job_id: str, sql: str, params: tuple[Any, ...]) -> db.WriteOp[list[tuple[Any, ...]]]:
    """A write op: one conditional statement on job `job_id`, its row count checked, and if it
    changed the row, the event `name` in the same transaction. Returns the raw event rows."""

    def op(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
        if conn.execute(sql, params).rowcount != 1:
            return []  # the condition did not hold (e.g. the job moved on): nothing happened
        return conn.execute(db.INSERT_EVENT, (name, job_id)).fetchall()

    return op


def _to_events(rows: list[tuple[Any, ...]]) -> list[JobEvent]:
    # Runs on the event loop after the commit, keeping Python work off the writer's thread,
    # where every microsecond holds up the whole batch.
    return [JobEvent.from_row(row) for row in rows]


# How many jobs the service keeps in memory for reads (a few MB at most).
RECENT_JOBS = 10_000


class JobService:
    """Creates, reads and moves jobs through their states; each change is one committed event."""

    def __init__(self, database: db.Database, settings: JobSettings) -> None:
        self._db = database
        self._settings = settings
        # Job ids waiting for a worker. The database is the truth: this queue is rebuilt
        # from the pending jobs at every start.
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        # The most recently used jobs, as last committed, so that polling skips the database.
        # Every commit refreshes its jobs here (after_commit), so an entry is never older than
        # what a reader connection would return.
        # Kept as each job's latest event, whose job is parsed only when first read.
        self._recent: collections.OrderedDict[str, JobEvent] = collections.OrderedDict()
        database.after_commit.append(self._on_commit)

    def _on_commit(self, results: list[Any]) -> None:
        for event in committed_events(results):
            self._remember(event)
            # Queued from the commit itself, not from the creating request: a request
            # cancelled after its job committed must not leave the job waiting for a restart.
            if event.name == "job.created":
                self.queue.put_nowait(event.job.job_id)

    def _remember(self, event: JobEvent) -> None:
        self._recent[event.job_id] = event
        self._recent.move_to_end(event.job_id)
        if len(self._recent) > RECENT_JOBS:
            self._recent.popitem(last=False)

    # --- reads -----------------------------------------------------------------------------

    async def find(self, job_id: str) -> Job | None:
        latest = self._recent.get(job_id)
        if latest is not None:
            self._recent.move_to_end(job_id)
            return latest.job
        row = await self._db.fetch_one(db.SELECT_JOB, (job_id,))
        if row is None:
            return None
        # A commit that landed while we read has already put the newer state in _recent; a
        # job read from its row is not cached (only committed events are), so none is stale.
        latest = self._recent.get(job_id)
        return latest.job if latest is not None else Job.from_row(row)

    async def get(self, job_id: str) -> Job:
        job = await self.find(job_id)
        if job is None:
            raise JobNotFound(f"No job has the id {job_id}")
        return job

    async def list(self, limit: int, cursor: str | None, status: JobStatus | None) -> JobPage:
        below = decode_cursor(cursor) if cursor else 2**63 - 1
        # One extra row tells whether there is a next page without a second query.
        if status is None:
            rows = await self._db.fetch_all(db.LIST_JOBS, (below, limit + 1))
        else:
            rows = await self._db.fetch_all(db.LIST_JOBS_BY_STATUS, (status.value, below, limit + 1))
        next_cursor = encode_cursor(rows[limit - 1]["seq"]) if len(rows) > limit else None
        return JobPage([Job.from_row(row) for row in rows[:limit]], next_cursor)

    # --- changes ---------------------------------------------------------------------------

    async def create(self, num_images: int, animal: str | None, prompt: str | None = None) -> str:
        """Commit a new pending job and queue it for the workers; return its id."""
        limit = self._settings.max_images_per_job
        if num_images > limit:
            raise InvalidRequest(
                f"numImages must be at most {limit}",
                invalid_params=[{"name": "numImages", "in": "body", "reason": f"greater than {limit}"}],
            )
        if animal is None:
            animal = random.choice(self._settings.animals)
        elif animal not in self._settings.animals:
            raise InvalidRequest(
                f"animal must be one of {', '.join(self._settings.animals)}",
                invalid_params=[{"name": "animal", "in": "body", "reason": "not a configured animal"}],
            )
        now = now_text()
        params = (str(uuid.uuid4()), num_images, animal, prompt, now, now)
        await self._db.write(_event_op("job.created", params[0], db.INSERT_JOB, params), _to_events)
        return params[0]

    async def claim(self, job_id: str) -> Job | None:
        """pending -> processing; None if the job is no longer pending."""
        return await self._change("job.processing", job_id, db.CLAIM_JOB, (now_text(), job_id))

    async def add_image(self, job: Job, path: str) -> Job | None:
        """Record the next stored image; None if this attempt no longer owns the job."""
        params = (path, now_text(), job.job_id, job.attempts, len(job.images))
        return await self._change("job.progress", job.job_id, db.ADD_IMAGE, params)

    async def complete(self, job: Job) -> Job | None:
        """processing -> completed, once every image is recorded."""
        return await self._change("job.completed", job.job_id, db.COMPLETE_JOB, (now_text(), job.job_id, job.attempts))

    async def fail(self, job: Job, code: str, message: str, retryable: bool = False) -> Job | None:
        """processing -> failed with the reason."""
        params = (code, message, now_text(), job.job_id, job.attempts, int(retryable))
        return await self._change("job.failed", job.job_id, db.FAIL_JOB, params)

    async def release(self, job: Job) -> Job | None:
        """processing -> pending: a shutdown hands the job back for the next start."""
        return await self._change("job.requeued", job.job_id, db.RELEASE_JOB, (now_text(), job.job_id, job.attempts))

    async def recover(self) -> int:
        """At start-up: jobs left processing by a crash go back to pending, and every pending
        job is queued in creation order. Returns how many were queued."""
        def requeue_all(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            ids = [row[0] for row in conn.execute(db.RECOVER_JOBS, (now_text(),)).fetchall()]
            return [event for job_id in ids for event in conn.execute(db.INSERT_EVENT, ("job.requeued", job_id))]

        await self._db.write(requeue_all, _to_events)
        rows = await self._db.fetch_all(db.PENDING_JOB_IDS)
        for row in rows:
            self.queue.put_nowait(row["id"])
        return len(rows)

    async def _change(self, name: str, job_id: str, sql: str, params: tuple[Any, ...]) -> Job | None:
        events = await self._db.write(_event_op(name, job_id, sql, params), _to_events)
        return events[0].job if events else None


JOBS = web.AppKey("jobs", JobService)


async def jobs_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the job service, with unfinished jobs recovered and queued."""
    service = JobService(app[db.DATABASE], app[SETTINGS].jobs)
    await service.recover()
    app[JOBS] = service
    yield
