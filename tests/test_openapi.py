"""GET /openapi.json: a valid OpenAPI 3.0 document of every route, built from the pydantic models."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate
from pydantic import BaseModel, Field

from imagegen.api.openapi import Reply, openapi_schema, operation


@pytest.fixture
def backend() -> str:
    """The OpenAPI document does not depend on the job store: one backend is enough."""
    return "sqlite"


def _get_twin(route: web.AbstractRoute) -> bool:
    """A HEAD route that answers with its GET route's handler (RFC 9110's HEAD: GET, no body)."""
    return route.method == "HEAD" and any(
        other.method == "GET" and other.handler is route.handler for other in route.resource
    )


def undocumented_routes(app: web.Application, document: dict[str, Any]) -> list[str]:
    """Every route of `app` that the document lacks (a HEAD route too, unless it is its GET's
    implicit twin), and every documented operation that is no route: empty when the document
    describes exactly what is served."""
    # The "*" route is errors.add_fallback_route's: it answers 404 and 405, and serves nothing.
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource and route.method != "*" and not _get_twin(route)
    }
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    return sorted(f"{method.upper()} {path}" for method, path in served ^ documented)


async def test_document_is_valid_openapi_30(client: TestClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    document = await response.json()
    assert document["openapi"].startswith("3.0.")
    validate(document)


async def test_every_route_is_documented_and_nothing_else(client: TestClient) -> None:
    document = await (await client.get("/openapi.json")).json()
    assert undocumented_routes(client.app, document) == []
    # Every GET route has its HEAD twin, and the document lists no HEAD operation for them.
    routes = [route for route in client.app.router.routes() if route.resource]
    gets = {route.resource.canonical for route in routes if route.method == "GET"}
    heads = {route.resource.canonical for route in routes if _get_twin(route)}
    assert gets == heads and len(gets) >= 9
    assert not any("head" in item for item in document["paths"].values())
    assert {"/generations", "/generations/{jobId}", "/images/{jobId}/{index}.png"} <= set(document["paths"])


async def test_servers_is_public_url_with_its_path_prefix(
    client: TestClient, make_client: Any, tmp_path: Any
) -> None:
    # Without public_url it is left out: the operations are where the document came from.
    assert "servers" not in await (await client.get("/openapi.json")).json()
    server = {"public_url": "https://example.com/imagegen/"}
    behind = await make_client(data_dir=tmp_path / "behind", server=server)
    document = await (await behind.get("/openapi.json")).json()
    assert document["servers"] == [{"url": "https://example.com/imagegen"}]
    validate(document)


async def test_cors_adds_routes_but_no_operations(make_client: Any) -> None:
    client = await make_client(server={"cors_origins": ["https://app.example.com"]})
    document = await (await client.get("/openapi.json")).json()
    validate(document)
    # aiohttp-cors's preflight routes (OPTIONS on each path) are the only routes left out.
    missing = undocumented_routes(client.app, document)
    assert missing and all(line.startswith("OPTIONS ") for line in missing)
    assert not any("options" in item for item in document["paths"].values())


async def test_statuses_and_headers_are_documented(client: TestClient) -> None:
    paths = (await (await client.get("/openapi.json")).json())["paths"]
    create = paths["/generations"]["post"]["responses"]
    assert set(create) == {"201", "202", "400", "408", "413", "415", "422", "429", "500", "503"}
    assert create["202"]["headers"]["Location"] == {"$ref": "#/components/headers/Location"}
    assert create["201"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Job"}
    assert set(create["429"]["headers"]) == {"Retry-After"}
    headers = {p["name"] for p in paths["/generations"]["post"]["parameters"] if p["in"] == "header"}
    assert headers == {"Idempotency-Key", "Prefer"}
    assert set(paths["/generations/{jobId}/cancel"]["post"]["responses"]) == {"200", "404", "409", "422", "500", "503"}
    assert set(paths["/generations/{jobId}"]["delete"]["responses"]) == {"204", "404", "409", "422", "500", "503"}
    for stream in ("/generations/events", "/generations/{jobId}/events"):
        operation = paths[stream]["get"]
        assert list(operation["responses"]["200"]["content"]) == ["text/event-stream"]
        assert {p["name"] for p in operation["parameters"] if p["in"] != "path"} == {"lastEventId", "Last-Event-ID", "token"}
    assert create["422"]["content"]["application/problem+json"]["schema"] == {"$ref": "#/components/schemas/Problem"}
    image = paths["/images/{jobId}/{index}.png"]["get"]
    assert set(image["responses"]) == {"200", "304", "404", "500"}
    assert set(image["responses"]["200"]["headers"]) == {"ETag", "Last-Modified", "Cache-Control"}
    assert list(image["responses"]["200"]["content"]) == ["image/png"]
    assert [p["name"] for p in image["parameters"] if p["in"] == "header"] == ["If-None-Match"]


async def test_parameters_come_from_the_models(client: TestClient) -> None:
    paths = (await (await client.get("/openapi.json")).json())["paths"]
    query = {p["name"]: p for p in paths["/generations"]["get"]["parameters"]}
    assert set(query) == {"limit", "cursor", "status"}
    assert query["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}
    assert query["status"]["schema"] == {"$ref": "#/components/schemas/JobStatus"}
    assert not any(p["required"] for p in query.values())
    (job_id,) = paths["/generations/{jobId}"]["get"]["parameters"]
    assert job_id["in"] == "path" and job_id["required"] and "pattern" in job_id["schema"]


async def test_the_body_schema_follows_the_configuration(make_client) -> None:
    client = await make_client(jobs={"max_images_per_job": 3, "animals": ["cat", "owl"]})
    schemas = (await (await client.get("/openapi.json")).json())["components"]["schemas"]
    body = schemas["CreateJob"]
    assert body["properties"]["numImages"]["maximum"] == 3
    assert body["properties"]["animal"]["enum"] == ["cat", "owl", None]
    assert body["additionalProperties"] is False and body["required"] == ["numImages"]
    # What the schema allows, the handler accepts; one past it, the handler refuses.
    assert (await client.post("/generations", json={"numImages": 3, "animal": "owl"})).status == 202
    assert (await client.post("/generations", json={"numImages": 4, "animal": "owl"})).status == 422


async def test_response_models_are_described_as_serialised(client: TestClient) -> None:
    schemas = (await (await client.get("/openapi.json")).json())["components"]["schemas"]
    job = schemas["Job"]
    assert "imageUrls" in job["properties"] and "images" not in job["properties"]
    assert job["properties"]["attempts"]["type"] == "integer"
    assert job["properties"]["queuePosition"]["nullable"] is True
    assert job["properties"]["createdAt"] == {"type": "string", "format": "date-time"}
    assert job["properties"]["error"] == {"allOf": [{"$ref": "#/components/schemas/JobError"}], "nullable": True}
    assert set(job["required"]) >= {"jobId", "status", "progress", "error"}
    assert schemas["Problem"]["required"] == ["type", "title", "status", "detail"]


class _Sample(BaseModel):
    title: str | None = Field(default=None, title="Ignored", description="a property named title")
    kind: str = Field(default="x", json_schema_extra={"const": "x"})
    ratio: float = Field(gt=0, default=1.0)
    tags: list[str] | int | None = None


def test_pydantic_schema_is_adapted_to_openapi_30() -> None:
    schema = openapi_schema(_Sample.model_json_schema())
    props = schema["properties"]
    assert "title" not in schema and set(props) == {"title", "kind", "ratio", "tags"}
    assert props["title"] == {"type": "string", "nullable": True, "default": None, "description": "a property named title"}
    assert props["kind"]["enum"] == ["x"] and "const" not in props["kind"]
    assert (props["ratio"]["minimum"], props["ratio"]["exclusiveMinimum"]) == (0, True)
    assert props["tags"]["nullable"] is True
    assert props["tags"]["anyOf"] == [{"type": "array", "items": {"type": "string"}}, {"type": "integer"}]


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"anyOf": [{"$ref": "#/x"}, {"type": "null"}]}, {"allOf": [{"$ref": "#/x"}], "nullable": True}),
        ({"$ref": "#/x", "readOnly": True}, {"allOf": [{"$ref": "#/x"}], "readOnly": True}),
        ({"anyOf": [{"enum": ["a"], "type": "string"}, {"type": "null"}]}, {"enum": ["a", None], "type": "string", "nullable": True}),
        ({"type": "integer", "exclusiveMaximum": 5}, {"type": "integer", "maximum": 5, "exclusiveMaximum": True}),
        ({"type": "string", "examples": ["a", "b"]}, {"type": "string", "example": "a"}),
        ({"default": {"title": "kept: data is not schema"}}, {"default": {"title": "kept: data is not schema"}}),
    ],
)
def test_adaptation_cases(schema: dict[str, Any], expected: dict[str, Any]) -> None:
    assert openapi_schema(schema) == expected


@pytest.mark.parametrize(
    "declaration",
    [{"errors": (418,)}, {"replies": {200: Reply(str, "x", headers=("X-Unknown",))}}],
)
def test_an_undocumented_status_or_header_is_refused_at_import(declaration: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="ERRORS or HEADERS"):
        operation("A typo", **{"replies": {}, **declaration})
