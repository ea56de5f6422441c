"""How every error becomes application/problem+json (RFC 9457): the HTTP layer's own errors,
one table that maps the domain's errors to statuses, a wrapper on each handler and a catch-all
route."""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import errors
from ..logs import done_serving, serving
from ..metrics import METRICS

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class InvalidParam(BaseModel):
    """One rejected part of a request."""

    name: str = Field(description="The field or parameter, e.g. numImages or limit.")
    in_: str = Field(alias="in", description="Where it was: body, query, path or header.")
    reason: str = Field(description="Why it was rejected.")


class Problem(BaseModel):
    """An error, as RFC 9457 problem details (application/problem+json)."""

    # RFC 9457 lets a problem carry extension members beyond these.
    model_config = ConfigDict(extra="allow")

    type: str = Field(description="Always about:blank: the status and title say what happened.")
    title: str = Field(description="The HTTP status phrase.")
    status: int = Field(description="The HTTP status code.")
    detail: str = Field(description="What went wrong with this request, in words.")
    invalid_params: list[InvalidParam] = Field(
        default_factory=list,
        alias="invalidParams",
        description="Present for invalid input: each rejected field or parameter.",
    )


class ApiError(Exception):
    """Something went wrong with the request (the HTTP layer's errors; the domain's are mapped)."""

    status = 500
    title = "Internal Server Error"
    headers: dict[str, str] = {}

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        # The docstring is the default detail, so each subclass is one line of meaning.
        self.detail = detail or (self.__doc__ or self.title).strip()
        self.extra = extra
        super().__init__(self.detail)


class InvalidRequest(ApiError):
    """The request is invalid."""

    status = 422
    title = "Unprocessable Content"


class MalformedRequest(ApiError):
    """The request body is not valid JSON."""

    status = 400
    title = "Bad Request"


class UnsupportedMediaType(ApiError):
    """The request body must be application/json."""

    status = 415
    title = "Unsupported Media Type"


class NotFound(ApiError):
    """Nothing is here."""

    status = 404
    title = "Not Found"


def _invalid_job(exc: errors.InvalidJob) -> ApiError:
    return InvalidRequest(exc.detail, invalid_params=[{"name": exc.field, "in": "body", "reason": exc.reason}])


def _key_reused(exc: errors.IdempotencyKeyReused) -> ApiError:
    reason = {"name": "Idempotency-Key", "in": "header", "reason": "reused with another body"}
    return InvalidRequest(exc.detail, invalid_params=[reason])


def _status(status: int, title: str) -> Callable[[errors.ImagegenError], ApiError]:
    def problem(exc: errors.ImagegenError) -> ApiError:
        error = ApiError(exc.detail)
        error.status, error.title = status, title
        if isinstance(exc, (errors.QueueFull, errors.StoreUnavailable)):
            error.headers = {"Retry-After": str(exc.retry_after_s)}
        return error

    return problem


# Each domain error, as the API answers it.
DOMAIN_ERRORS: dict[type[errors.ImagegenError], Callable[[Any], ApiError]] = {
    errors.InvalidJob: _invalid_job,
    errors.IdempotencyKeyReused: _key_reused,
    errors.JobNotFound: _status(404, "Not Found"),
    errors.JobConflict: _status(409, "Conflict"),
    errors.QueueFull: _status(429, "Too Many Requests"),
    errors.StorageFull: _status(503, "Service Unavailable"),
    errors.DatabaseUnavailable: _status(503, "Service Unavailable"),
}


def as_problem(exc: errors.ImagegenError) -> ApiError | None:
    """The API error a domain error is answered with; None for one the API does not expect."""
    mapping = DOMAIN_ERRORS.get(type(exc))
    return None if mapping is None else mapping(exc)


def invalid_fields(exc: ValidationError, where: str) -> InvalidRequest:
    """An InvalidRequest that lists each field pydantic rejected, located in `where` (body, query, path)."""
    errors = [
        {
            "name": ".".join(str(part) for part in err["loc"]) or where,
            "in": where,
            "reason": err["msg"],
        }
        for err in exc.errors(include_url=False, include_input=False)
    ]
    summary = "; ".join(f"{e['name']}: {e['reason']}" for e in errors)
    return InvalidRequest(f"Invalid {where}: {summary}", invalid_params=errors)


def problem_response(
    status: int, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    """An RFC 9457 problem details response."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    body.update({_camel(key): value for key, value in extra.items()})
    return web.Response(
        status=status, text=json.dumps(body), content_type=PROBLEM_JSON, headers=headers
    )


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def problem_errors(handler: Handler) -> Handler:
    """`handler`, with every error it raises answered as problem+json: ApiError as itself,
    aiohttp's HTTP errors (413, 404, ...) by their status, anything else as a logged 500.

    Applied to each handler where the routes are added, rather than as a middleware: with any
    middleware, aiohttp runs two more coroutine layers on every request (the middleware and its
    own current-app fix-up), measured at about 6% of a GET. For the same reason each request is
    counted here ([metrics]), and the lines logged while serving it get its id (logs.serving).
    """

    @functools.wraps(handler)
    async def handle(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        serving_token = serving(request)
        try:
            response = await handler(request)
        except ApiError as exc:
            response = problem_response(exc.status, exc.title, exc.detail, headers=exc.headers, **exc.extra)
        except errors.ImagegenError as exc:
            problem = as_problem(exc)
            if problem is None:
                log.exception("unexpected error on %s %r", request.method, request.path)
                response = problem_response(500, "Internal Server Error", "The server failed to handle this request.")
            else:
                response = problem_response(
                    problem.status, problem.title, problem.detail, headers=problem.headers, **problem.extra
                )
        except ConnectionResetError:
            # The client left before its request was read (or its answer sent): nothing to
            # answer, and nothing wrong with the service.
            log.warning("client disconnected during %s %r", request.method, request.path)
            # Re-raised, aiohttp would log it as an error with a traceback; this answer goes
            # nowhere (the connection is closed) and is never written.
            response = web.Response(status=400)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
            detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
            if exc.status == 405:
                detail = f"{request.method} is not allowed here; allowed: {headers.get('Allow', '')}"
            elif exc.status == 404:
                detail = f"No route for {request.path}"
            response = problem_response(exc.status, exc.reason, detail, headers=headers)
        except Exception:
            log.exception("unhandled error on %s %r", request.method, request.path)  # %r: no forged log lines
            response = problem_response(500, "Internal Server Error", "The server failed to handle this request.")
        finally:
            done_serving(serving_token)
        # Counted in this wrapper, not a middleware (see above): by the route's template (its
        # canonical path, "/{path}" for the fallback), so the labels stay few whatever is asked.
        metrics = request.app.get(METRICS)
        if metrics is not None:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else ""
            metrics.request(route, request.method, response.status, time.perf_counter() - started)
        return response

    return handle  # type: ignore[return-value]


async def _no_route(request: web.Request) -> web.StreamResponse:
    # Reached only when no route took the request: tell a wrong method (405, with the methods
    # the path has) from a wrong path (404), as aiohttp's router would.
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            _, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def add_fallback_route(router: web.UrlDispatcher) -> None:
    """The last route: a path or method nothing else serves gets 404 or 405 as problem+json
    (without it, aiohttp's router would answer those in plain text). Its method is "*"."""
    # [\s\S], not ".": a path whose decoded text holds a newline (/docs/assets/a%0Ab) must
    # reach this route too, not aiohttp's plain-text 404.
    router.add_route("*", r"/{path:[\s\S]*}", problem_errors(_no_route))
