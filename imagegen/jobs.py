"""The job service: owns the job state machine, its events, and the queue of job ids to draw."""

from __future__ import annotations

import asyncio
import bisect
import collections
import hashlib
import json
import os
import random
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from . import db
from .config import SETTINGS, Settings
from .errors import InvalidRequest, JobConflict, JobNotFound, QueueFull
from .models import JOB_ID_PATTERN, RENDERINGS_KEPT, TERMINAL, Job, JobPage, JobStatus, now_text

_UUID = re.compile(JOB_ID_PATTERN)


class JobEvent:
    """A committed change of a job: its id in the events table, its name, the job after it.

    A plain class with slots rather than a frozen dataclass: every create makes one, on the
    event loop's busiest path, and a frozen dataclass's __init__ is several times slower.
    Treat it as immutable.
    """

    __slots__ = ("seq", "name", "job_id", "snapshot", "job_seq", "status", "_job", "_json", "_frames")

    def __init__(self, seq: int, name: str, job_id: str, snapshot: str, job_seq: int, status: str) -> None:
        self.seq = seq
        self.name = name
        self.job_id = job_id
        self.snapshot = snapshot  # the job's row as JSON, exactly as committed with this event
        self.job_seq = job_seq  # the job's own seq (its place in creation order)
        self.status = status  # the job's status after the change
        self._job: Job | None = None
        # The job's JSON, and the event as an SSE frame, per base URL: a committed event never
        # changes, so thousands of subscribers and pollers share one rendering. Made on first
        # use (a pydantic private attribute would cost a slow __getattr__ on every read).
        self._json: dict[str, bytes] | None = None
        self._frames: dict[str, bytes] | None = None

    def __repr__(self) -> str:
        return f"JobEvent({self.seq}, {self.name!r}, {self.job_id!r}, status={self.status!r})"

    @property
    def job(self) -> Job:
        # Parsed on first use: most events of a busy server (a create with nobody streaming)
        # are never looked at beyond their job id and status.
        if self._job is None:
            self._job = Job.from_row(json.loads(self.snapshot))
        return self._job

    def json(self, base_url: str, queue_position: int | None = None) -> bytes:
        """The job after this event, as GET /generations/{jobId} shows it."""
        if self.status == JobStatus.PENDING:  # its queue position changes: never kept
            return self.job.to_json(base_url, queue_position)
        if self._json is None:
            self._json = {}
        rendered = self._json.get(base_url)
        if rendered is None:
            rendered = self.job.to_json(base_url)
            # A few base URLs at most: without server.public_url the Host header picks it, and
            # a client sending a new Host each time must not grow this.
            if len(self._json) < RENDERINGS_KEPT:
                self._json[base_url] = rendered
        return rendered

    def frame(self, base_url: str, queue_position: int | None = None) -> bytes:
        """This event as a server-sent-events frame, its data the job as GET would show it
        (a pending job's queue position is the one when the frame is first rendered)."""
        if self._frames is None:
            self._frames = {}
        frame = self._frames.get(base_url)
        if frame is None:
            data = self.json(base_url, queue_position)
            frame = b"id: %d\nevent: %s\ndata: %s\n\n" % (self.seq, self.name.encode(), data)
            if len(self._frames) < RENDERINGS_KEPT:  # see Job.to_json
                self._frames[base_url] = frame
        return frame

    @classmethod
    def from_row(cls, row: Any) -> JobEvent:
        """From an events row read with db.EVENT_COLUMNS."""
        return cls(row["seq"], row["name"], row["job_id"], row["job"], row["job_seq"], row["status"])

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def committed_events(results: list[Any]) -> Iterator[JobEvent]:
    """The job events among the results of one committed batch of write ops, in commit order."""
    for result in results:
        if isinstance(result, list):
            yield from (item for item in result if isinstance(item, JobEvent))


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


def _insert_jobs(conn: sqlite3.Connection, new_jobs: list[_NewJob]) -> list[list[dict[str, Any]]]:
    """Insert many jobs and their job.created events, one statement each; each job's events.

    This is the hot path of POST /generations, and the writer thread must win the GIL back from
    the busy event loop for every statement and every row it reads: so no RETURNING. The rows
    one INSERT makes get consecutive seqs, ending at lastrowid, and everything else in an event
    is known before the insert.
    """
    count = len(new_jobs)
    first_job = _last_rowid(conn.execute(
        db.INSERT_JOBS + ", ".join([db.INSERT_JOBS_ROW] * count),
        [value for new_job in new_jobs for value in new_job.params],
    )) - count + 1
    snapshots = [f'{{"seq":{first_job + i},{new_job.snapshot_tail}' for i, new_job in enumerate(new_jobs)]
    first_event = _last_rowid(conn.execute(
        db.INSERT_EVENTS + ", ".join([db.INSERT_EVENTS_ROW] * count),
        [
            value
            for new_job, snapshot in zip(new_jobs, snapshots, strict=True)
            for value in (new_job.params[0], "job.created", snapshot, new_job.params[4])
        ],
    )) - count + 1
    return [
        [{"seq": first_event + i, "name": "job.created", "job_id": new_job.params[0], "job": snapshots[i],
          "job_seq": first_job + i, "status": JobStatus.PENDING.value}]
        for i, new_job in enumerate(new_jobs)
    ]


def _last_rowid(cursor: sqlite3.Cursor) -> int:
    assert cursor.lastrowid is not None
    return cursor.lastrowid


@dataclass(frozen=True)
class _NewJob:
    """The write op of a create without an idempotency key; a group commit's many run as one."""

    params: tuple[Any, ...]  # db.INSERT_JOBS_ROW's values: id, num_images, animal, prompt, created_at, updated_at
    snapshot_tail: str  # the new row as JSON (db._SNAPSHOT's keys and order) after its seq
    run_together = staticmethod(_insert_jobs)

    @classmethod
    def of(cls, job_id: str, num_images: int, animal: str, prompt: str | None, now: str) -> _NewJob:
        # Written out rather than json.dumps of a dict: this runs for every create, and only the
        # free-text values need encoding (the id is a UUID, now a timestamp, num_images an int).
        tail = (
            f'"id":"{job_id}","status":"pending","num_images":{int(num_images)},'
            f'"animal":{json.dumps(animal)},"prompt":{json.dumps(prompt)},"images":"[]","attempts":0,'
            f'"error_code":null,"error_message":null,"error_retryable":null,'
            f'"created_at":"{now}","updated_at":"{now}","started_at":null,"completed_at":null}}'
        )
        return cls((job_id, num_images, animal, prompt, now, now), tail)

    def __call__(self, conn: sqlite3.Connection) -> list[dict[str, Any]]:
        return _insert_jobs(conn, [self])[0]


def _created(result: Any) -> Any:
    return result if isinstance(result, _KeyReused) else _to_events(result)


@dataclass(frozen=True)
class _KeyReused:
    """The write found the Idempotency-Key already used: by this job, for this body or not."""

    job_id: str
    same_body: bool


@dataclass(frozen=True)
class Created:
    """What POST /generations made: the job's id, and whether an earlier request with the same
    Idempotency-Key made it (nothing new was created)."""

    job_id: str
    replayed: bool = False


def request_hash(num_images: int, animal: str | None, prompt: str | None) -> str:
    """A fingerprint of a create request's meaning, to tell a retried request from a new one."""
    canonical = json.dumps([num_images, animal, prompt], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# How many jobs the service keeps in memory for reads (a few MB at most).
RECENT_JOBS = 10_000


class JobService:
    """Creates, reads and moves jobs through their states; each change is one committed event."""

    def __init__(self, database: db.Database, settings: Settings) -> None:
        self._db = database
        self._settings = settings.jobs
        self._max_pending = settings.workers.max_pending
        # Job ids waiting for a worker. The database is the truth: this queue is rebuilt
        # from the pending jobs at every start.
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        # The most recently changed jobs, each as its latest committed event, so that polling
        # skips the database. Only committed events are kept here (after_commit), so an entry
        # is never older than what a reader connection would return.
        self._recent: collections.OrderedDict[str, JobEvent] = collections.OrderedDict()
        # Every pending job's seq, sorted: a job's queue position is its index here, and the
        # count is what backpressure checks. Also kept from committed events.
        self._pending: dict[str, int] = {}
        self._pending_order: list[int] = []
        self._admitting = 0  # creates admitted but not yet committed
        # Retries waiting out their backoff before they are queued again.
        self._timers: dict[str, asyncio.TimerHandle] = {}
        database.after_commit.append(self._on_commit)

    def _on_commit(self, results: list[Any]) -> None:
        for event in committed_events(results):
            if event.name == "job.deleted":
                self._recent.pop(event.job_id, None)
            else:
                self._recent[event.job_id] = event
                self._recent.move_to_end(event.job_id)
                if len(self._recent) > RECENT_JOBS:
                    self._recent.popitem(last=False)
            self._track_pending(event.job_id, event.job_seq, event.status == JobStatus.PENDING)
            if event.terminal and (timer := self._timers.pop(event.job_id, None)):
                timer.cancel()  # a retry that will never be wanted
            # Queued from the commit itself, not from the creating request: a request
            # cancelled after its job committed must not leave the job waiting for a restart.
            if event.name == "job.created":
                self.queue.put_nowait(event.job_id)

    def _track_pending(self, job_id: str, seq: int, pending: bool) -> None:
        if pending and job_id not in self._pending:
            self._pending[job_id] = seq
            bisect.insort(self._pending_order, seq)
        elif not pending and job_id in self._pending:
            seq = self._pending.pop(job_id)
            del self._pending_order[bisect.bisect_left(self._pending_order, seq)]

    def close(self) -> None:
        """Forget scheduled retries (they are pending in the database and resume at start-up)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._db.after_commit.remove(self._on_commit)

    # --- reads -----------------------------------------------------------------------------

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def latest_status(self, job_id: str) -> str | None:
        """The job's status as of the last commit that changed it, if it changed recently."""
        latest = self._recent.get(job_id)
        return None if latest is None else latest.status

    def queue_position(self, job_id: str) -> int | None:
        """1 for the next pending job to be claimed; None if the job is not pending."""
        seq = self._pending.get(job_id)
        return None if seq is None else bisect.bisect_left(self._pending_order, seq) + 1

    def render(self, job: Job, base_url: str) -> bytes:
        """The job's JSON as the API shows it now."""
        return job.to_json(base_url, self.queue_position(job.job_id))

    async def render_current(self, job_id: str, base_url: str) -> bytes:
        """The job's JSON as the API shows it now; from memory if it changed recently (the
        hot path of polling). JobNotFound if there is no such job."""
        latest = self._recent.get(job_id)
        if latest is None:
            return self.render(await self.get(job_id), base_url)
        # Not moved to the end: what stays in memory is what changed last, not what was read
        # last, which keeps this, the commonest request, to two dict lookups.
        return latest.json(base_url, self.queue_position(job_id))

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
        return JobPage(jobs=[Job.from_row(row) for row in rows[:limit]], next_cursor=next_cursor)

    # --- admission -------------------------------------------------------------------------

    async def create(
        self,
        num_images: int,
        animal: str | None,
        prompt: str | None = None,
        idempotency_key: str | None = None,
    ) -> Created:
        """Commit a new pending job (it is queued for the workers on commit).

        With an idempotency key, a repeat of an earlier request returns that request's job
        instead, and the same key with a different request is refused.
        """
        limit = self._settings.max_images_per_job
        if num_images > limit:
            raise InvalidRequest(
                f"numImages must be at most {limit}",
                invalid_params=[{"name": "numImages", "in": "body", "reason": f"greater than {limit}"}],
            )
        if animal is not None and animal not in self._settings.animals:
            raise InvalidRequest(
                f"animal must be one of {', '.join(self._settings.animals)}",
                invalid_params=[{"name": "animal", "in": "body", "reason": "not a configured animal"}],
            )
        fingerprint = request_hash(num_images, animal, prompt) if idempotency_key else ""
        # Counted on the event loop, between admission and commit, so concurrent requests
        # cannot together overshoot max_pending. A repeat of an idempotent request creates
        # nothing, so it is not refused for a full queue.
        if self.pending_count + self._admitting >= self._max_pending:
            if not (idempotency_key and await self._db.fetch_one(db.IDEMPOTENCY_KEY, (idempotency_key,))):
                raise QueueFull(
                    f"{self.pending_count} jobs are waiting, the most this service queues; try again later",
                    retry_after=RETRY_AFTER_FULL_S,
                )
        now = now_text()
        job_id = uuid7()
        new_job = _NewJob.of(job_id, num_images, animal or random.choice(self._settings.animals), prompt, now)

        op: db.WriteOp[Any] = new_job
        if idempotency_key:

            def op(conn: sqlite3.Connection) -> list[dict[str, Any]] | _KeyReused:
                used = conn.execute(db.IDEMPOTENCY_KEY, (idempotency_key,)).fetchone()
                if used is not None:
                    return _KeyReused(used["job_id"], used["request_hash"] == fingerprint)
                conn.execute(db.INSERT_IDEMPOTENCY_KEY, (idempotency_key, fingerprint, job_id, now))
                return new_job(conn)

        self._admitting += 1
        try:
            result = await self._db.write(op, _created)
        finally:
            self._admitting -= 1
        if isinstance(result, _KeyReused):
            if not result.same_body:
                raise InvalidRequest(
                    "This Idempotency-Key was already used with a different request body",
                    invalid_params=[{"name": "Idempotency-Key", "in": "header", "reason": "reused with another body"}],
                )
            return Created(result.job_id, replayed=True)
        return Created(job_id)

    async def prune_idempotency_keys(self, now: datetime | None = None) -> None:
        """Forget idempotency keys older than their retention."""
        now = now or datetime.now(UTC)
        cutoff = (now - timedelta(seconds=self._settings.idempotency_ttl_s)).isoformat(timespec="milliseconds")
        cutoff = cutoff[:-6] + "Z"
        await self._db.write(lambda conn: conn.execute(db.PRUNE_IDEMPOTENCY_KEYS, (cutoff,)).rowcount)

    # --- control ---------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> Job:
        """pending or processing -> canceled (the worker drawing it is interrupted on commit)."""
        events = await self._db.write(_event_op("job.canceled", job_id, db.CANCEL_JOB, (now_text(), job_id)), _to_events)
        if events:
            return events[0].job
        job = await self.get(job_id)  # 404 if there is no such job
        raise JobConflict(f"The job is already {job.status.value}: only pending or processing jobs can be canceled")

    async def delete(self, job_id: str) -> None:
        """Remove a terminal job (its events stay until pruned); 409 while it can still change."""

        def op(conn: sqlite3.Connection) -> list[tuple[Any, ...]] | str | None:
            row = conn.execute(db.JOB_STATUS, (job_id,)).fetchone()
            if row is None or row["status"] not in TERMINAL:
                return None if row is None else row["status"]
            # The event carries the job as it was, so it is written before the row goes.
            events = conn.execute(db.INSERT_EVENT, ("job.deleted", job_id)).fetchall()
            conn.execute(db.DELETE_JOB, (job_id,))
            conn.execute(db.DELETE_JOB_KEYS, (job_id,))
            return events

        result = await self._db.write(op, lambda r: _to_events(r) if isinstance(r, list) else r)
        if result is None:
            raise JobNotFound(f"No job has the id {job_id}")
        if isinstance(result, str):
            raise JobConflict(f"The job is {result}: cancel it first, or wait until it ends")

    # --- the workers' side -----------------------------------------------------------------

    async def claim(self, job_id: str) -> Job | None:
        """pending -> processing; None if the job is no longer pending."""
        return await self._change("job.processing", job_id, db.CLAIM_JOB, (now_text(), job_id))

    async def add_image(self, job: Job, path: str) -> Job | None:
        """Record the next stored image; None if this attempt no longer owns the job."""
        params = (path, now_text(), job.job_id, job.attempts, len(job.images))
        return await self._change("job.progress", job.job_id, db.ADD_IMAGE, params)

    async def complete(self, job: Job) -> Job | None:
        """processing -> completed, once every image is recorded."""
        params = (now_text(), job.job_id, job.attempts)
        return await self._change("job.completed", job.job_id, db.COMPLETE_JOB, params)

    async def fail(self, job: Job, code: str, message: str, retryable: bool = False) -> Job | None:
        """processing -> failed with the reason."""
        params = (code, message, now_text(), job.job_id, job.attempts, int(retryable))
        return await self._change("job.failed", job.job_id, db.FAIL_JOB, params)

    async def retry(self, job: Job, code: str, message: str, delay_s: float) -> Job | None:
        """processing -> pending after a transient failure; queued again once `delay_s` passed."""
        now = datetime.now(UTC)
        not_before = (now + timedelta(seconds=delay_s)).isoformat(timespec="milliseconds")[:-6] + "Z"
        params = (code, message, now_text(), job.job_id, not_before, job.attempts)
        retried = await self._change("job.retrying", job.job_id, db.RETRY_JOB, params)
        if retried is not None:
            self._enqueue_after(job.job_id, delay_s)
        return retried

    async def release(self, job: Job) -> Job | None:
        """processing -> pending: a shutdown hands the job back for the next start."""
        params = (now_text(), job.job_id, job.attempts)
        return await self._change("job.requeued", job.job_id, db.RELEASE_JOB, params)

    def _enqueue_after(self, job_id: str, delay_s: float) -> None:
        def enqueue() -> None:
            self._timers.pop(job_id, None)
            self.queue.put_nowait(job_id)

        self._timers[job_id] = asyncio.get_running_loop().call_later(delay_s, enqueue)

    async def recover(self) -> int:
        """At start-up: jobs left processing by a crash go back to pending (or fail, if they
        were running in too many crashes), and every pending job is queued in creation order
        (a retry once its backoff has passed). Returns how many are pending."""
        max_recoveries = self._settings.max_recoveries

        def recover_all(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            now = now_text()
            events = []
            for (job_id,) in conn.execute(db.FAIL_POISON_JOBS, (now, max_recoveries)).fetchall():
                events += conn.execute(db.INSERT_EVENT, ("job.failed", job_id)).fetchall()
            for (job_id,) in conn.execute(db.RECOVER_JOBS, (now,)).fetchall():
                events += conn.execute(db.INSERT_EVENT, ("job.requeued", job_id)).fetchall()
            return events

        await self._db.write(recover_all, _to_events)
        now = now_text()
        rows = await self._db.fetch_all(db.PENDING_JOBS)
        for row in rows:
            self._track_pending(row["id"], row["seq"], True)
            if row["not_before"] and row["not_before"] > now:
                wait = datetime.fromisoformat(row["not_before"]) - datetime.now(UTC)
                self._enqueue_after(row["id"], max(0.0, wait.total_seconds()))
            else:
                self.queue.put_nowait(row["id"])
        return len(rows)

    async def _change(self, name: str, job_id: str, sql: str, params: tuple[Any, ...]) -> Job | None:
        events = await self._db.write(_event_op(name, job_id, sql, params), _to_events)
        return events[0].job if events else None


# Retry-After of a 429 for a full queue: long enough for workers to take a few jobs, short
# enough that a client does not give up.
RETRY_AFTER_FULL_S = 5

JOBS = web.AppKey("jobs", JobService)


async def jobs_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the job service, with unfinished jobs recovered and queued."""
    service = JobService(app[db.DATABASE], app[SETTINGS])
    await service.recover()
    app[JOBS] = service
    yield
    service.close()
