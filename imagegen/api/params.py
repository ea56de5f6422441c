"""Request helpers that the handlers and the streams share: the base of absolute URLs, query
parsing, path parameters and list cursors."""

from __future__ import annotations

import re
from typing import Annotated

from aiohttp import web
from pydantic import BaseModel, Field

from ..models import JOB_ID_PATTERN
from .problems import InvalidRequest

_UUID = re.compile(JOB_ID_PATTERN)

# server.public_url, looked up once per request rather than through the settings models.
PUBLIC_URL = web.AppKey("public_url", str)


def base_url(request: web.Request) -> str:
    """The base of absolute URLs: server.public_url, else the request's own scheme and host."""
    return request.app[PUBLIC_URL] or f"{request.scheme}://{request.host}"


def query_names(model: type[BaseModel]) -> frozenset[str]:
    """The query parameter names a model declares (its aliases)."""
    return frozenset(field.alias or name for name, field in model.model_fields.items())


def single_query(request: web.Request, known: frozenset[str]) -> dict[str, str]:
    """The `known` query parameters, each given at most once (a repeated one is refused, not
    guessed at). Any other parameter is ignored, on every route alike: cache-busters such as
    `_=1700000000` are common, and a client adding one must not be refused."""
    query: dict[str, str] = {}
    for key, value in request.query.items():
        if key not in known:
            continue
        if key in query:
            raise InvalidRequest(
                f"query parameter {key} is given more than once",
                invalid_params=[{"name": key, "in": "query", "reason": "repeated"}],
            )
        query[key] = value
    return query


def parse_job_id(text: str) -> str:
    """The canonical (lowercase) form of a job id, or InvalidRequest if it is not a UUID."""
    if not _UUID.fullmatch(text):  # match() lets a trailing newline through ($ matches before it)
        raise InvalidRequest(
            f"jobId must be a UUID like 550e8400-e29b-41d4-a716-446655440000, not {text[:64]!r}",
            invalid_params=[{"name": "jobId", "in": "path", "reason": "not a UUID"}],
        )
    return text.lower()


# parse_job_id checks the same JOB_ID_PATTERN in the handlers, with a friendlier message.
JobId = Annotated[str, Field(alias="jobId", pattern=JOB_ID_PATTERN, description="The job's id, a UUID.")]


class JobPath(BaseModel):
    """Path parameters of /generations/{jobId}."""

    job_id: JobId


class ImagePath(BaseModel):
    """Path parameters of /images/{jobId}/{index}.png."""

    job_id: JobId
    index: int = Field(ge=0, description="Which of the job's images, from 0.")


# A cursor is the seq of the last job of a page, in decimal; the next page starts below it.
# Every string of this form is a place to start, so the pattern is the whole of its validation
# (and 18 digits stay below 2**63, the databases' integer limit).
CURSOR_PATTERN = r"^[0-9]{1,18}$"


def encode_cursor(seq: int) -> str:
    return str(seq)


def decode_cursor(cursor: str) -> int:
    """The seq a cursor points below; InvalidRequest for anything that is not a cursor."""
    if not re.fullmatch(CURSOR_PATTERN, cursor):
        raise InvalidRequest(
            "cursor is not one this service returned as nextCursor",
            invalid_params=[{"name": "cursor", "in": "query", "reason": "not a cursor"}],
        )
    return int(cursor)
