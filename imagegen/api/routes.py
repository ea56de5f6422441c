"""HTTP handlers: parse and validate the request, call the job service, render the answer.

Each handler's `@operation` documents it in the OpenAPI document, from the same models it
validates and serialises with.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from aiohttp import web
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ..auth import CREDENTIALS
from ..config import SETTINGS
from ..events import BROADCASTER
from ..jobs import JOBS, JobService
from ..models import CreateJob, Job, JobAccepted, JobPage, JobStatus
from ..storage import IMAGES
from .access import access
from .auth import SIGNED, tenant_of
from .openapi import JSON, Reply, operation
from .params import (
    CURSOR_PATTERN,
    ImagePath,
    JobPath,
    base_url,
    decode_cursor,
    encode_cursor,
    parse_job_id,
    query_names,
    single_query,
)
from .problems import InvalidRequest, MalformedRequest, NotFound, UnsupportedMediaType, invalid_fields, problem_response
from .render import Links, event_json, job_json, links


# The request body model narrowed to this app's settings, made once per app (hashing the
# settings to look it up on every request would cost more than the validation).
CREATE_JOB = web.AppKey("create_job", type)


def _digits(value: object) -> object:
    # Query values are text; pydantic's lax int would also take "1.0", " 5 " or "５".
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("must be a whole number written with the digits 0-9")
    return value


class ListQuery(BaseModel):
    """Query parameters of GET /generations."""

    # Unknown parameters never reach the model (single_query drops them); "ignore" says so.
    model_config = ConfigDict(extra="ignore", frozen=True)

    limit: Annotated[int, Field(ge=1, le=200), BeforeValidator(_digits)] = Field(
        default=50, description="How many jobs per page."
    )
    cursor: Annotated[str, Field(pattern=CURSOR_PATTERN)] | None = Field(
        default=None, description="The nextCursor of the previous page; absent for the first page."
    )
    status: JobStatus | None = Field(default=None, description="Only jobs in this status.")


LIST_QUERY_NAMES = query_names(ListQuery)


class ImageQuery(BaseModel):
    """Query parameters of GET /images/... (with auth on, image URLs carry them)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    exp: str | None = Field(default=None, description="With auth on: when the signature expires (Unix time).")
    sig: str | None = Field(default=None, description="With auth on: the URL's signature, in place of an API key.")


IMAGE_QUERY_NAMES = query_names(ImageQuery)


class ImageHeaders(BaseModel):
    """Request headers GET /images/... honours (aiohttp's FileResponse reads them)."""

    if_none_match: str | None = Field(
        default=None, alias="If-None-Match", description="The ETag of a copy you hold: 304 if it is current."
    )


class CreateHeaders(BaseModel):
    """Request headers POST /generations understands."""

    idempotency_key: str | None = Field(
        default=None,
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Any 1-255 visible ASCII characters. The same key with the same body returns the job "
        "the first request created (Idempotent-Replayed: true); with another body it is 422. Kept a day.",
    )
    prefer: str | None = Field(
        default=None,
        alias="Prefer",
        description="wait=N (RFC 7240): hold the answer up to N seconds (capped by jobs.prefer_wait_max_s); "
        "201 with the job if it finished by then.",
    )


@operation(
    "Create a generation job",
    description="The job is committed before the answer; follow it at Location, by polling or by "
    "its event stream.",
    tags=("generations",),
    body=CreateJob.configured,
    headers=CreateHeaders,
    replies={
        202: Reply(
            JobAccepted,
            "The job is committed and queued (or, for a repeated Idempotency-Key, the job it created).",
            headers=("Location", "Idempotent-Replayed", "Preference-Applied"),
        ),
        201: Reply(
            Job,
            "Prefer: wait=N, and the job finished within N seconds: here it is.",
            headers=("Location", "Idempotent-Replayed", "Preference-Applied"),
        ),
    },
    errors=(400, 408, 413, 415, 422, 429, 503),
)
async def create_generation(request: web.Request) -> web.Response:
    """POST /generations: commit a job and answer 202 with its id."""
    if request.content_type != JSON:
        raise UnsupportedMediaType(f"The body must be {JSON}, not {request.content_type or 'empty'}")
    try:
        async with asyncio.timeout(request.app[SETTINGS].server.body_timeout_s):
            body = await request.read()
    except TimeoutError:
        timeout_s = request.app[SETTINGS].server.body_timeout_s
        # The rest of the body may never come: close the connection rather than wait to drain it.
        response = problem_response(408, "Request Timeout", f"The request body did not arrive within {timeout_s:g} s")
        response.force_close()
        return response
    try:
        spec = request.app[CREATE_JOB].model_validate_json(body)
    except ValidationError as exc:
        if any(err["type"] == "json_invalid" for err in exc.errors()):
            raise MalformedRequest(f"The body is not valid JSON: {exc.errors()[0]['msg']}") from None
        raise invalid_fields(exc, "body") from None
    key = _idempotency_key(request)
    wait_s = _preferred_wait(request)
    jobs = request.app[JOBS]
    tenant = tenant_of(request)
    created = await jobs.create(spec.num_images, spec.animal, spec.prompt, key, tenant, spec.webhook, spec.webhook_events)
    headers = {"Location": f"{base_url(request)}/generations/{created.job_id}"}
    if created.replayed:
        headers["Idempotent-Replayed"] = "true"
    if wait_s is None:
        status = "pending" if not created.replayed else (await jobs.get(created.job_id, tenant)).status.value
        body = b'{"jobId":"%s","status":"%s"}' % (created.job_id.encode(), status.encode())
        return web.Response(status=202, body=body, content_type=JSON, headers=headers)
    headers["Preference-Applied"] = f"wait={wait_s:g}"
    headers["Vary"] = "Prefer"
    job = await _wait_until_finished(request, created.job_id, wait_s)
    if job.status.terminal:
        return web.Response(status=201, body=job_json(job, links(request)), content_type=JSON, headers=headers)
    body = b'{"jobId":"%s","status":"%s"}' % (job.job_id.encode(), job.status.value.encode())
    return web.Response(status=202, body=body, content_type=JSON, headers=headers)


def _idempotency_key(request: web.Request) -> str | None:
    """The Idempotency-Key header, checked by the same model that documents it."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    try:
        return CreateHeaders.model_validate({"Idempotency-Key": key}).idempotency_key
    except ValidationError as exc:
        raise invalid_fields(exc, "header") from None


def _preferred_wait(request: web.Request) -> float | None:
    """The `wait` of `Prefer` headers (RFC 7240), capped by jobs.prefer_wait_max_s; None if absent.

    Preferences this service does not know, or a malformed wait, are ignored, as RFC 7240 asks.
    """
    wait = None
    for header in request.headers.getall("Prefer", []):
        for preference in header.split(","):
            name, _, value = preference.split(";")[0].strip().partition("=")
            value = value.strip().strip('"')
            # Up to six digits: more than the cap anyway, and int() of a huge string is costly.
            if name.strip().lower() == "wait" and value.isascii() and value.isdigit() and len(value) <= 6:
                wait = int(value)
    if wait is None:
        return None
    return float(min(wait, request.app[SETTINGS].jobs.prefer_wait_max_s))


async def _wait_until_finished(request: web.Request, job_id: str, wait_s: float) -> Job:
    """The job once it is terminal, or as it is after `wait_s` seconds."""
    broadcaster = request.app[BROADCASTER]
    jobs = request.app[JOBS]
    tenant = tenant_of(request)
    # Subscribe before looking, so a finish between the look and the wait is not missed.
    subscription = broadcaster.subscribe(job_id)
    try:
        job = await jobs.get(job_id, tenant)
        async with asyncio.timeout(wait_s):
            while not job.status.terminal:
                event = await subscription.next()
                if event is None:  # shutting down, or the subscription fell behind
                    break
                job = event.job
    except TimeoutError:
        pass
    finally:
        broadcaster.unsubscribe(subscription)
    return await jobs.get(job_id, tenant)


@operation(
    "Read a job",
    tags=("generations",),
    path=JobPath,
    replies={200: Reply(Job, "The job as it is now.")},
    errors=(404, 422),
)
async def get_generation(request: web.Request) -> web.Response:
    """GET /generations/{jobId}: the job as it is now."""
    jobs = request.app[JOBS]
    job_id = parse_job_id(request.match_info["jobId"])
    tenant = tenant_of(request)
    latest = jobs.latest_visible(job_id, tenant)
    if latest is not None:  # in memory: no database read
        body = event_json(latest, links(request), jobs.queue_position(job_id))
    else:
        body = render(jobs, await jobs.get(job_id, tenant), links(request))
    return web.Response(body=body, content_type=JSON)


def render(jobs: JobService, job: Job, links: Links) -> bytes:
    """The job's JSON as the API shows it now."""
    return job_json(job, links, jobs.queue_position(job.job_id))


@operation(
    "Cancel a job",
    description="A pending job is canceled at once; a processing job's provider call is interrupted.",
    tags=("generations",),
    path=JobPath,
    replies={200: Reply(Job, "The job, now canceled.")},
    errors=(404, 409, 422, 503),
)
async def cancel_generation(request: web.Request) -> web.Response:
    """POST /generations/{jobId}/cancel: stop a pending or processing job."""
    jobs = request.app[JOBS]
    job = await jobs.cancel(parse_job_id(request.match_info["jobId"]), tenant_of(request))
    return web.Response(body=render(jobs, job, links(request)), content_type=JSON)


@operation(
    "Delete a finished job and its images",
    tags=("generations",),
    path=JobPath,
    replies={204: Reply(None, "Deleted: the job and its image URLs answer 404 from now on.")},
    errors=(404, 409, 422, 503),
)
async def delete_generation(request: web.Request) -> web.Response:
    """DELETE /generations/{jobId}: remove a finished job and its image files."""
    await request.app[JOBS].delete(parse_job_id(request.match_info["jobId"]), tenant_of(request))
    return web.Response(status=204)


@operation(
    "List jobs, newest first",
    description="Walking nextCursor from the first page to the last returns each job exactly once.",
    tags=("generations",),
    query=ListQuery,
    replies={200: Reply(JobPage, "One page of jobs.")},
    errors=(422,),
)
async def list_generations(request: web.Request) -> web.Response:
    """GET /generations: newest first, a page at a time."""
    try:
        params = ListQuery.model_validate(single_query(request, LIST_QUERY_NAMES))
    except ValidationError as exc:
        raise invalid_fields(exc, "query") from None
    service = request.app[JOBS]
    below = decode_cursor(params.cursor) if params.cursor else None
    page, next_seq = await service.list(params.limit, below, params.status, tenant_of(request))
    page_links = links(request)
    jobs = b",".join(render(service, job, page_links) for job in page)
    cursor = json.dumps(None if next_seq is None else encode_cursor(next_seq)).encode()
    return web.Response(body=b'{"jobs":[%s],"nextCursor":%s}' % (jobs, cursor), content_type=JSON)


@operation(
    "Download a stored image",
    description="Images never change: cache them, and revalidate with If-None-Match.",
    tags=("images",),
    path=ImagePath,
    query=ImageQuery,
    headers=ImageHeaders,
    replies={
        200: Reply(bytes, "The PNG.", "image/png", headers=("ETag", "Last-Modified", "Cache-Control")),
        304: Reply(None, "The copy whose ETag was sent is current.", headers=("ETag", "Cache-Control")),
    },
    errors=(404,),
)
@access("image")
async def get_image(request: web.Request) -> web.FileResponse:
    """GET /images/{jobId}/{index}.png: a stored image, cacheable forever (it never changes)."""
    try:
        job_id = parse_job_id(request.match_info["jobId"])
    except InvalidRequest:
        raise NotFound("No such image") from None
    index_text = request.match_info["index"]
    if request.get(SIGNED):
        # No key came, a signature did: it opens this one image, whoever holds the URL. A
        # tampered or expired one is no image at all, as for an id that does not exist.
        query = single_query(request, IMAGE_QUERY_NAMES)
        valid = request.app[CREDENTIALS].image_signature_valid(request.path, query.get("exp", ""), query.get("sig", ""))
        if not valid:
            raise NotFound("No such image")
        job = await request.app[JOBS].find(job_id, None)
    else:
        job = await request.app[JOBS].find(job_id, tenant_of(request))
    # The file path comes from the database row, never from the URL text.
    if job is None or int(index_text) >= len(job.images):
        raise NotFound("No such image")
    path = request.app[IMAGES].path(job.images[int(index_text)])
    # With auth on, not for shared caches: a copy cached for one key would be served to others.
    scope = "private" if CREDENTIALS in request.app else "public"
    return web.FileResponse(
        path, headers={"Cache-Control": f"{scope}, max-age=31536000, immutable", "Content-Type": "image/png"}
    )
