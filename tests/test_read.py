"""GET /generations/{jobId} and GET /generations: shapes, errors, cursor pagination."""

from __future__ import annotations

import re
import uuid

import pytest
from aiohttp.test_utils import TestClient

from imagegen.jobs import JOBS

from .conftest import TestDatabase, create_job, wait_for_status

ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


async def test_completed_job_has_the_full_shape(client: TestClient) -> None:
    job_id = await create_job(client, numImages=3, animal="cat")
    job = await wait_for_status(client, job_id, {"completed"})
    assert set(job) == {
        "jobId", "status", "numImages", "animal", "prompt", "imageUrls", "createdAt", "updatedAt",
        "startedAt", "completedAt", "error", "progress", "attempts", "queuePosition",
    }
    assert job["attempts"] == 1 and job["queuePosition"] is None
    assert job["numImages"] == 3 and job["animal"] == "cat" and job["error"] is None and job["prompt"] is None
    assert job["progress"] == {"done": 3, "total": 3}
    base = str(client.make_url("")).rstrip("/")
    assert job["imageUrls"] == [f"{base}/images/{job_id}/{i}.png" for i in range(3)]
    for key in ("createdAt", "updatedAt", "startedAt", "completedAt"):
        assert ISO_MS_Z.match(job[key]), (key, job[key])
    assert job["createdAt"] <= job["startedAt"] <= job["completedAt"] == job["updatedAt"]


async def test_public_url_is_the_base_of_image_urls(make_client) -> None:
    client = await make_client(server={"public_url": "https://img.example.com/"})
    job_id = await create_job(client, numImages=1)
    job = await wait_for_status(client, job_id, {"completed"})
    assert job["imageUrls"] == [f"https://img.example.com/images/{job_id}/0.png"]


async def test_unknown_job_is_404_problem(client: TestClient) -> None:
    response = await client.get(f"/generations/{uuid.uuid4()}")
    assert response.status == 404
    assert response.content_type == "application/problem+json"
    assert "No job" in (await response.json())["detail"]


@pytest.mark.parametrize("job_id", ["nope", "123", "550e8400e29b41d4a716446655440000"])
async def test_malformed_job_id_is_422(client: TestClient, job_id: str) -> None:
    response = await client.get(f"/generations/{job_id}")
    assert response.status == 422
    problem = await response.json()
    assert problem["invalidParams"][0]["name"] == "jobId"


async def test_uppercase_id_finds_the_job(client: TestClient) -> None:
    job_id = await create_job(client)
    response = await client.get(f"/generations/{job_id.upper()}")
    assert response.status == 200
    assert (await response.json())["jobId"] == job_id


async def test_list_is_newest_first_and_filters_by_status(make_client, monkeypatch) -> None:
    from imagegen.providers import local

    # The provider forgets an animal after the settings accepted it, so the owls' jobs fail.
    monkeypatch.setattr(local, "ANIMALS", tuple(animal for animal in local.ANIMALS if animal != "owl"))
    client = await make_client(jobs={"animals": ["cat", "owl"]})
    ids = [await create_job(client, animal="cat" if i % 2 else "owl") for i in range(6)]
    for job_id in ids:
        await wait_for_status(client, job_id, {"completed", "failed"})
    body = await (await client.get("/generations")).json()
    assert [job["jobId"] for job in body["jobs"]] == ids[::-1]
    assert body["nextCursor"] is None
    failed = await (await client.get("/generations", params={"status": "failed"})).json()
    assert [job["jobId"] for job in failed["jobs"]] == ids[0::2][::-1]
    assert all(job["error"]["code"] == "unknown_animal" for job in failed["jobs"])


async def test_cursor_walk_returns_each_job_exactly_once_under_inserts(client: TestClient) -> None:
    created = [await create_job(client) for _ in range(7)]
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        page = await (await client.get("/generations", params=params)).json()
        assert len(page["jobs"]) <= 3
        seen += [job["jobId"] for job in page["jobs"]]
        # New jobs arriving mid-walk land before the walk's start and never shift it.
        created_during = await create_job(client)
        assert created_during not in seen
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert seen == created[::-1]


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=201", "limit=abc", "limit=1.0", "limit=-1", "limit=", "limit=%EF%BC%93",
     "status=done", "cursor=bogus", "cursor=", "cursor=djE6MTIz", "cursor=1234567890123456789",
     "limit=1&limit=2"],
)
async def test_bad_list_queries_are_422(client: TestClient, query: str) -> None:
    response = await client.get(f"/generations?{query}")
    assert response.status == 422, query
    assert response.content_type == "application/problem+json"
    assert (await response.json())["invalidParams"]


async def test_list_limit_defaults_to_50(client: TestClient) -> None:
    for _ in range(52):
        await create_job(client)
    body = await (await client.get("/generations")).json()
    assert len(body["jobs"]) == 50 and body["nextCursor"]


async def test_job_id_with_a_trailing_newline_is_422(client: TestClient) -> None:
    job_id = await create_job(client)
    response = await client.get(f"/generations/{job_id}%0A")
    assert response.status == 422


async def test_a_host_header_per_request_does_not_grow_memory(client: TestClient, database: TestDatabase) -> None:
    from imagegen.api.render import RENDERINGS_KEPT

    job_id = await create_job(client)
    await wait_for_status(client, job_id, {"completed"})
    for n in range(20):
        response = await client.get(f"/generations/{job_id}", headers={"Host": f"host-{n}.example"})
        assert (await response.json())["imageUrls"][0].startswith(f"http://host-{n}.example/")
    latest = client.app[JOBS].latest(job_id)  # the job's last committed event, kept for polling
    if database.backend == "sqlite":
        assert latest is not None and latest.renderings is not None
        assert len(latest.renderings) <= RENDERINGS_KEPT
    else:
        # Across nodes the feed trails other nodes' commits, so polls read the database and
        # no job is kept in memory at all: there is nothing for new Host headers to grow.
        assert latest is None
