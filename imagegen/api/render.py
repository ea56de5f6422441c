"""The job as the API shows it: its JSON and its server-sent-event frames, rendered once per
committed event and base URL and kept on the event (a committed event never changes, so
thousands of subscribers and pollers share one rendering)."""

from __future__ import annotations

from ..models import Job
from ..store import JobEvent

# How many renderings (one per base URL, JSON and frame) an event keeps. A few at most:
# without server.public_url the Host header picks the base, and a client sending a new Host
# each time must not grow this.
RENDERINGS_KEPT = 8


def job_json(job: Job, base_url: str, queue_position: int | None = None) -> bytes:
    """The job as GET /generations/{jobId} shows it."""
    return job.to_json(base_url, queue_position)


def event_json(event: JobEvent, base_url: str, queue_position: int | None = None) -> bytes:
    """The job after `event`, as GET /generations/{jobId} shows it (the hot path of polling)."""
    if event.pending:  # its queue position changes without a new event: never kept
        return event.job.to_json(base_url, queue_position)
    renderings = event.renderings
    if renderings is None:
        renderings = event.renderings = {}
    key = ("json", base_url)
    rendered = renderings.get(key)
    if rendered is None:
        rendered = event.job.to_json(base_url)
        if len(renderings) < RENDERINGS_KEPT:
            renderings[key] = rendered
    return rendered


def event_frame(event: JobEvent, base_url: str, queue_position: int | None = None) -> bytes:
    """`event` as a server-sent-events frame, its data the job as GET would show it (a pending
    job's queue position is the one when the frame is first rendered)."""
    renderings = event.renderings
    if renderings is None:
        renderings = event.renderings = {}
    key = ("frame", base_url)
    frame = renderings.get(key)
    if frame is None:
        data = event_json(event, base_url, queue_position)
        frame = b"id: %d\nevent: %s\ndata: %s\n\n" % (event.seq, event.name.encode(), data)
        if len(renderings) < RENDERINGS_KEPT:
            renderings[key] = frame
    return frame
