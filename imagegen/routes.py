"""HTTP handlers: parse and validate the request, call the job service, serialise the answer.

Each handler's `@operation` documents it in the OpenAPI document, from the same models it
validates and serialises with.
"""

from __future__ import annotations

from typing import Annotated

from aiohttp import web
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from .config import SETTINGS
from .errors import InvalidRequest, MalformedRequest, NotFound, UnsupportedMediaType, invalid_fields
from .jobs import CURSOR_PATTERN, JOBS, parse_job_id
from .models import JOB_ID_PATTERN, CreateJob, Job, JobAccepted, JobPage, JobStatus
from .openapi import JSON, Reply, operation
from .storage import IMAGES


def _digits(value: object) -> object:
    # Query values are text; pydantic's lax int would also take "1.0", " 5 " or "５".
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("must be a whole number written with the digits 0-9")
    return value


class ListQuery(BaseModel):
    """Query parameters of GET /generations."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    limit: Annotated[int, Field(ge=1, le=200), BeforeValidator(_digits)] = Field(
        default=50, description="How many jobs per page."
    )
    cursor: Annotated[str, Field(pattern=CURSOR_PATTERN)] | None = Field(
        default=None, description="The nextCursor of the previous page; absent for the first page."
    )
    status: JobStatus | None = Field(default=None, description="Only jobs in this status.")


# parse_job_id checks the same JOB_ID_PATTERN in the handlers, with a friendlier message.
JobId = Annotated[str, Field(alias="jobId", pattern=JOB_ID_PATTERN, description="The job's id, a UUID.")]


class JobPath(BaseModel):
    """Path parameters of /generations/{jobId}."""

    job_id: JobId


class ImagePath(BaseModel):
    """Path parameters of /images/{jobId}/{index}.png."""

    job_id: JobId
    index: int = Field(ge=0, description="Which of the job's images, from 0.")


class ImageHeaders(BaseModel):
    """Request headers GET /images/... honours (aiohttp's FileResponse reads them)."""

    if_none_match: str | None = Field(
        default=None, alias="If-None-Match", description="The ETag of a copy you hold: 304 if it is current."
    )


def _base_url(request: web.Request) -> str:
    return request.app[SETTINGS].server.public_url or f"{request.scheme}://{request.host}"


def _json(model: BaseModel, request: web.Request, status: int = 200, **headers: str) -> web.Response:
    """The model as the API's JSON, its image URLs absolute against this request's base URL."""
    text = model.model_dump_json(by_alias=True, context={"base_url": _base_url(request)})
    return web.Response(text=text, status=status, content_type=JSON, headers=headers)


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


@operation(
    "Create a generation job",
    description="The job is committed before the answer; follow it at Location.",
    tags=("generations",),
    body=CreateJob.configured,
    replies={202: Reply(JobAccepted, "The job is committed and queued.", headers=("Location",))},
    errors=(400, 413, 415, 422),
)
async def create_generation(request: web.Request) -> web.Response:
    """POST /generations: commit a job and answer 202 with its id."""
    if request.content_type != JSON:
        raise UnsupportedMediaType(f"The body must be {JSON}, not {request.content_type or 'empty'}")
    body = await request.read()
    try:
        spec = CreateJob.configured(request.app[SETTINGS]).model_validate_json(body)
    except ValidationError as exc:
        if any(err["type"] == "json_invalid" for err in exc.errors()):
            raise MalformedRequest(f"The body is not valid JSON: {exc.errors()[0]['msg']}") from None
        raise invalid_fields(exc, "body") from None
    job = await request.app[JOBS].create(spec.num_images, spec.animal, spec.prompt)
    accepted = JobAccepted(job_id=job.job_id, status=job.status)
    return _json(accepted, request, 202, Location=f"{_base_url(request)}/generations/{job.job_id}")


@operation(
    "Read a job",
    tags=("generations",),
    path=JobPath,
    replies={200: Reply(Job, "The job as it is now.")},
    errors=(404, 422),
)
async def get_generation(request: web.Request) -> web.Response:
    """GET /generations/{jobId}: the job as it is now."""
    job = await request.app[JOBS].get(parse_job_id(request.match_info["jobId"]))
    return _json(job, request)


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
        params = ListQuery.model_validate(_single_query(request))
    except ValidationError as exc:
        raise invalid_fields(exc, "query") from None
    page = await request.app[JOBS].list(params.limit, params.cursor, params.status)
    return _json(page, request)


@operation(
    "Download a stored image",
    description="Images never change: cache them, and revalidate with If-None-Match.",
    tags=("images",),
    path=ImagePath,
    headers=ImageHeaders,
    replies={
        200: Reply(bytes, "The PNG.", "image/png", headers=("ETag", "Last-Modified", "Cache-Control")),
        304: Reply(None, "The copy whose ETag was sent is current.", headers=("ETag", "Cache-Control")),
    },
    errors=(404,),
)
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


def add_routes(app: web.Application) -> None:
    """Register every route; no implicit HEAD routes, so what is served is what is documented."""
    router = app.router
    router.add_post("/generations", create_generation)
    router.add_get("/generations", list_generations, allow_head=False)
    router.add_get("/generations/{jobId}", get_generation, allow_head=False)
    router.add_get(r"/images/{jobId}/{index:\d+}.png", get_image, allow_head=False)
