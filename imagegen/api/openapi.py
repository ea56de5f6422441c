"""The OpenAPI 3.0 document, built from the pydantic models that validate and serialise the API.

Each handler declares what it takes and what it answers beside its code:

    @operation(
        "Create a generation job",
        tags=("generations",),
        body=CreateJob.configured,                      # the JSON body's model (or settings -> model)
        headers=CreateHeaders,                          # a model: one request header per field
        replies={202: Reply(JobAccepted, "Queued.", headers=("Location",))},
        errors=(400, 413, 415, 422, 429),               # keys of ERRORS, answered as Problem
    )
    async def create_generation(request): ...

`path=` and `query=` take models the same way. A response header is one line in HEADERS, a
new error status one line in ERRORS; a stream is `Reply(Event, "...", "text/event-stream")`. At start-up apispec assembles the
document from the app's routes; every schema in it is pydantic's JSON Schema of a model or
type, adapted to OpenAPI 3.0 in `openapi_schema` alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from apispec import APISpec
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from ..config import SETTINGS, Settings
from .access import access_of
from .problems import PROBLEM_JSON, Problem

JSON = "application/json"
_REF_TEMPLATE = "#/components/schemas/{model}"
_ATTRIBUTE = "__openapi_operation__"

Handler = TypeVar("Handler", bound=Callable[..., Any])
# A model, or a function from the settings to one when its limits come from config.toml.
ModelSource = type[BaseModel] | Callable[[Settings], type[BaseModel]]


@dataclass(frozen=True)
class Header:
    """A response header: what it means, and the type pydantic describes its value with."""

    description: str
    type: Any = str
    required: bool = True  # False: sent only in some answers of a reply that names it


# Response headers, each documented once here and named by the replies that always send it.
HEADERS: dict[str, Header] = {
    "Location": Header("The absolute URL of the job."),
    "ETag": Header("The image's entity tag; send it back as If-None-Match to revalidate."),
    "Last-Modified": Header("When the image was stored (HTTP date)."),
    "Cache-Control": Header("An image never changes, so it may be cached for a year."),
    "Retry-After": Header("Seconds to wait before trying again.", int),
    "Idempotent-Replayed": Header(
        "true: an earlier request with this Idempotency-Key created this job.", required=False
    ),
    "Preference-Applied": Header(
        "wait=N: the request waited up to N seconds for the job (RFC 7240).", required=False
    ),
    "WWW-Authenticate": Header('Bearer realm="imagegen" (RFC 6750), with error="invalid_token" for a bad one.'),
}


@dataclass(frozen=True)
class Reply:
    """One documented response: its body (a model or any type pydantic describes; None for no
    body), what it means, its media types and the names of the HEADERS it carries."""

    body: Any
    description: str
    media_type: str | tuple[str, ...] = JSON
    headers: tuple[str, ...] = ()


# The errors an operation may name; each body is a Problem. 500 goes on every operation.
ERRORS: dict[int, Reply] = {
    400: Reply(Problem, "The body is not valid JSON.", PROBLEM_JSON),
    401: Reply(
        Problem, "No valid API key (Authorization: Bearer <key>), or token where one is accepted.", PROBLEM_JSON,
        headers=("WWW-Authenticate",),
    ),
    404: Reply(Problem, "Nothing is at this path (no such job or image).", PROBLEM_JSON),
    408: Reply(Problem, "The body did not arrive within server.body_timeout_s; the connection is closed.", PROBLEM_JSON),
    413: Reply(Problem, "The body is larger than the server accepts.", PROBLEM_JSON),
    415: Reply(Problem, "The body is not application/json.", PROBLEM_JSON),
    409: Reply(Problem, "The job's status does not allow this (e.g. it already ended).", PROBLEM_JSON),
    422: Reply(Problem, "Invalid input; invalidParams names each rejected part.", PROBLEM_JSON),
    429: Reply(
        Problem, "Too many jobs are waiting; nothing was written.", PROBLEM_JSON, headers=("Retry-After",)
    ),
    500: Reply(Problem, "The server failed; the details are in its log, not here.", PROBLEM_JSON),
    503: Reply(
        Problem, "The disk is full: nothing was written; try again later.", PROBLEM_JSON, headers=("Retry-After",)
    ),
}


@dataclass(frozen=True)
class Operation:
    """What one handler documents; see `operation`."""

    summary: str
    description: str | None
    tags: tuple[str, ...]
    body: ModelSource | None
    path: type[BaseModel] | None
    query: type[BaseModel] | None
    headers: type[BaseModel] | None
    replies: Mapping[int, Reply]
    errors: tuple[int, ...]


def operation(
    summary: str,
    *,
    replies: Mapping[int, Reply],
    errors: tuple[int, ...] = (),
    body: ModelSource | None = None,
    path: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    headers: type[BaseModel] | None = None,
    tags: tuple[str, ...] = (),
    description: str | None = None,
) -> Callable[[Handler], Handler]:
    """Document the decorated handler: its JSON `body` model, the models whose fields are its
    `path`, `query` and `headers` parameters, its `replies` by status, and the ERRORS it may
    answer with. The handler itself is unchanged; it validates with the same models."""
    # Caught at import, so a typo names itself instead of failing the document at start-up.
    unknown = [status for status in errors if status not in ERRORS]
    unknown += [name for reply in replies.values() for name in reply.headers if name not in HEADERS]
    if unknown:
        raise ValueError(f"{summary!r}: add {unknown} to ERRORS or HEADERS in imagegen/openapi.py")
    documented = Operation(summary, description, tags, body, path, query, headers, replies, errors)

    def mark(handler: Handler) -> Handler:
        setattr(handler, _ATTRIBUTE, documented)
        return handler

    return mark


def documented_operation(handler: Any) -> Operation | None:
    """The Operation a handler was decorated with, if any."""
    return getattr(handler, _ATTRIBUTE, None)


# --- pydantic JSON Schema -> OpenAPI 3.0 -------------------------------------------------------

_SUBSCHEMA = ("items", "additionalProperties", "not")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs")
_NULL = {"type": "null"}


def openapi_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Pydantic's JSON Schema (draft 2020-12) as an OpenAPI 3.0 Schema Object: null in anyOf
    becomes nullable, const becomes a one-value enum, numeric exclusive bounds become boolean
    flags, $ref takes no siblings, and titles (pydantic's echo of each name) go."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "title":
            continue
        if key in _SUBSCHEMA and isinstance(value, dict):
            out[key] = openapi_schema(value)
        elif key in _SUBSCHEMA_LISTS:
            out[key] = [openapi_schema(item) for item in value]
        elif key in _SUBSCHEMA_MAPS:
            out[key] = {name: openapi_schema(item) for name, item in value.items()}
        elif key == "const":
            out["enum"] = [value]
        elif key == "examples":
            out["example"] = value[0]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        else:
            out[key] = value  # data (default, enum, example) or a plain keyword: as it is
    if _NULL in out.get("anyOf", []):
        others = [branch for branch in out.pop("anyOf") if branch != _NULL]
        if len(others) == 1:
            out = {**others[0], **out}
        else:
            out["anyOf"] = others
        out["nullable"] = True
        if "enum" in out:
            out["enum"] = [*out["enum"], None]  # an enum lists every allowed value, null too
    if "$ref" in out and len(out) > 1:
        # OpenAPI 3.0 ignores a $ref's siblings; allOf keeps them (nullable, description, ...).
        out = {"allOf": [{"$ref": out.pop("$ref")}], **out}
    return out


def _parameter_schema(schema: dict[str, Any]) -> dict[str, Any]:
    # An absent parameter is the None of an optional field: there is no null to send.
    schema = {
        key: value
        for key, value in schema.items()
        if key not in ("nullable", "description") and not (key == "default" and value is None)
    }
    if list(schema) == ["allOf"] and len(schema["allOf"]) == 1:
        return schema["allOf"][0]
    return schema


# --- assembling the document -------------------------------------------------------------------


class _Schemas:
    """Every model the documented operations use, described by pydantic in one pass so that
    shared models (JobStatus, Problem) become one named component each."""

    def __init__(
        self, wanted: list[tuple[type[BaseModel], JsonSchemaMode]], parameter_models: set[type[BaseModel]]
    ) -> None:
        refs, top = models_json_schema(list(dict.fromkeys(wanted)), by_alias=True, ref_template=_REF_TEMPLATE)
        self._refs = {key: openapi_schema(value) for key, value in refs.items()}
        self._defs = {name: openapi_schema(value) for name, value in top.get("$defs", {}).items()}
        # A parameter model is spread into parameters, never referenced as a component.
        self._parameter_names = {self._name(model) for model in parameter_models}

    def _name(self, model: type[BaseModel]) -> str:
        return self._refs[(model, "validation")]["$ref"].rsplit("/", 1)[1]

    def ref(self, model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return self._refs[(model, mode)]

    def expand(self, model: type[BaseModel]) -> dict[str, Any]:
        """The object schema of a parameter model: one property per parameter."""
        return self._defs[self._name(model)]

    @property
    def components(self) -> dict[str, dict[str, Any]]:
        return {name: schema for name, schema in self._defs.items() if name not in self._parameter_names}


def _body_schema(body: Any, schemas: _Schemas) -> dict[str, Any]:
    if isinstance(body, type) and issubclass(body, BaseModel):
        return schemas.ref(body, "serialization")
    return openapi_schema(TypeAdapter(body).json_schema(mode="serialization"))


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _replies(operation: Operation) -> dict[int, Reply]:
    return {**operation.replies, **{status: ERRORS[status] for status in (*operation.errors, 500)}}


def _models(operation: Operation, settings: Settings) -> Iterator[tuple[type[BaseModel], JsonSchemaMode]]:
    body = _body_model(operation, settings)
    if body is not None:
        yield body, "validation"
    for model in (operation.path, operation.query, operation.headers):
        if model is not None:
            yield model, "validation"
    for reply in _replies(operation).values():
        if isinstance(reply.body, type) and issubclass(reply.body, BaseModel):
            yield reply.body, "serialization"


def _body_model(operation: Operation, settings: Settings) -> type[BaseModel] | None:
    body = operation.body
    if body is None or (isinstance(body, type) and issubclass(body, BaseModel)):
        return body
    return body(settings)


def _parameters(operation: Operation, schemas: _Schemas) -> list[dict[str, Any]]:
    parameters = []
    for where, model in (("path", operation.path), ("query", operation.query), ("header", operation.headers)):
        if model is None:
            continue
        schema = schemas.expand(model)
        for name, prop in schema["properties"].items():
            parameter = {
                "name": name,
                "in": where,
                "required": where == "path" or name in schema.get("required", ()),
                "schema": _parameter_schema(prop),
            }
            if "description" in prop:
                parameter["description"] = prop["description"]
            parameters.append(parameter)
    return parameters


def _response(reply: Reply, schemas: _Schemas) -> dict[str, Any]:
    response: dict[str, Any] = {"description": reply.description}
    if reply.body is not None:
        media_types = (reply.media_type,) if isinstance(reply.media_type, str) else reply.media_type
        schema = _body_schema(reply.body, schemas)
        response["content"] = {media_type: {"schema": schema} for media_type in media_types}
    if reply.headers:
        response["headers"] = {name: name for name in reply.headers}  # apispec makes these $refs
    return response


def _operation(handler: Any, operation: Operation, schemas: _Schemas, settings: Settings) -> dict[str, Any]:
    result: dict[str, Any] = {"tags": list(operation.tags)} if operation.tags else {}
    result["summary"] = operation.summary
    if operation.description:
        result["description"] = operation.description
    result["operationId"] = _camel(handler.__name__)
    parameters = _parameters(operation, schemas)
    if parameters:
        result["parameters"] = parameters
    body = _body_model(operation, settings)
    if body is not None:
        schema = schemas.ref(body, "validation")
        result["requestBody"] = {"required": True, "content": {JSON: {"schema": schema}}}
    replies = _replies(operation)
    security = SECURITY.get(access_of(handler)) if settings.auth.enabled else None
    if security is not None:
        result["security"] = security
        replies[401] = ERRORS[401]
    result["responses"] = {str(status): _response(reply, schemas) for status, reply in sorted(replies.items())}
    return result


# With auth on: how each kind of route (api/access.py) is authorised, as OpenAPI security
# requirements (alternatives); public routes have none.
SECURITY_SCHEMES = {
    "apiKey": {"type": "http", "scheme": "bearer", "description": "An API key of [auth] keys."},
    "streamToken": {"type": "apiKey", "in": "query", "name": "token",
                    "description": "A token from POST /tokens (the event streams only)."},
}
SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "key": [{"apiKey": []}],
    "stream": [{"apiKey": []}, {"streamToken": []}],
    # Or none: a signed image URL carries its own ?exp=&sig=.
    "image": [{"apiKey": []}, {}],
}


def _implicit_head(route: web.AbstractRoute) -> bool:
    """A HEAD route that add_get made beside a GET of the same handler: HEAD is GET without the
    body (RFC 9110), implied by the GET operation, so it is no operation of its own here."""
    if route.method != "HEAD" or route.resource is None:
        return False
    return any(other.method == "GET" and other.handler is route.handler for other in route.resource)


def build_document(app: web.Application, *, title: str, version: str, description: str) -> dict[str, Any]:
    """The OpenAPI 3.0 document of every route of `app` whose handler was decorated with `operation`."""
    settings = app[SETTINGS]
    routes = [
        (route, found)
        for route in app.router.routes()
        if not _implicit_head(route) and (found := documented_operation(route.handler))
    ]
    parameter_models = {
        model for _, found in routes for model in (found.path, found.query, found.headers) if model is not None
    }
    schemas = _Schemas([model for _, found in routes for model in _models(found, settings)], parameter_models)
    # Where the operations are: server.public_url when set (with the path prefix a proxy serves
    # them under); otherwise left out, which means the host the document came from.
    where = {"servers": [{"url": settings.server.public_url}]} if settings.server.public_url else {}
    info = {"description": description}
    spec = APISpec(title=title, version=version, openapi_version="3.0.3", info=info, **where)
    for name, header in HEADERS.items():
        schema = openapi_schema(TypeAdapter(header.type).json_schema(mode="serialization"))
        component = {"description": header.description, "required": header.required, "schema": schema}
        spec.components.header(name, component, lazy=True)  # in the document only if a reply names it
    for name, schema in schemas.components.items():
        spec.components.schema(name, schema)
    if settings.auth.enabled:
        for name, scheme in SECURITY_SCHEMES.items():
            spec.components.security_scheme(name, scheme)
    for route, found in routes:
        if route.resource is not None:
            method = _operation(route.handler, found, schemas, settings)
            spec.path(path=route.resource.canonical, operations={route.method.lower(): method})
    return spec.to_dict()
