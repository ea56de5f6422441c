"""Server-sent-event streams of job changes: every job's, or one job's, resumable by id."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

from aiohttp import web
from aiohttp_sse import EventSourceResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import SETTINGS
from ..events import BROADCASTER, ReplayGap, Subscription, replay
from ..jobs import JOBS, owner_filter
from ..metrics import METRICS
from ..models import Job
from ..store import STORE, JobEvent
from .access import access
from .auth import TOKEN_EXPIRES, tenant_of
from .openapi import Reply, operation
from .params import JobPath, parse_job_id, query_names, single_query
from .problems import invalid_fields
from .render import event_frame, job_json, links

# Ids are 64-bit integers in both databases: up to 18 digits stays below 2**63.
EVENT_ID_PATTERN = r"^[0-9]{1,18}$"

# Kernel send buffer per stream. Linux lets a socket's buffer grow to megabytes, which times
# thousands of streams is gigabytes held for clients that stopped reading. Events are small
# and infrequent, so a small buffer costs nothing, and a stalled client's writes block soon,
# its subscription overflows, and it is cut off (it resumes by id).
STREAM_SEND_BUFFER = 64 * 1024

EVENT_STREAM = "text/event-stream"


class _StreamEnded(Exception):
    """The stream has sent all it will send."""


class StreamQuery(BaseModel):
    """Query parameters of the event streams."""

    # Unknown parameters never reach the model (single_query drops them); "ignore" says so.
    model_config = ConfigDict(extra="ignore")

    last_event_id: str | None = Field(
        default=None,
        alias="lastEventId",
        pattern=EVENT_ID_PATTERN,
        description="Resume after this event id, for clients that cannot send Last-Event-ID.",
    )
    token: str | None = Field(
        default=None,
        description="With auth on, in place of the Authorization header (EventSource cannot send one): a token "
        "from POST /tokens. The stream ends when the token expires; reconnect with a new one and lastEventId.",
    )


STREAM_QUERY_NAMES = query_names(StreamQuery)

# What a stream's response carries before its first byte of body: a HEAD is answered with these
# (the same as EventSourceResponse sets), without a stream being opened.
_STREAM_HEADERS = {
    "Content-Type": EVENT_STREAM,
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",
}


class Event(BaseModel):
    """One server-sent event, as an EventSource client parses it."""

    id: str | None = Field(default=None, description="The event's global id, for resuming (job.state has none).")
    event: str = Field(description="job.created, job.progress, ..., or ready, reset, job.state.")
    data: str = Field(description="JSON: the job as GET /generations/{jobId} shows it (ready and reset: "
                      '{"lastEventId": N}).')


class StreamHeaders(BaseModel):
    """Request headers of the event streams."""

    last_event_id: str | None = Field(
        default=None,
        alias="Last-Event-ID",
        pattern=EVENT_ID_PATTERN,
        description="Resume after this event id (EventSource sends it when it reconnects).",
    )


STREAM_DESCRIPTION = (
    "Server-sent events (text/event-stream): `id` is a global, strictly increasing number, `event` the "
    "change (job.created, job.processing, job.progress, job.completed, job.failed, job.canceled, "
    "job.retrying, job.requeued, job.deleted), and `data` the job as GET /generations/{jobId} shows it. "
    "With Last-Event-ID (or lastEventId), every event after that id is replayed first; an id older than "
    "what is kept gets a `reset` event and the current state as `job.state` events."
)


def _last_event_id(request: web.Request) -> int | None:
    """The id to resume after: the Last-Event-ID header (EventSource sets it on reconnect),
    else ?lastEventId= for clients that cannot set headers. Both are checked when both come."""
    try:
        query = StreamQuery.model_validate(single_query(request, STREAM_QUERY_NAMES))
    except ValidationError as exc:
        raise invalid_fields(exc, "query") from None
    header = request.headers.get("Last-Event-ID")
    if header is not None:
        try:
            header = StreamHeaders.model_validate({"Last-Event-ID": header.strip()}).last_event_id
        except ValidationError as exc:
            raise invalid_fields(exc, "header") from None
    raw = header if header is not None else query.last_event_id
    return int(raw) if raw else None


def _plain_frame(name: str, data: dict[str, Any], seq: int | None = None) -> bytes:
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class _EventSourceResponse(EventSourceResponse):
    """aiohttp-sse's response, but a second prepare() of a stream whose client has gone
    returns as aiohttp's own responses do, instead of raising CancelledError.

    aiohttp prepares every answer again once its handler returns; the CancelledError that
    aiohttp-sse raises there (its check that the client is still connected) unwinds past
    aiohttp's access log, so a stream the client left had no request line. Without it, the
    closing write fails with a ConnectionError, which aiohttp handles and logs.
    """

    async def prepare(self, request: web.BaseRequest) -> Any:
        if self.prepared:
            return await web.StreamResponse.prepare(self, request)
        return await super().prepare(request)


class _Stream:
    """One open event stream: its response, its subscription, and the last id it sent."""

    def __init__(self, request: web.Request, subscription: Subscription) -> None:
        settings = request.app[SETTINGS].events
        self.request = request
        self.subscription = subscription
        self.jobs = request.app[JOBS]
        self.sent = 0
        self._metrics = request.app.get(METRICS)
        self.response = _EventSourceResponse(ping_interval=settings.heartbeat_s)
        # `retry:` goes out in the same block as the first event, never alone: a block with a
        # retry field and no data is an event of its own to some clients (httpx-sse yields it).
        self._retry = f"retry: {settings.retry_ms}\n".encode()
        self._watcher: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None

    async def open(self) -> None:
        sock = self.request.transport.get_extra_info("socket") if self.request.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER)
        await self.response.prepare(self.request)
        # A subscriber cut off for falling behind may be stuck writing to a stalled peer:
        # abort the connection so that write fails now rather than at the TCP timeout.
        transport = self.request.transport
        self.subscription.on_overflow = transport.abort if transport is not None else None
        # aiohttp-sse's heartbeat task ends when a write to the client fails: that is how an
        # idle stream learns its client is gone, and it must then stop waiting for events.
        self._watcher = asyncio.create_task(self.response.wait(), name="imagegen-stream-watcher")
        self._watcher.add_done_callback(lambda _: self.subscription.close("disconnected"))
        expires = self.request.get(TOKEN_EXPIRES)
        if expires is not None:
            # A stream opened with a token lasts as long as the token: a key that is revoked
            # (removed from the config) stops reaching streams within token_ttl_s.
            delay = max(0.0, expires - time.time())
            self._expiry = asyncio.get_running_loop().call_later(delay, self.subscription.close, "token expired")

    async def write(self, frames: bytes) -> None:
        """Write whole event blocks; the first write leads with the `retry:` field."""
        if self._retry:
            frames, self._retry = self._retry + frames, b""
        await self.response.write(frames)

    async def watcher_done(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        if self._watcher is not None:
            await asyncio.gather(self._watcher, return_exceptions=True)

    async def send(self, event: JobEvent) -> None:
        if event.seq > self.sent:
            await self.write(event_frame(event, links(self.request), self.jobs.queue_position(event.job_id)))
            self.sent = event.seq
            if self._metrics is not None:
                self._metrics.events_delivered.inc()

    async def send_plain(self, name: str, data: dict[str, Any], seq: int | None = None) -> None:
        await self.write(_plain_frame(name, data, seq))
        if seq is not None:
            self.sent = seq

    async def send_state(self, job: Job) -> None:
        """A job's current state, as `job.state`. It carries no id (ids belong to committed
        events): the caller sends an event with one first (reset or ready)."""
        data = job_json(job, links(self.request), self.jobs.queue_position(job.job_id))
        await self.write(b"event: job.state\ndata: %s\n\n" % data)

    async def live(self, stop_after_terminal: bool) -> None:
        """Forward live events until the subscription closes (shutdown, disconnect, overflow)."""
        while events := await self.subscription.take():
            frames = []
            batch_links = links(self.request)  # per batch: signed image URLs must not go stale
            for event in events:
                if event.seq <= self.sent:
                    continue  # already sent during replay
                frames.append(event_frame(event, batch_links, self.jobs.queue_position(event.job_id)))
                self.sent = event.seq
                if stop_after_terminal and event.terminal:
                    await self._write_events(frames)
                    return
            if frames:
                await self._write_events(frames)

    async def _write_events(self, frames: list[bytes]) -> None:
        await self.write(b"".join(frames))
        if self._metrics is not None:
            self._metrics.events_delivered.inc(len(frames))

    async def reset(self, latest: int, reason: str) -> None:
        """The client's id is beyond what we retain: say so, and move it to `latest`."""
        await self.send_plain("reset", {"reason": reason, "lastEventId": latest}, latest)


async def _serve(stream: _Stream, body: Any) -> web.StreamResponse:
    if stream.request.method == "HEAD":
        # RFC 9110: HEAD answers what GET would, without the body. GET's checks (the query,
        # Last-Event-ID, the job's existence, 204) have run; a stream is never opened.
        return web.Response(headers=_STREAM_HEADERS)
    try:
        await stream.open()
        await body(stream)
    except (ConnectionResetError, _StreamEnded):
        pass  # the client left, or the stream said all it had to say
    finally:
        stream.subscription.close("done")
        if stream.response.prepared:
            stream.response.stop_streaming()  # ends the heartbeat, and with it the watcher
            await stream.watcher_done()
    return stream.response


@operation(
    "Every job's changes, as server-sent events",
    description=STREAM_DESCRIPTION + " This stream starts with a `ready` event carrying the current id.",
    tags=("events",),
    query=StreamQuery,
    headers=StreamHeaders,
    replies={200: Reply(Event, "An endless event stream, with a `: ping` comment every heartbeat.", EVENT_STREAM)},
    errors=(422,),
)
@access("stream")
async def stream_all(request: web.Request) -> web.StreamResponse:
    """GET /generations/events: every job's changes (with auth on, the caller's jobs'),
    resumable by Last-Event-ID."""
    last_id = _last_event_id(request)
    broadcaster = request.app[BROADCASTER]
    store = request.app[STORE]
    jobs = request.app[JOBS]
    tenant = tenant_of(request)
    owner = owner_filter(tenant)
    # Subscribe before reading the table: whatever commits after the read is in the buffer.
    subscription = broadcaster.subscribe(owner=owner)

    async def reset(stream: _Stream, latest: int) -> None:
        await stream.reset(latest, "the requested id is no longer retained")
        below = None
        while True:  # the current state of every job it follows: all of the caller's
            page, below = await jobs.list(200, below, None, tenant)
            for job in page:
                await stream.send_state(job)
            if below is None:
                break

    async def body(stream: _Stream) -> None:
        latest, pruned = await store.horizon()
        if last_id is None:
            # Give the client an id at once, so a drop before the first change loses nothing.
            await stream.send_plain("ready", {"lastEventId": latest}, latest)
        elif last_id < pruned or last_id > latest:
            await reset(stream, latest)
        else:
            stream.sent = last_id
            try:
                async for event in replay(store, last_id, owner=owner):
                    await stream.send(event)
            except ReplayGap:
                await reset(stream, (await store.horizon())[0])
        await stream.live(stop_after_terminal=False)

    try:
        return await _serve(_Stream(request, subscription), body)
    finally:
        broadcaster.unsubscribe(subscription)


@operation(
    "One job's state and changes, as server-sent events",
    description=STREAM_DESCRIPTION + " This stream starts with the job's current state and ends after its "
    "final event.",
    tags=("events",),
    path=JobPath,
    query=StreamQuery,
    headers=StreamHeaders,
    replies={
        200: Reply(Event, "The job's events, ending after its final one.", EVENT_STREAM),
        204: Reply(None, "The job has ended and the client already has its final event: do not reconnect."),
    },
    errors=(404, 422),
)
@access("stream")
async def stream_job(request: web.Request) -> web.StreamResponse:
    """GET /generations/{jobId}/events: the job's current state, then its changes, until it ends."""
    job_id = parse_job_id(request.match_info["jobId"])
    last_id = _last_event_id(request)
    jobs = request.app[JOBS]
    store = request.app[STORE]
    broadcaster = request.app[BROADCASTER]
    tenant = tenant_of(request)
    # 404 before any stream starts (EventSource then stops for good); another tenant's job is
    # not found either, and once checked its events are the caller's to follow.
    job = await jobs.get(job_id, tenant)
    subscription = broadcaster.subscribe(job_id)
    try:
        latest, pruned = await store.horizon()
        latest_of_job = await store.latest_event(job_id)
        resumable = last_id is not None and pruned <= last_id <= latest
        if job.status.terminal and resumable and (latest_of_job is None or latest_of_job.seq <= last_id):
            # The client already has the final state: 204 tells EventSource not to reconnect.
            return web.Response(status=204)

        async def state(stream: _Stream) -> None:
            # The job's row as it is now, after an event that gives the client an id to resume
            # from (job.state carries none): a reset if its id was too old, else ready.
            latest, _ = await store.horizon()
            if last_id is not None:
                await stream.reset(latest, "the requested id is no longer retained")
            else:
                await stream.send_plain("ready", {"lastEventId": latest}, latest)
            current = await jobs.get(job_id, tenant)
            await stream.send_state(current)
            if current.status.terminal:
                raise _StreamEnded

        async def body(stream: _Stream) -> None:
            if resumable:
                stream.sent = last_id
                try:
                    async for event in replay(store, last_id, job_id):
                        await stream.send(event)
                        if event.terminal:
                            raise _StreamEnded
                except ReplayGap:
                    await state(stream)
            elif last_id is None and latest_of_job is not None:
                # The job's latest event is its current state (the row and the event were
                # committed together), and it carries an id. Anything committed since it was
                # read is already in the subscription, which live() delivers next.
                await stream.send(latest_of_job)
                if latest_of_job.terminal:
                    raise _StreamEnded
            else:  # its id is too old, or its events were pruned
                await state(stream)
            await stream.live(stop_after_terminal=True)

        return await _serve(_Stream(request, subscription), body)
    finally:
        broadcaster.unsubscribe(subscription)
