"""The cross-tenant probe: with two keys, each holding jobs in every status, every route and
method of the OpenAPI document, given the other tenant's job ids, image URLs, tokens and cursors,
answers 404 (or 401), never the data; lists and the all-jobs stream never show the other's jobs."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from imagegen.store import STORE

from .auth_keys import SECRET, auth_section, bearer
from .sse import SSEReader


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_SECRET", SECRET)


async def jobs_in_every_status(client: TestClient, tenant: str) -> dict[str, str]:
    """One job of `tenant` per status. The one worker draws the first (slowly: processing);
    the others are moved along through the store, as a worker would move them."""
    async def create() -> str:
        response = await client.post("/generations", json={"numImages": 1}, headers=bearer(tenant))
        assert response.status == 202
        return (await response.json())["jobId"]

    store = client.app[STORE]
    jobs = {"processing": await create()}
    while (await (await client.get(f"/generations/{jobs['processing']}", headers=bearer(tenant))).json())["status"] != "processing":
        await asyncio.sleep(0.02)
    for status in ("completed", "failed", "canceled", "pending"):
        jobs[status] = await create()
    probe = f"probe-{tenant}"
    claimed = await store.claim(jobs["completed"], probe, 60)
    assert claimed is not None
    progressed = await store.add_image(claimed.job, "images/none.png", probe)
    assert progressed is not None and await store.complete(progressed.job, probe) is not None
    claimed = await store.claim(jobs["failed"], probe, 60)
    assert claimed is not None and await store.fail(claimed.job, "probe", "failed on purpose", False, probe)
    assert (await client.post(f"/generations/{jobs['canceled']}/cancel", headers=bearer(tenant))).status == 200
    for status, job_id in jobs.items():
        body = await (await client.get(f"/generations/{job_id}", headers=bearer(tenant))).json()
        assert body["status"] == status
    return jobs


async def test_no_route_gives_one_tenant_anything_of_the_others(make_client: Any) -> None:
    client = await make_client(auth=auth_section(), workers={"count": 1}, provider={"delay_s": 60})
    mine = await jobs_in_every_status(client, "acme")
    # globex gets the worker only after acme's first job; its jobs are pending, canceled, ...
    # whatever they are, they are globex's own, and acme's must stay invisible to it.
    theirs = {"pending": (await (await client.post("/generations", json={"numImages": 1}, headers=bearer("globex"))).json())["jobId"]}
    document = await (await client.get("/openapi.json")).json()
    acme_ids = set(mine.values())
    probed = 0
    for template, operations in document["paths"].items():
        for method, operation in operations.items():
            if "{jobId}" not in template:
                continue
            for status, job_id in mine.items():
                path = template.replace("{jobId}", job_id).replace("{index}", "0").replace("{deliveryId}", "msg_" + "0" * 24)
                # HEAD too, wherever GET is: it answers GET's status and headers.
                for verb in (method.upper(), "HEAD") if method == "get" else (method.upper(),):
                    response = await client.request(verb, path, headers=bearer("globex"))
                    text = await response.text()
                    assert response.status == 404, (verb, path, status, response.status)
                    assert verb == "HEAD" or "No job has the id" in text or "No such image" in text
                    probed += 1
    # GET, HEAD, DELETE of the job, its cancel, its stream (GET, HEAD), its image (GET, HEAD),
    # its webhook deliveries (GET, HEAD) and a delivery's retry.
    assert probed == 11 * len(mine)
    # Nothing changed: acme still has every job as it was (none deleted or canceled by globex).
    for status, job_id in mine.items():
        body = await (await client.get(f"/generations/{job_id}", headers=bearer("acme"))).json()
        assert body["status"] == status
    # acme's signed image URLs, sent with globex's key: 404, whatever they carry.
    image = (await (await client.get(f"/generations/{mine['completed']}", headers=bearer("acme"))).json())["imageUrls"][0]
    assert (await client.get(re.sub(r"^http://[^/]+", "", image), headers=bearer("globex"))).status == 404
    # acme's token with globex's key: the key decides, and acme's job is not globex's.
    token = (await (await client.post("/tokens", headers=bearer("acme"))).json())["token"]
    response = await client.get(f"/generations/{mine['pending']}/events", params={"token": token}, headers=bearer("globex"))
    assert response.status == 404
    # acme's list cursor, given to globex's list: globex's jobs only.
    page = await (await client.get("/generations", params={"limit": "1"}, headers=bearer("acme"))).json()
    listed = await (await client.get("/generations", params={"cursor": page["nextCursor"]}, headers=bearer("globex"))).json()
    assert {j["jobId"] for j in listed["jobs"]} <= set(theirs.values())
    for status in (None, "pending", "processing", "completed", "failed", "canceled"):
        params = {"status": status} if status else {}
        listed = await (await client.get("/generations", params=params, headers=bearer("globex"))).json()
        assert not acme_ids & {j["jobId"] for j in listed["jobs"]}
    # The all-jobs stream from the first event: globex's jobs only.
    async with client.get("/generations/events", params={"lastEventId": "0"}, headers=bearer("globex")) as stream:
        reader = SSEReader(stream)
        seen = set()
        while (event := await reader.next()) is not None and event.job.get("jobId") != theirs["pending"]:
            seen.add(event.job.get("jobId"))
        assert event is not None and not acme_ids & seen
