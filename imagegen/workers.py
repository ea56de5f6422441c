"""The worker pool: `workers.count` workers taking jobs from the dispatcher, drawing through the provider.

Each result is written through the store, fenced on the attempt (and on PostgreSQL on this
node's lease, which a heartbeat keeps alive), so a worker whose job was handed to another
cannot overwrite the newer attempt.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Sequence

from aiohttp import web

from .config import SETTINGS, Settings
from . import logs
from .dispatch import DISPATCHER, Dispatcher
from .errors import StorageFull, StoreUnavailable
from .feed import FEED
from .jobs import timestamp_in
from .metrics import METRICS, Metrics
from .models import Job
from .providers import PROVIDER, ImageProvider, ImageRequest, ProviderError, render_prompt
from .storage import IMAGES, ImageStore
from .store import STORE, JobEvent, JobStore

log = logging.getLogger(__name__)


# The longest Retry-After honoured: a provider asking for more is waited out in steps, one
# attempt at a time, rather than parking a job for days on one answer.
RETRY_AFTER_MAX_S = 3600.0

# How long a worker waits after the database failed a claim before it asks again.
CLAIM_RETRY_S = 1.0

# How many recent cancels a pool remembers (see WorkerPool._canceled): far more than can land
# between one claim and its registration.
RECENT_CANCELS = 1024


def backoff_s(attempt: int, base_s: float, max_s: float, retry_after: float | None) -> float:
    """Seconds to wait before retrying after failed attempt `attempt` (from 1).

    Exponential with "equal jitter" (half fixed, half random), so many jobs failing together
    do not all come back at the same moment; never sooner than the provider's Retry-After
    (up to RETRY_AFTER_MAX_S).
    """
    ceiling = min(max_s, base_s * 2 ** min(attempt - 1, 64))
    delay = ceiling / 2 + random.uniform(0, ceiling / 2)
    return max(delay, min(retry_after or 0.0, RETRY_AFTER_MAX_S))


def node_id() -> str:
    """This process's name in leases: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


class WorkerPool:
    """Named worker tasks that take claimed jobs from the dispatcher, one job at a time each."""

    def __init__(
        self,
        store: JobStore,
        dispatcher: Dispatcher,
        provider: ImageProvider,
        images: ImageStore,
        settings: Settings,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._dispatcher = dispatcher
        self._provider = provider
        self._images = images
        self._provider_settings = settings.provider
        self._job_settings = settings.jobs
        self._lease_s = settings.workers.lease_s
        self.owner = node_id()
        self._tasks: list[asyncio.Task[None]] = []
        self._busy: set[asyncio.Task[None]] = set()
        # The drawing of each running job, by job id, so a cancel can interrupt it.
        self._drawing: dict[str, asyncio.Task[None]] = {}
        # Jobs canceled lately: a cancel can reach the feed between a claim's commit and
        # the moment its drawing is registered (on SQLite, in the very batch of the claim).
        self._canceled: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._stopping = False
        self._stopped: asyncio.Task[None] | None = None
        self.handed_back: list[JobEvent] = []  # what stopping handed back, for the shutdown line

    def start(self, count: int) -> None:
        for number in range(count):
            task = asyncio.create_task(self._run(), name=f"imagegen-worker-{number}")
            self._tasks.append(task)
        self._heartbeat = asyncio.create_task(self._heartbeat_forever(), name="imagegen-heartbeat")

    @property
    def running(self) -> bool:
        """Started, not stopping, and every worker task alive (readiness)."""
        return bool(self._tasks) and self._stopped is None and not any(task.done() for task in self._tasks)

    def interrupt_canceled(self, events: Sequence[JobEvent]) -> None:
        """Feed listener: a job canceled while drawing here (the cancel committed on any
        node) stops drawing now."""
        for event in events:
            if event.name == "job.canceled":
                if drawing := self._drawing.get(event.job_id):
                    drawing.cancel()
                self._canceled[event.job_id] = None
                if len(self._canceled) > RECENT_CANCELS:
                    self._canceled.popitem(last=False)

    async def _heartbeat_forever(self) -> None:
        # Three beats per lease: one late or failed beat does not lose the jobs.
        while True:
            await asyncio.sleep(self._lease_s / 3)
            if self._drawing:
                try:
                    await self._store.heartbeat(list(self._drawing), self.owner, self._lease_s)
                except Exception:
                    log.exception("heartbeat failed; the jobs drawn here are rescued elsewhere if it keeps failing")

    def stop(self, grace_s: float) -> asyncio.Task[None]:
        """Take no more jobs; give running ones `grace_s` to finish, then hand them back.

        Idempotent: the app starts stopping the workers on shutdown, while open requests
        drain, and awaits the same task on cleanup.
        """
        if self._stopped is None:
            self._stopped = asyncio.create_task(self._stop(grace_s), name="imagegen-workers-stop")
        return self._stopped

    async def _stop(self, grace_s: float) -> None:
        self._stopping = True
        for task in self._tasks:
            if task not in self._busy:
                task.cancel()
        if self._busy:
            await asyncio.wait(set(self._busy), timeout=grace_s)
        for task in self._tasks:
            task.cancel()  # a worker still busy is interrupted
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Everything this node still holds goes back to pending at once, for another node or
        # the next start: the jobs interrupted above, and one a worker had just claimed when
        # it was cancelled (a claim commits though its caller is cancelled).
        self.handed_back = await self._store.release_all(self.owner)
        logs.event_transitions(self.handed_back)
        self._heartbeat.cancel()
        await asyncio.gather(self._heartbeat, return_exceptions=True)

    async def _run(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        while not self._stopping:
            try:
                job = await self._dispatcher.next_job(self.owner, self._lease_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The database failed the claim (a lost connection, a restart): nothing was
                # claimed. The worker waits and asks again rather than end for good.
                log.warning("claiming a job failed (%s: %s); trying again in %g s",
                            type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "", CLAIM_RETRY_S)
                await asyncio.sleep(CLAIM_RETRY_S)
                continue
            logs.claimed(job)
            self._busy.add(task)
            try:
                await self._process(job)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A failing job must never take its worker down with it.
                log.exception("worker failed on job %s", job.job_id)
            finally:
                self._busy.discard(task)
                self._dispatcher.job_done()

    async def _process(self, job: Job) -> None:
        job_id = job.job_id
        # Registered with no await in between: a cancel the feed delivers from now on
        # interrupts the drawing, and one it delivered while we were claiming is in _canceled.
        drawing = asyncio.create_task(self._attempt(job), name=f"imagegen-draw-{job_id}")
        self._drawing[job_id] = drawing
        if job_id in self._canceled:
            drawing.cancel()
        try:
            await drawing
        except StoreUnavailable as exc:
            # Its outcome could not be recorded: the disk is full, or the database is out of
            # reach. It is not left processing: recorded as a retry (at once, then backing
            # off) as soon as a write commits again.
            await self._record_when_possible(job, exc)
        except Exception:
            # Recording the attempt's outcome failed: fail the job rather than leave it
            # processing with no worker until its lease runs out.
            log.exception("job %s: recording its outcome failed", job_id)
            message = "The server failed to record this job's outcome."
            self._log(await self._store.fail(job, "internal_error", message, False, self.owner))
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                # This worker is being stopped and ran out of grace: the pool hands the job back
                # once every worker has stopped (_stop).
                drawing.cancel()
                await asyncio.gather(drawing, return_exceptions=True)
                raise
            # Only the drawing was cancelled: the job was canceled, and that is committed.
        finally:
            del self._drawing[job_id]

    async def _record_when_possible(self, job: Job, cause: StoreUnavailable) -> None:
        """Hand the job back for a retry once the store can write again (the disk had filled,
        or the database was out of reach)."""
        message = ("The disk was full" if isinstance(cause, StorageFull) else "The database was out of reach")
        delay = 0.5
        while True:
            try:
                current = await self._store.get(job.job_id)
                if current is None or current.status.value != "processing" or current.attempts != job.attempts:
                    return  # it moved on meanwhile (canceled, deleted, rescued, or recorded after all)
                event = await self._store.retry(
                    current, cause.code, f"{message}: the job is tried again.", timestamp_in(0), self.owner
                )
                if event is not None:
                    logs.event_transitions([event])
                return
            except StoreUnavailable as exc:
                log.warning("job %s: %s; recording its outcome again in %g s",
                            job.job_id, exc.detail.split(":")[0].lower(), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _attempt(self, job: Job) -> None:
        """One attempt at a job: draw the images it still lacks, then complete it."""
        current: Job | None = job
        prompt = render_prompt(self._provider_settings.prompt_template, job.animal, job.prompt)
        try:
            # A job retried or recovered keeps the images it already stored: draw only the rest.
            drawn: list[bytes] = []  # a batch the provider drew ahead, stored one image at a time
            for index in range(len(job.images), job.num_images):
                if not drawn:
                    request = ImageRequest(
                        job.job_id, index, job.animal, self._provider_settings.image_size, job.attempts,
                        prompt, count=job.num_images - index,
                    )
                    started = time.perf_counter()
                    drawn = await self._generate(request)
                    if self._metrics is not None and drawn:
                        each = (time.perf_counter() - started) / len(drawn)
                        for _ in drawn:
                            self._metrics.image_duration.observe(each)
                data = drawn.pop(0)
                try:
                    path = await self._images.save(job.job_id, index, job.attempts, data)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    raise ProviderError(
                        "The image could not be stored: the disk is full", code="storage_full", retryable=True
                    ) from None
                try:
                    event = await self._store.add_image(current, path, self.owner)
                except StoreUnavailable as exc:
                    await self._images.discard(path)  # not recorded: no row will ever name it
                    if not isinstance(exc, StorageFull):
                        raise  # the database is out of reach: _process records a retry once it is back
                    raise ProviderError(
                        "The image could not be recorded: the disk is full", code="storage_full", retryable=True
                    ) from None
                if event is None:
                    # Canceled (maybe deleted), or a newer attempt owns the job: drop this
                    # one's result, file and all.
                    await self._images.discard(path)
                    return
                current = event.job
            self._log(await self._store.complete(current, self.owner))
        except ProviderError as exc:
            await self._failed(current, exc)
        except StoreUnavailable:
            raise  # recording failed, not the drawing: _process records it once it can
        except Exception as exc:
            log.exception("job %s failed unexpectedly", job.job_id)
            message = f"The server failed to draw an image: {type(exc).__name__}"
            self._log(await self._store.fail(current, "internal_error", message, False, self.owner))

    async def _generate(self, request: ImageRequest) -> list[bytes]:
        timeout_s = self._job_settings.timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await self._provider.generate(request)
        except TimeoutError:
            raise ProviderError(
                f"The image provider did not answer within {timeout_s:g} s",
                code="provider_timeout",
                retryable=True,
            ) from None

    async def _failed(self, job: Job, exc: ProviderError) -> None:
        settings = self._job_settings
        if self._metrics is not None:
            self._metrics.provider_errors.labels(exc.code).inc()
        if exc.retryable and job.attempts < settings.max_attempts:
            delay = backoff_s(job.attempts, settings.retry_base_s, settings.retry_max_s, exc.retry_after)
            log.warning("job %s attempt %d failed (%s), retrying in %.1fs", job.job_id, job.attempts, exc.code, delay)
            self._log(await self._store.retry(job, exc.code, str(exc), timestamp_in(delay), self.owner))
            return
        message = str(exc)
        if exc.retryable:
            message += f" (gave up after {job.attempts} attempts)"
        log.warning("job %s failed: %s: %s", job.job_id, exc.code, message)
        self._log(await self._store.fail(job, exc.code, message, exc.retryable, self.owner))

    @staticmethod
    def _log(event: JobEvent | None) -> None:
        # None: the write was fenced off (canceled, or a newer attempt owns the job): no change.
        if event is not None:
            logs.event_transitions([event])


WORKERS = web.AppKey("workers", WorkerPool)


async def workers_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: workers run while the app runs and stop first (contexts unwind in reverse)."""
    settings = app[SETTINGS]
    pool = WorkerPool(app[STORE], app[DISPATCHER], app[PROVIDER], app[IMAGES], settings, app.get(METRICS))
    app[FEED].subscribe(pool.interrupt_canceled)
    pool.start(settings.workers.count)
    app[WORKERS] = pool
    yield
    await pool.stop(settings.workers.shutdown_grace_s)
    app[FEED].unsubscribe(pool.interrupt_canceled)


async def begin_stopping_workers(app: web.Application) -> None:
    """on_shutdown: start the workers' grace period now, while open requests drain, not after."""
    if WORKERS in app:
        app[WORKERS].stop(app[SETTINGS].workers.shutdown_grace_s)
