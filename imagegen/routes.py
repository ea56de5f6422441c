"""HTTP handlers: parse and validate the request, call the job service, serialise the answer."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import SETTINGS
from .errors import InvalidRequest, MalformedRequest, NotFound, UnsupportedMediaType, invalid_fields
from .events import BROADCASTER
from .jobs import JOBS, JobPage, parse_job_id
from .models import CreateJob, Job, JobStatus
from .storage import IMAGES

JSON = "application/json"


class ListQuery(BaseModel):
    """Query parameters of GET /generations."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Digits only: pydantic's lax int would take "1.0" or " 5 ", which are not limits.
    limit: Annotated[int, Field(ge=1, le=200)] = 50
    cursor: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    status: JobStatus | None = None


def base_url(request: web.Request) -> str:
    """The base of absolute URLs: server.public_url, else the request's own scheme and host."""
    return request.app[SETTINGS].server.public_url or f"{request.scheme}://{request.host}"


def _single_query(request: web.Request) -> dict[str, str]:
    query: dict[str, str] = {}
    for key, value in request.query.items():
        if key in query:
            raise InvalidRequest(
                f"query parameter {key} is given more than once",
                invalid_params=[{"name": key, "in": "query", "reason": "repeated"}],
            )
        query[key] = value
    return query


async def create_generation(request: web.Request) -> web.Response:
    """POST /generations: commit a job and answer 202 with its id."""
    if request.content_type != JSON:
        raise UnsupportedMediaType(f"The body must be {JSON}, not {request.content_type or 'empty'}")
    body = await request.read()
    try:
        spec = CreateJob.model_validate_json(body)
    except ValidationError as exc:
        if any(err["type"] == "json_invalid" for err in exc.errors()):
            raise MalformedRequest(f"The body is not valid JSON: {exc.errors()[0]['msg']}") from None
        raise invalid_fields(exc, "body") from None
    key = _idempotency_key(request)
    wait_s = _preferred_wait(request)
    jobs = request.app[JOBS]
    created = await jobs.create(spec.num_images, spec.animal, spec.prompt, key)
    headers = {"Location": f"{base_url(request)}/generations/{created.job_id}"}
    if created.replayed:
        headers["Idempotent-Replayed"] = "true"
    if wait_s is None:
        status = "pending" if not created.replayed else (await jobs.get(created.job_id)).status.value
        body = b'{"jobId":"%s","status":"%s"}' % (created.job_id.encode(), status.encode())
        return web.Response(status=202, body=body, content_type=JSON, headers=headers)
    headers["Preference-Applied"] = f"wait={wait_s:g}"
    headers["Vary"] = "Prefer"
    job = await _wait_until_finished(request, created.job_id, wait_s)
    if job.status.terminal:
        return web.Response(status=201, body=jobs.render(job, base_url(request)), content_type=JSON, headers=headers)
    body = b'{"jobId":"%s","status":"%s"}' % (job.job_id.encode(), job.status.value.encode())
    return web.Response(status=202, body=body, content_type=JSON, headers=headers)


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not (1 <= len(key) <= 255 and all(0x21 <= ord(ch) <= 0x7E for ch in key)):
        raise InvalidRequest(
            "Idempotency-Key must be 1 to 255 visible ASCII characters (a UUID is a good choice)",
            invalid_params=[{"name": "Idempotency-Key", "in": "header", "reason": "not 1-255 visible ASCII characters"}],
        )
    return key


def _preferred_wait(request: web.Request) -> float | None:
    """The `wait` of `Prefer` headers (RFC 7240), capped by jobs.prefer_wait_max_s; None if absent.

    Preferences this service does not know, or a malformed wait, are ignored, as RFC 7240 asks.
    """
    wait = None
    for header in request.headers.getall("Prefer", []):
        for preference in header.split(","):
            name, _, value = preference.split(";")[0].strip().partition("=")
            value = value.strip().strip('"')
            if name.strip().lower() == "wait" and value.isascii() and value.isdigit():
                wait = int(value)
    if wait is None:
        return None
    return float(min(wait, request.app[SETTINGS].jobs.prefer_wait_max_s))


async def _wait_until_finished(request: web.Request, job_id: str, wait_s: float) -> Job:
    """The job once it is terminal, or as it is after `wait_s` seconds."""
    broadcaster = request.app[BROADCASTER]
    jobs = request.app[JOBS]
    # Subscribe before looking, so a finish between the look and the wait is not missed.
    subscription = broadcaster.subscribe(job_id)
    try:
        job = await jobs.get(job_id)
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
    return await jobs.get(job_id)


async def get_generation(request: web.Request) -> web.Response:
    """GET /generations/{jobId}: the job as it is now."""
    jobs = request.app[JOBS]
    job = await jobs.get(parse_job_id(request.match_info["jobId"]))
    return web.Response(body=jobs.render(job, base_url(request)), content_type=JSON)


async def cancel_generation(request: web.Request) -> web.Response:
    """POST /generations/{jobId}/cancel: stop a pending or processing job."""
    jobs = request.app[JOBS]
    job = await jobs.cancel(parse_job_id(request.match_info["jobId"]))
    return web.Response(body=jobs.render(job, base_url(request)), content_type=JSON)


async def delete_generation(request: web.Request) -> web.Response:
    """DELETE /generations/{jobId}: remove a finished job and its image files."""
    job_id = parse_job_id(request.match_info["jobId"])
    await request.app[JOBS].delete(job_id)
    await request.app[IMAGES].delete_job(job_id)
    return web.Response(status=204)


async def list_generations(request: web.Request) -> web.Response:
    """GET /generations: newest first, a page at a time."""
    query = _single_query(request)
    limit = query.get("limit")
    if limit is not None and not (limit.isascii() and limit.isdigit()):
        raise InvalidRequest(
            "limit must be a whole number from 1 to 200",
            invalid_params=[{"name": "limit", "in": "query", "reason": "not a whole number"}],
        )
    try:
        params = ListQuery.model_validate(query)
    except ValidationError as exc:
        raise invalid_fields(exc, "query") from None
    service = request.app[JOBS]
    page: JobPage = await service.list(params.limit, params.cursor, params.status)
    base = base_url(request)
    jobs = b",".join(service.render(job, base) for job in page.jobs)
    cursor = json.dumps(page.next_cursor).encode()
    return web.Response(body=b'{"jobs":[%s],"nextCursor":%s}' % (jobs, cursor), content_type=JSON)


async def get_image(request: web.Request) -> web.FileResponse:
    """GET /images/{jobId}/{index}.png: a stored image, cacheable forever (it never changes)."""
    try:
        job_id = parse_job_id(request.match_info["jobId"])
    except InvalidRequest:
        raise NotFound("No such image") from None
    index_text = request.match_info["index"]
    job = await request.app[JOBS].find(job_id)
    # The file path comes from the database row, never from the URL text.
    if job is None or int(index_text) >= len(job.images):
        raise NotFound("No such image")
    path = request.app[IMAGES].path(job.images[int(index_text)])
    return web.FileResponse(
        path, headers={"Cache-Control": "public, max-age=31536000, immutable", "Content-Type": "image/png"}
    )
