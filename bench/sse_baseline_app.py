"""The SSE benchmark's ceiling: a bare aiohttp-sse fan-out of job-sized frames, none of imagegen's work.

    python bench/sse_baseline_app.py --port P --job-file FILE [--buffer 1000] [--mode queue|direct]

GET /generations/events opens a stream shaped like the service's (aiohttp-sse's
EventSourceResponse with the same 15 s heartbeat, a `retry:` line, then a `ready` event with
an id). In `queue` mode (the default) a bounded asyncio.Queue per subscriber feeds a task per
stream, as in aiohttp-sse's chat example and as the service does. In `direct` mode the
publisher writes each frame, chunk-encoded, straight into every stream's transport: no task
wakes up per subscriber; one whose unsent bytes exceed the buffer is cut off.
POST /generations {"numImages": n} answers 202 at once, then broadcasts the n + 3 events a
real job makes (created, processing, progress per image, completed), 10 ms apart, each FILE's
job JSON with a fresh `updatedAt`. GET /busy says how many jobs are still broadcasting.
No database, no workers, no Pillow.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp_sse import EventSourceResponse

# Seconds between a job's events: about what the service's worker takes per 64 px image.
EVENT_GAP_S = 0.01
# Direct mode: a stream with more unsent bytes than this many frames' worth is cut off.
FRAME_BYTES = 1024


class Fanout:
    """The subscribers' queues and the last event id."""

    def __init__(self, template: dict[str, Any], buffer: int, direct: bool) -> None:
        self.template = template
        self.buffer = buffer
        self.direct = direct
        self.seq = 0
        self.subscribers: dict[asyncio.Queue[bytes | None], web.Request] = {}
        # Direct mode: each stream's transport, and the future its handler waits on.
        self.transports: dict[asyncio.Transport, asyncio.Future[None]] = {}
        self.jobs: set[asyncio.Task[None]] = set()

    def broadcast(self, name: str, job_id: str, status: str) -> None:
        self.seq += 1
        now = datetime.now(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
        data = json.dumps(
            {**self.template, "jobId": job_id, "status": status, "updatedAt": now}, separators=(",", ":")
        )
        frame = f"id: {self.seq}\nevent: {name}\ndata: {data}\n\n".encode()
        if self.direct:
            chunk = b"%x\r\n%s\r\n" % (len(frame), frame)
            for transport, done in list(self.transports.items()):
                if transport.is_closing() or transport.get_write_buffer_size() > self.buffer * FRAME_BYTES:
                    transport.abort()
                    del self.transports[transport]
                    done.set_result(None)
                else:
                    transport.write(chunk)
            return
        for queue, request in list(self.subscribers.items()):
            try:
                queue.put_nowait(frame)
            except asyncio.QueueFull:  # a slow consumer is cut off, as the service does
                del self.subscribers[queue]
                if request.transport is not None:
                    request.transport.abort()

    async def run_job(self, job_id: str, num_images: int) -> None:
        names = [("job.processing", "processing")] + [("job.progress", "processing")] * num_images
        for name, status in [*names, ("job.completed", "completed")]:
            await asyncio.sleep(EVENT_GAP_S)
            self.broadcast(name, job_id, status)


FANOUT = web.AppKey("fanout", Fanout)


async def events(request: web.Request) -> web.StreamResponse:
    """GET /generations/events: `ready`, then every broadcast frame."""
    fanout = request.app[FANOUT]
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(fanout.buffer)
    response = EventSourceResponse(ping_interval=15.0)
    transport = request.transport
    try:
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        ready = {"lastEventId": fanout.seq}
        await response.write(f"id: {fanout.seq}\nevent: ready\ndata: {json.dumps(ready)}\n\n".encode())
        if fanout.direct and transport is not None:
            done = asyncio.get_running_loop().create_future()
            fanout.transports[transport] = done
            await done  # the publisher writes; this ends at shutdown or when the stream is cut
        else:
            fanout.subscribers[queue] = request
            while (frame := await queue.get()) is not None:
                await response.write(frame)
    except ConnectionResetError:
        pass
    finally:
        fanout.subscribers.pop(queue, None)
        if transport is not None:
            fanout.transports.pop(transport, None)
        if response.prepared:
            response.stop_streaming()
    return response


async def create(request: web.Request) -> web.Response:
    """POST /generations: 202, then the job's events."""
    fanout = request.app[FANOUT]
    num_images = int((await request.json())["numImages"])
    job_id = str(uuid.uuid4())
    fanout.broadcast("job.created", job_id, "pending")
    task = asyncio.create_task(fanout.run_job(job_id, num_images), name=f"job-{job_id}")
    fanout.jobs.add(task)
    task.add_done_callback(fanout.jobs.discard)
    return web.json_response({"jobId": job_id, "status": "pending"}, status=202)


async def busy(request: web.Request) -> web.Response:
    """GET /busy: how many jobs are still broadcasting their events."""
    return web.json_response({"busy": len(request.app[FANOUT].jobs)})


async def end_streams(app: web.Application) -> None:
    """on_shutdown: end every stream, as the service does, so they do not hold the exit."""
    fanout = app[FANOUT]
    for done in fanout.transports.values():
        done.set_result(None)
    for queue, request in list(fanout.subscribers.items()):
        try:
            queue.put_nowait(None)
        except asyncio.QueueFull:
            if request.transport is not None:
                request.transport.abort()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--job-file", type=Path, required=True, help="a real job's JSON, the frames' data")
    parser.add_argument(
        "--buffer", type=int, default=1000, help="events queued per subscriber before it is cut off"
    )
    parser.add_argument(
        "--mode", choices=("queue", "direct"), default="queue", help="how frames reach the streams"
    )
    args = parser.parse_args()
    app = web.Application()
    app[FANOUT] = Fanout(json.loads(args.job_file.read_text()), args.buffer, args.mode == "direct")
    app.router.add_get("/generations/events", events, allow_head=False)
    app.router.add_post("/generations", create)
    app.router.add_get("/busy", busy, allow_head=False)
    app.on_shutdown.append(end_streams)
    # The service's shutdown_timeout (workers.shutdown_grace_s) and server options.
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, shutdown_timeout=10.0)


if __name__ == "__main__":
    main()
