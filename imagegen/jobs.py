"""The job service: owns the job state machine, its events, and the queue of job ids to draw."""

from __future__ import annotations

import asyncio
import json
import random
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiosqlite
from aiohttp import web

from . import db
from .config import SETTINGS, JobSettings
from .errors import InvalidRequest, JobNotFound
from .models import JOB_ID_PATTERN, Job, JobPage, JobStatus, format_time, utc_now

_UUID = re.compile(JOB_ID_PATTERN)


@dataclass(frozen=True)
class JobEvent:
    """A committed change of a job: its id in the events table, its name, the job after it."""

    seq: int
    name: str
    job: Job


def committed_events(results: list[Any]) -> Iterator[JobEvent]:
    """The job events among the results of one committed batch of write ops, in commit order."""
    for result in results:
        if isinstance(result, list):
            yield from (item for item in result if isinstance(item, JobEvent))


def parse_job_id(text: str) -> str:
    """The canonical (lowercase) form of a job id, or InvalidRequest if it is not a UUID."""
    if not _UUID.fullmatch(text):  # match() lets a trailing newline through ($ matches before it)
        raise InvalidRequest(
            f"jobId must be a UUID like 550e8400-e29b-41d4-a716-446655440000, not {text[:64]!r}",
            invalid_params=[{"name": "jobId", "in": "path", "reason": "not a UUID"}],
        )
    return text.lower()


# A cursor is the seq of the last job of a page, in decimal; the next page starts below it.
# Every string of this form is a place to start, so the pattern is the whole of its validation
# (and 18 digits stay below SQLite's 2**63).
CURSOR_PATTERN = r"^[0-9]{1,18}$"


def encode_cursor(seq: int) -> str:
    return str(seq)


def decode_cursor(cursor: str) -> int:
    """The seq a cursor points below; InvalidRequest for anything that is not a cursor."""
    if not re.fullmatch(CURSOR_PATTERN, cursor):
        raise InvalidRequest(
            "cursor is not one this service returned as nextCursor",
            invalid_params=[{"name": "cursor", "in": "query", "reason": "not a cursor"}],
        )
    return int(cursor)


def _event_op(name: str, sql: str, params: tuple[Any, ...]) -> db.WriteOp[list[JobEvent]]:
    """A write op: one conditional statement ... RETURNING, and an event `name` for each row it
    changed, in the same transaction."""

    async def op(conn: aiosqlite.Connection) -> list[JobEvent]:
        events = []
        for row in await conn.execute_fetchall(sql, params):
            snapshot = json.dumps(dict(row))
            ((seq,),) = await conn.execute_fetchall(
                db.INSERT_EVENT, (row["id"], name, snapshot, row["updated_at"])
            )
            events.append(JobEvent(seq, name, Job.from_row(row)))
        return events

    return op


class JobService:
    """Creates, reads and moves jobs through their states; each change is one committed event."""

    def __init__(self, database: db.Database, settings: JobSettings) -> None:
        self._db = database
        self._settings = settings
        # Job ids waiting for a worker. The database is the truth: this queue is rebuilt
        # from the pending jobs at every start.
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        database.after_commit.append(self._enqueue_created)

    def _enqueue_created(self, results: list[Any]) -> None:
        # Fed from the commit itself, not from the creating request: a request cancelled
        # after its job committed must not leave the job waiting until the next restart.
        for event in committed_events(results):
            if event.name == "job.created":
                self.queue.put_nowait(event.job.job_id)

    # --- reads -----------------------------------------------------------------------------

    async def find(self, job_id: str) -> Job | None:
        row = await self._db.fetch_one(db.SELECT_JOB, (job_id,))
        return None if row is None else Job.from_row(row)

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
        return JobPage(jobs=[Job.from_row(row) for row in rows[:limit]], next_cursor=next_cursor)

    # --- changes ---------------------------------------------------------------------------

    async def create(self, num_images: int, animal: str | None, prompt: str | None = None) -> Job:
        """Commit a new pending job and queue it for the workers."""
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
        now = format_time(utc_now())
        params = (str(uuid.uuid4()), num_images, animal, prompt, now, now)
        (event,) = await self._db.write(_event_op("job.created", db.INSERT_JOB, params))
        return event.job

    async def claim(self, job_id: str) -> Job | None:
        """pending -> processing; None if the job is no longer pending."""
        return await self._change("job.processing", db.CLAIM_JOB, (_now(), job_id))

    async def add_image(self, job: Job, path: str) -> Job | None:
        """Record the next stored image; None if this attempt no longer owns the job."""
        params = (path, _now(), job.job_id, job.attempts, len(job.images))
        return await self._change("job.progress", db.ADD_IMAGE, params)

    async def complete(self, job: Job) -> Job | None:
        """processing -> completed, once every image is recorded."""
        return await self._change("job.completed", db.COMPLETE_JOB, (_now(), job.job_id, job.attempts))

    async def fail(self, job: Job, code: str, message: str, retryable: bool = False) -> Job | None:
        """processing -> failed with the reason."""
        params = (code, message, _now(), job.job_id, job.attempts, int(retryable))
        return await self._change("job.failed", db.FAIL_JOB, params)

    async def release(self, job: Job) -> Job | None:
        """processing -> pending: a shutdown hands the job back for the next start."""
        return await self._change("job.requeued", db.RELEASE_JOB, (_now(), job.job_id, job.attempts))

    async def recover(self) -> int:
        """At start-up: jobs left processing by a crash go back to pending, and every pending
        job is queued in creation order. Returns how many were queued."""
        await self._db.write(_event_op("job.requeued", db.RECOVER_JOBS, (_now(),)))
        rows = await self._db.fetch_all(db.PENDING_JOB_IDS)
        for row in rows:
            self.queue.put_nowait(row["id"])
        return len(rows)

    async def _change(self, name: str, sql: str, params: tuple[Any, ...]) -> Job | None:
        events = await self._db.write(_event_op(name, sql, params))
        return events[0].job if events else None


def _now() -> str:
    return format_time(utc_now())


JOBS = web.AppKey("jobs", JobService)


async def jobs_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the job service, with unfinished jobs recovered and queued."""
    service = JobService(app[db.DATABASE], app[SETTINGS].jobs)
    await service.recover()
    app[JOBS] = service
    yield
