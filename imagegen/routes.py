"""HTTP handlers: parse and validate the request, call the job service, serialise the answer."""

from __future__ import annotations

import json
from typing import Annotated

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import SETTINGS
from .errors import InvalidRequest, MalformedRequest, NotFound, UnsupportedMediaType, invalid_fields
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
    job_id = await request.app[JOBS].create(spec.num_images, spec.animal, spec.prompt)
    return web.Response(
        status=202,
        body=b'{"jobId":"%s","status":"pending"}' % job_id.encode(),
        content_type=JSON,
        headers={"Location": f"{base_url(request)}/generations/{job_id}"},
    )


async def get_generation(request: web.Request) -> web.Response:
    """GET /generations/{jobId}: the job as it is now."""
    job = await request.app[JOBS].get(parse_job_id(request.match_info["jobId"]))
    return web.Response(body=job.to_json(base_url(request)), content_type=JSON)


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
    page: JobPage = await request.app[JOBS].list(params.limit, params.cursor, params.status)
    base = base_url(request)
    jobs = b",".join(job.to_json(base) for job in page.jobs)
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
