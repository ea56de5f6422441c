"""The job as the API shows it: its JSON and its server-sent-event frames, rendered once per
committed event and base URL and kept on the event (a committed event never changes, so
thousands of subscribers and pollers share one rendering)."""

from __future__ import annotations

from aiohttp import web

from ..auth import CREDENTIALS, Credentials
from ..models import Job
from ..store import JobEvent
from .params import base_url

# How many renderings (one per base URL and signing period, JSON and frame) an event keeps. A
# few at most: without server.public_url the Host header picks the base, and a client sending a
# new Host each time must not grow this.
RENDERINGS_KEPT = 8


class Links:
    """How job JSON made now for one client links its images: under the client's base URL
    and, with auth on, signed (?exp=...&sig=...) so that an <img> needs no header.

    Signatures expire at a time rounded up (Credentials.image_url_expiry), so every rendering
    made in one period is the same bytes: `key` tells renderings apart. Make a new Links for
    each answer or batch of events, never keep one.
    """

    __slots__ = ("base", "key", "_credentials", "_expires")

    def __init__(self, base: str, credentials: Credentials | None = None) -> None:
        self.base = base
        self._credentials = credentials
        self._expires = credentials.image_url_expiry() if credentials is not None else 0
        self.key = (base, self._expires)

    def image_url(self, job_id: str, index: int) -> str:
        path = f"/images/{job_id}/{index}.png"
        if self._credentials is None:
            return self.base + path
        # Signed as the service sees the path: a proxy's prefix (in base) is not part of it.
        return self.base + path + self._credentials.image_query(path, self._expires)


def links(request: web.Request) -> Links:
    """The Links of an answer to `request`."""
    return Links(base_url(request), request.app.get(CREDENTIALS))


def job_json(job: Job, links: Links, queue_position: int | None = None) -> bytes:
    """The job as GET /generations/{jobId} shows it."""
    return job.to_json(links.image_url, queue_position)


def event_json(event: JobEvent, links: Links, queue_position: int | None = None) -> bytes:
    """The job after `event`, as GET /generations/{jobId} shows it (the hot path of polling)."""
    if event.pending:  # its queue position changes without a new event: never kept
        return event.job.to_json(links.image_url, queue_position)
    renderings = event.renderings
    if renderings is None:
        renderings = event.renderings = {}
    key = ("json", links.key)
    rendered = renderings.get(key)
    if rendered is None:
        rendered = event.job.to_json(links.image_url)
        if len(renderings) < RENDERINGS_KEPT:
            renderings[key] = rendered
    return rendered


def event_frame(event: JobEvent, links: Links, queue_position: int | None = None) -> bytes:
    """`event` as a server-sent-events frame, its data the job as GET would show it (a pending
    job's queue position is the one when the frame is first rendered)."""
    renderings = event.renderings
    if renderings is None:
        renderings = event.renderings = {}
    key = ("frame", links.key)
    frame = renderings.get(key)
    if frame is None:
        data = event_json(event, links, queue_position)
        frame = b"id: %d\nevent: %s\ndata: %s\n\n" % (event.seq, event.name.encode(), data)
        if len(renderings) < RENDERINGS_KEPT:
            renderings[key] = frame
    return frame
