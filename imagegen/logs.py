"""Log lines: their two formats, the request id, one line per request and per job transition,
and the start-up and shutdown summaries.

stdlib logging is the API everywhere: a line's fields are the `extra` of its call, which the
text format appends as `key=value` and the JSON format writes as keys. The request id of the
request being served is in a context variable, which a filter on the handler adds to every
line made while serving it (in the handler and in anything it awaits).

Request lines come from aiohttp's access logger (`RequestLog`, run_app's `access_log_class`),
which is handed the request, the response and the time once the answer is finished (a stream
when it ends): no middleware, which would cost every request two coroutine layers.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from typing import IO, TYPE_CHECKING, Any, Literal
from urllib.parse import unquote

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

if TYPE_CHECKING:
    from .models import Job
    from .store import JobEvent

REQUEST_ID_HEADER = "X-Request-ID"
# What a client's X-Request-ID must be to be taken: 1-128 visible ASCII characters. Anything
# else (empty, too long, spaces, control characters) is replaced by a generated id.
_SANE_ID = re.compile(r"[\x21-\x7e]{1,128}")

# Query parameters whose values are secrets (?token= on streams, ?sig= on image URLs) or look
# like one; their values never reach a log line.
SECRET_PARAMS = frozenset({"token", "sig", "signature", "key", "api_key", "apikey", "access_token", "password", "secret"})

# A generated id: random per process, then a counter. Unique across nodes and restarts like a
# random id, without a system call per request (os.urandom showed in a profile of GETs).
_ID_PREFIX = os.urandom(12).hex()
_id_numbers = itertools.count(1)

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("imagegen_request_id", default=None)

# The logger aiohttp's access logger is given (server.py): request lines.
requests_log = logging.getLogger("imagegen.requests")
jobs_log = logging.getLogger("imagegen.jobs")
log = logging.getLogger("imagegen")


class RequestFacts:
    """What the log knows of one request: its id, and the tenant that made it."""

    __slots__ = ("id", "tenant")

    def __init__(self, request_id: str) -> None:
        self.id = request_id
        self.tenant: str | None = None


FACTS = web.RequestKey("log_facts", RequestFacts)


def facts_of(request: web.BaseRequest) -> RequestFacts:
    """The request's log facts, made on first use: its id is the client's X-Request-ID if sane.

    One object per request, shared by the clones a middleware makes (`request.clone` copies
    the state dict, not what is in it), so the access log, which is handed the original
    request, sees the id and tenant that the handler's clone was given.
    """
    facts = request.get(FACTS)
    if facts is None:
        given = request.headers.get(REQUEST_ID_HEADER)
        facts = request[FACTS] = RequestFacts(
            given if given is not None and _SANE_ID.fullmatch(given) else f"{_ID_PREFIX}{next(_id_numbers):08x}"
        )
    return facts


def serving(request: web.Request) -> contextvars.Token[str | None]:
    """Mark the lines logged from now on, in this task, as made while serving `request`;
    give the token back to `done_serving`."""
    return _request_id.set(facts_of(request).id)


def done_serving(token: contextvars.Token[str | None]) -> None:
    _request_id.reset(token)


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer carries its request's id, streams and errors too
    (a middleware's 401 included: the signal runs for any response that is prepared)."""
    response.headers[REQUEST_ID_HEADER] = facts_of(request).id


def redacted_query(query_string: str) -> str:
    """The raw query string with the value of every secret-carrying parameter replaced by ***."""
    if not query_string:
        return ""
    parts = []
    for part in query_string.split("&"):
        name, eq, _ = part.partition("=")
        if eq and unquote(name.replace("+", " ")).strip().lower() in SECRET_PARAMS:
            part = f"{name}{eq}***"
        parts.append(part)
    return "&".join(parts)


class RequestLog(AbstractAccessLogger):
    """One line per request: method, route template, path (its query redacted), status,
    duration, request id and tenant. aiohttp calls it once the answer is finished."""

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        try:
            route: str | None = request.match_info.route.resource.canonical  # type: ignore[attr-defined,union-attr]
        except (AttributeError, AssertionError):  # no route: a request aiohttp could not parse
            route = None
        path = request.rel_url.raw_path
        if query := redacted_query(request.rel_url.raw_query_string):
            path = f"{path}?{query}"
        facts = facts_of(request)
        self.logger.info(
            "request",
            extra={
                "method": request.method,
                "route": route,
                "path": path,
                "status": response.status,
                "duration_ms": round(time * 1000, 3),
                "request_id": facts.id,
                "tenant": facts.tenant,
            },
        )


# --- job transitions ------------------------------------------------------------------------

# Each event name's "from" where the name alone decides it; a cancel's depends on the job.
_FROM: dict[str, str | None] = {
    "job.created": None,
    "job.processing": "pending",
    "job.completed": "processing",
    "job.failed": "processing",
    "job.retrying": "processing",
    "job.requeued": "processing",
}


def job_transition(
    job_id: str, from_: str | None, to: str, attempt: int, error: str | None, tenant: str | None
) -> None:
    """One line per job transition, logged by the node that committed it."""
    jobs_log.info(
        "job", extra={"job_id": job_id, "from": from_, "to": to, "attempt": attempt, "error": error, "tenant": tenant}
    )


def event_transitions(events: Sequence[JobEvent], from_: str | None = None) -> None:
    """A line for each of these events this node committed; `from_` where the name does not say."""
    if not jobs_log.isEnabledFor(logging.INFO):
        return
    for event in events:
        if event.name == "job.progress":
            continue  # an image stored: no change of status
        before = _FROM.get(event.name, from_)
        if event.name == "job.created":  # the busiest path: the job's row need not be parsed
            job_transition(event.job_id, None, event.status, 0, None, event.owner)
            continue
        job = event.job
        if event.name == "job.deleted":
            before, to = job.status.value, "deleted"
        else:
            to = event.status
        error = job.error.code if job.error is not None and event.name in ("job.failed", "job.retrying") else None
        job_transition(event.job_id, before, to, job.attempts, error, event.owner)


def claimed(job: Job) -> None:
    """The line for a job a worker of this node claimed."""
    if jobs_log.isEnabledFor(logging.INFO):
        job_transition(job.job_id, "pending", "processing", job.attempts, None, job.owner)


# --- formats ----------------------------------------------------------------------------------

# A LogRecord's own attributes: everything else on a record is a field of the line.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
# A text value written bare; any other is written as a JSON string, so a value can never
# break a line in two or forge a field (a path with a space or a quote, a message with a newline).
_BARE = re.compile(r"[^\s\"'=\\]+")


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The line's fields: the record's extras that have a value, the request id last."""
    found = {
        key: value for key, value in record.__dict__.items()
        if key not in _RECORD_ATTRIBUTES and key != "request_id" and value is not None
    }
    if (request_id := getattr(record, "request_id", None)) is not None:
        found["request_id"] = request_id
    return found


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _text_value(value: Any) -> str:
    if type(value) in (int, float, bool):
        return str(value)
    text = value if type(value) is str else str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text)


class TextFormatter(logging.Formatter):
    """`2026-12-01T10:00:00.123Z INFO imagegen.requests: request method=GET ... request_id=...`."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {message}"
        if found := fields(record):
            line += " " + " ".join(f"{key}={_text_value(value)}" for key, value in found.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and each field as a key."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **fields(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class RequestIdFilter(logging.Filter):
    """Adds the id of the request being served, if any, to each line (on the handler, so it
    sees the lines of every logger, aiohttp's and the libraries' too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _request_id.get()
        return True


LogFormat = Literal["text", "json"]


def configure(log_format: LogFormat, stream: IO[str] | None = None) -> logging.Handler:
    """Send every logger's INFO and above to `stream` (stderr) in `log_format`.

    Written on the event loop's thread, a line at a time: a thread of its own to format and
    write them (QueueHandler) measured slower on a GET, since formatting holds the GIL and
    every system call of the loop then handed the GIL to that thread. The LogRecord
    attributes no line shows (the caller's source line, thread and process) are not gathered.
    """
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # the logging documentation's way to skip findCaller()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    return handler


# --- start-up and shutdown --------------------------------------------------------------------


def version() -> str:
    try:
        return metadata.version("imagegen")
    except metadata.PackageNotFoundError:
        return "unknown"


def startup_summary(app: web.Application, role: str, message: str) -> None:
    """The start-up line, once the node serves (or, as a worker, draws): what it runs."""
    from .config import SETTINGS  # here, not at the top: these modules log through this one
    from .dispatch import DISPATCHER

    settings = app[SETTINGS]
    storage = settings.storage
    if storage.backend == "postgres":
        from .store.postgres import redacted  # only here: SQLite deployments never import psycopg

        database = redacted(storage.database_url)
    else:
        database = str(settings.database_path)
    draws = role in ("all", "worker")
    recovered = getattr(app.get(DISPATCHER), "recovered", None)
    log.info(
        message,
        extra={
            "version": version(),
            "role": role,
            "backend": storage.backend,
            "database": database,
            "data_dir": str(storage.data_dir),
            "provider": settings.provider.name if draws else None,
            "workers": settings.workers.count if draws else 0,
            "auth": settings.auth.enabled,
            # SQLite: the jobs a crash left processing, handed back as the process started. On
            # PostgreSQL no node takes over jobs as it starts: the upkeep loop rescues expired
            # leases, with a line for each job.
            "recovered": len(recovered) if recovered is not None else None,
        },
    )


def shutdown_summary(app: web.Application) -> None:
    """The last line, once every resource has closed: what the workers handed back."""
    from .workers import WORKERS

    pool = app.get(WORKERS)
    handed_back = pool.handed_back if pool is not None else []
    log.info("stopped", extra={"handed_back": len(handed_back), "jobs": ",".join(e.job_id for e in handed_back) or None})
