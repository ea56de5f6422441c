"""POST /generations: the 202 contract, and every kind of bad input rejected with nothing written."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient

from .conftest import TestDatabase


async def test_create_answers_202_and_commits_before_answering(client: TestClient, database: TestDatabase) -> None:
    response = await client.post("/generations", json={"numImages": 3, "animal": "owl"})
    assert response.status == 202
    body = await response.json()
    assert set(body) == {"jobId", "status"}
    assert body["status"] == "pending"
    assert response.headers["Location"].endswith(f"/generations/{body['jobId']}")
    assert response.headers["Location"].startswith("http://127.0.0.1:")
    # The row is committed, as seen by a second connection, by the time the 202 arrives.
    (row,) = database.rows("SELECT * FROM jobs WHERE id = ?", (body["jobId"],))
    assert (row["num_images"], row["animal"]) == (3, "owl")
    (event,) = database.rows("SELECT name FROM events WHERE job_id = ? AND name = 'job.created'", (body["jobId"],))
    assert event["name"] == "job.created"


async def test_prompt_is_kept_with_the_job(client: TestClient) -> None:
    response = await client.post("/generations", json={"numImages": 1, "prompt": "wearing a tiny hat"})
    job_id = (await response.json())["jobId"]
    job = await (await client.get(f"/generations/{job_id}")).json()
    assert job["prompt"] == "wearing a tiny hat"


async def test_animal_defaults_to_a_configured_one(make_client) -> None:
    client = await make_client(jobs={"animals": ["frog"]})
    response = await client.post("/generations", json={"numImages": 1})
    job_id = (await response.json())["jobId"]
    job = await (await client.get(f"/generations/{job_id}")).json()
    assert job["animal"] == "frog"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ('{"numImages": 0}', 422, "numImages"),
        ('{"numImages": 11}', 422, "numImages"),
        ('{"numImages": -1}', 422, "numImages"),
        ('{"numImages": true}', 422, "numImages"),
        ('{"numImages": "3"}', 422, "numImages"),
        ('{"numImages": 2.0}', 422, "numImages"),
        ('{"numImages": null}', 422, "numImages"),
        ("{}", 422, "numImages"),
        ('{"numImages": 2, "color": "red"}', 422, "color"),
        ('{"num_images": 2}', 422, "numImages"),
        ('{"numImages": 2, "animal": "unicorn"}', 422, "animal"),
        ('{"numImages": 2, "animal": 7}', 422, "animal"),
        ("[1]", 422, None),
        ('"hello"', 422, None),
        ("{not json", 400, None),
        ("", 400, None),
        ('{"numImages": 99999999999999999999999}', 422, "numImages"),
        ('{"numImages": 1, "prompt": ""}', 422, "prompt"),
        ('{"numImages": 1, "prompt": 5}', 422, "prompt"),
        ('{"numImages": 1, "prompt": "' + "x" * 501 + '"}', 422, "prompt"),
        ('{"numImages": 1, "prompt": "an owl\\u0000"}', 422, "prompt"),  # PostgreSQL's text holds no NUL
    ],
)
async def test_bad_bodies_get_a_problem_and_write_nothing(
    client: TestClient, database: TestDatabase, body: str, status: int, field: str | None
) -> None:
    response = await client.post("/generations", data=body, headers={"Content-Type": "application/json"})
    assert response.status == status
    assert response.content_type == "application/problem+json"
    problem = await response.json()
    assert problem["status"] == status
    assert problem["title"] and problem["detail"] and problem["type"] == "about:blank"
    if field is not None:
        assert field in [param["name"] for param in problem["invalidParams"]]
        assert field in problem["detail"]
    assert database.rows("SELECT count(*) AS n FROM jobs")[0]["n"] == 0


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_wrong_content_type_is_415(client: TestClient, database: TestDatabase, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = await client.post("/generations", data=b'{"numImages": 1}', headers=headers)
    assert response.status == 415
    assert response.content_type == "application/problem+json"
    assert "application/json" in (await response.json())["detail"]
    assert database.rows("SELECT count(*) AS n FROM jobs")[0]["n"] == 0


async def test_body_over_the_size_limit_is_413(client: TestClient, database: TestDatabase) -> None:
    body = b'{"numImages": 1, "animal": "' + b"x" * 100_000 + b'"}'
    response = await client.post("/generations", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 413
    assert response.content_type == "application/problem+json"
    assert database.rows("SELECT count(*) AS n FROM jobs")[0]["n"] == 0


async def test_wrong_method_is_405_with_allow(client: TestClient) -> None:
    response = await client.put("/generations", json={"numImages": 1})
    assert response.status == 405
    assert response.content_type == "application/problem+json"
    assert "POST" in response.headers["Allow"]
    assert "PUT" in (await response.json())["detail"]


async def test_unknown_route_is_404_problem(client: TestClient) -> None:
    response = await client.get("/nothing-here")
    assert response.status == 404
    assert response.content_type == "application/problem+json"


async def test_job_ids_are_version_7_uuids_that_grow_with_time(client: TestClient) -> None:
    import uuid

    ids = [(await (await client.post("/generations", json={"numImages": 1})).json())["jobId"] for _ in range(3)]
    assert all(uuid.UUID(job_id).version == 7 and uuid.UUID(job_id).variant == uuid.RFC_4122 for job_id in ids)
    # The first 48 bits are milliseconds: later ids never sort before earlier ones' milliseconds.
    assert [job_id[:13] for job_id in ids] == sorted(job_id[:13] for job_id in ids)
