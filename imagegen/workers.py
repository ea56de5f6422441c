"""The worker pool: `workers.count` consumers of the job queue, drawing through the provider."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from .config import SETTINGS, ProviderSettings
from .jobs import JOBS, JobService
from .models import Job
from .providers import PROVIDER, ImageProvider, ImageRequest, ProviderError, render_prompt
from .storage import IMAGES, ImageStore

log = logging.getLogger(__name__)


class WorkerPool:
    """Named worker tasks that take job ids from the queue, one job at a time each."""

    def __init__(
        self, jobs: JobService, provider: ImageProvider, images: ImageStore, settings: ProviderSettings
    ) -> None:
        self._jobs = jobs
        self._provider = provider
        self._images = images
        self._settings = settings
        self._tasks: list[asyncio.Task[None]] = []
        self._busy: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._stopped: asyncio.Task[None] | None = None

    def start(self, count: int) -> None:
        for number in range(count):
            task = asyncio.create_task(self._run(), name=f"imagegen-worker-{number}")
            self._tasks.append(task)

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
            task.cancel()  # a worker still busy is interrupted; it returns its job to pending
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        queue = self._jobs.queue
        while not self._stopping:
            job_id = await queue.get()
            self._busy.add(task)
            try:
                await self._process(job_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A failing job must never take its worker down with it.
                log.exception("worker failed on job %s", job_id)
            finally:
                self._busy.discard(task)
                queue.task_done()

    async def _process(self, job_id: str) -> None:
        job = await self._jobs.claim(job_id)
        if job is None:
            return  # no longer pending: another claim, or it was already finished
        try:
            await self._draw_all(job)
        except asyncio.CancelledError:
            # Shutdown ran out of grace: hand the job back so the next start finishes it.
            # db.write is shielded, so this write commits even though we are cancelled.
            await self._jobs.release(job)
            raise

    async def _draw_all(self, job: Job) -> None:
        current: Job | None = job
        try:
            # A recovered job keeps the images it already stored: draw only the rest.
            prompt = render_prompt(self._settings.prompt_template, job.animal, job.prompt)
            drawn: list[bytes] = []  # a batch the provider drew ahead, stored one image at a time
            for index in range(len(job.images), job.num_images):
                if not drawn:
                    size, remaining = self._settings.image_size, job.num_images - index
                    request = ImageRequest(job.job_id, index, job.animal, size, prompt, remaining)
                    drawn = await self._provider.generate(request)
                data = drawn.pop(0)
                path = await self._images.save(job.job_id, index, data)
                current = await self._jobs.add_image(current, path)
                if current is None:
                    return  # a newer attempt owns the job now; drop this one's result
            await self._jobs.complete(current)
        except ProviderError as exc:
            log.warning("job %s failed: %s: %s", job.job_id, exc.code, exc)
            await self._jobs.fail(current, exc.code, str(exc), exc.retryable)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("job %s failed unexpectedly", job.job_id)
            await self._jobs.fail(current, "internal_error", f"The server failed to draw an image: {type(exc).__name__}")


WORKERS = web.AppKey("workers", WorkerPool)


async def workers_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: workers run while the app runs and stop first (contexts unwind in reverse)."""
    settings = app[SETTINGS]
    pool = WorkerPool(app[JOBS], app[PROVIDER], app[IMAGES], settings.provider)
    pool.start(settings.workers.count)
    app[WORKERS] = pool
    yield
    await pool.stop(settings.workers.shutdown_grace_s)


async def begin_stopping_workers(app: web.Application) -> None:
    """on_shutdown: start the workers' grace period now, while open requests drain, not after."""
    if WORKERS in app:
        app[WORKERS].stop(app[SETTINGS].workers.shutdown_grace_s)
