"""API keys and tenants: who may see, change and follow which job, on both backends."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from imagegen.auth import CREDENTIALS, Credentials, key_hash
from imagegen.config import AuthSettings, load_settings

from .auth_keys import ACME_KEY, GLOBEX_KEY, SECRET, auth_section, bearer
from .conftest import TestDatabase
from .sse import SSEReader

NO_SUCH_JOB = "00000000-0000-7000-8000-000000000000"


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_SECRET", SECRET)


@pytest.fixture
async def client(make_client: Any) -> TestClient:
    return await make_client(auth=auth_section())


async def create(client: TestClient, tenant: str, **body: Any) -> str:
    response = await client.post("/generations", json={"numImages": 1, **body}, headers=bearer(tenant))
    assert response.status == 202, await response.text()
    return (await response.json())["jobId"]


async def finished(client: TestClient, tenant: str, job_id: str, timeout: float = 20) -> dict[str, Any]:
    async def poll() -> dict[str, Any]:
        while True:
            job = await (await client.get(f"/generations/{job_id}", headers=bearer(tenant))).json()
            if job["status"] in ("completed", "failed", "canceled"):
                return job
            await asyncio.sleep(0.02)

    return await asyncio.wait_for(poll(), timeout)


def same_problem(a: dict[str, Any], b: dict[str, Any], a_id: str, b_id: str) -> bool:
    """Two problem bodies that differ at most in the job id they name."""
    return json.dumps(a).replace(a_id, "ID") == json.dumps(b).replace(b_id, "ID")


# --- keys ------------------------------------------------------------------------------------


async def test_without_a_key_every_api_route_is_401_with_a_bearer_challenge(client: TestClient) -> None:
    for method, path in [
        ("POST", "/generations"), ("GET", "/generations"), ("GET", f"/generations/{NO_SUCH_JOB}"),
        ("GET", "/generations/events"), ("POST", "/tokens"), ("GET", f"/images/{NO_SUCH_JOB}/0.png"),
        ("DELETE", f"/generations/{NO_SUCH_JOB}"), ("GET", "/no/such/route"),
    ]:
        for headers in ({}, {"Authorization": "Bearer ig_wrong"}, {"Authorization": f"Basic {ACME_KEY}"}):
            response = await client.request(method, path, headers=headers, json={"numImages": 1})
            assert response.status == 401, (method, path, headers)
            assert response.content_type == "application/problem+json"
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert ACME_KEY not in await response.text()


async def test_the_page_shell_and_the_documentation_need_no_key(client: TestClient) -> None:
    for path in ("/", "/docs", "/redoc", "/openapi.json"):
        assert (await client.get(path)).status == 200, path
    page = await (await client.get("/")).text()
    assert '"auth": true' in page


async def test_a_valid_key_works_and_keys_are_compared_in_constant_time(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (await client.get("/generations", headers=bearer("globex"))).status == 200
    # Every configured hash is compared with hmac.compare_digest, whether the first one matches
    # or none does: no early exit that a timing could reveal, and no == on secrets.
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("imagegen.auth.hmac.compare_digest", recording)
    credentials = client.app[CREDENTIALS]
    for key, expected in ((ACME_KEY, "acme"), (GLOBEX_KEY, "globex"), ("ig_nobody", None)):
        calls.clear()
        tenant = credentials.tenant_for_key(key)
        assert (tenant.name if tenant else None) == expected
        assert len(calls) == 2 and {bytes.fromhex(key_hash(k)[7:]) for k in (ACME_KEY, GLOBEX_KEY)} == {b for _, b in calls}


def test_keys_come_from_the_environment_like_every_setting() -> None:
    settings = load_settings(None, {
        "IMAGEGEN_AUTH__ENABLED": "true",
        "IMAGEGEN_AUTH__KEYS": f'[{{name = "a", hash = "{key_hash(ACME_KEY)}", max_pending = 7}}]',
    })
    assert settings.auth.enabled and settings.auth.keys[0].name == "a" and settings.auth.keys[0].max_pending == 7
    credentials = Credentials(settings.auth, SECRET)
    assert credentials.tenant_for_key(ACME_KEY).name == "a"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ('[{name = "a", hash = "sha256:abc"}]', 'auth.keys.0.hash: Value error, must be "sha256:"'),
        (f'[{{name = "a", hash = "{ACME_KEY}"}}]', 'auth.keys.0.hash: Value error, must be "sha256:"'),
        ('[{name = "a b", hash = "sha256:' + "0" * 64 + '"}]', "auth.keys.0.name"),
        ('[{name = "a", hash = "sha256:' + "0" * 64 + '"}, {name = "a", hash = "sha256:' + "1" * 64 + '"}]',
         "auth: Value error, keys: every key needs its own name (a)"),
        ("[]", "auth: Value error, auth is enabled but no keys are configured"),
    ],
)
def test_a_malformed_key_entry_is_refused_without_echoing_it(keys: str, message: str) -> None:
    from imagegen.config import ConfigError

    with pytest.raises(ConfigError) as raised:
        load_settings(None, {"IMAGEGEN_AUTH__ENABLED": "true", "IMAGEGEN_AUTH__KEYS": keys})
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)
    assert ACME_KEY not in str(raised.value)


# --- tenants ---------------------------------------------------------------------------------


async def test_another_tenants_job_is_not_found_exactly_like_a_job_that_does_not_exist(client: TestClient) -> None:
    job_id = await create(client, "acme", numImages=2)
    job = await finished(client, "acme", job_id)
    image = job["imageUrls"][0].split("?")[0].replace("http://" + client.host, "").split(f":{client.port}", 1)[-1]
    for method, template in [
        ("GET", "/generations/{}"), ("DELETE", "/generations/{}"), ("POST", "/generations/{}/cancel"),
        ("GET", "/generations/{}/events"), ("GET", "/images/{}/0.png"),
    ]:
        theirs = await client.request(method, template.format(job_id), headers=bearer("globex"))
        nobodys = await client.request(method, template.format(NO_SUCH_JOB), headers=bearer("globex"))
        assert theirs.status == nobodys.status == 404, (method, template)
        assert same_problem(await theirs.json(), await nobodys.json(), job_id, NO_SUCH_JOB)
    # The owner still has it, whole: nothing the other tenant sent changed it.
    assert (await client.get(f"/generations/{job_id}", headers=bearer("acme"))).status == 200
    assert (await client.get(image, headers=bearer("acme"))).status == 200


async def test_lists_and_the_all_jobs_stream_show_only_the_callers_jobs(client: TestClient) -> None:
    acme = [await create(client, "acme") for _ in range(3)]
    globex = [await create(client, "globex") for _ in range(2)]
    for tenant, own in (("acme", acme), ("globex", globex)):
        listed = await (await client.get("/generations", params={"limit": "1"}, headers=bearer(tenant))).json()
        ids = [j["jobId"] for j in listed["jobs"]]
        cursor = listed["nextCursor"]
        while cursor:
            page = await (await client.get("/generations", params={"limit": "1", "cursor": cursor}, headers=bearer(tenant))).json()
            ids += [j["jobId"] for j in page["jobs"]]
            cursor = page["nextCursor"]
        assert sorted(ids) == sorted(own)
    # Replayed from the first event, then live: only globex's jobs' events.
    async with client.session.get(client.make_url("/generations/events"), params={"lastEventId": "0"},
                                  headers=bearer("globex")) as response:
        reader = SSEReader(response)
        seen: set[str] = set()
        late = await create(client, "acme")
        mine = await create(client, "globex")
        while mine not in seen:
            event = await reader.next()
            assert event is not None
            seen.add(event.job["jobId"])
        assert seen <= {*globex, mine} and late not in seen


async def test_a_reset_replays_only_the_callers_jobs(make_client: Any, database: TestDatabase) -> None:
    client = await make_client(auth=auth_section(), events={"retention": 1})
    acme, globex = await create(client, "acme"), await create(client, "globex")
    await finished(client, "acme", acme)
    await finished(client, "globex", globex)
    from .conftest import prune

    await prune(client)
    async with client.session.get(client.make_url("/generations/events"), params={"lastEventId": "1"},
                                  headers=bearer("acme")) as response:
        reader = SSEReader(response)
        assert (await reader.next()).name == "reset"  # type: ignore[union-attr]
        state = await reader.next()
        assert state is not None and state.name == "job.state" and state.job["jobId"] == acme
        # Nothing else of the reset: the next frame is only whatever comes live.
        with pytest.raises(TimeoutError):
            await reader.next(timeout=0.5)


async def test_idempotency_keys_are_per_tenant(client: TestClient, database: TestDatabase) -> None:
    key = {"Idempotency-Key": "order-1"}
    first = await client.post("/generations", json={"numImages": 1}, headers={**bearer("acme"), **key})
    other = await client.post("/generations", json={"numImages": 1}, headers={**bearer("globex"), **key})
    again = await client.post("/generations", json={"numImages": 1}, headers={**bearer("globex"), **key})
    assert first.status == other.status == again.status == 202
    ids = [(await r.json())["jobId"] for r in (first, other, again)]
    assert ids[0] != ids[1] == ids[2] and again.headers["Idempotent-Replayed"] == "true"
    assert len(database.rows("SELECT id FROM jobs")) == 2


async def test_prefer_wait_with_another_tenants_idempotency_key_waits_on_its_own_job(client: TestClient) -> None:
    key = {"Idempotency-Key": "shared"}
    acme = await client.post("/generations", json={"numImages": 1}, headers={**bearer("acme"), **key})
    waited = await client.post(
        "/generations", json={"numImages": 1}, headers={**bearer("globex"), **key, "Prefer": "wait=10"}
    )
    assert waited.status == 201 and (await waited.json())["jobId"] != (await acme.json())["jobId"]


async def test_each_key_has_its_own_backlog_limit(make_client: Any, database: TestDatabase) -> None:
    client = await make_client(auth=auth_section(limits={"acme": 2}), workers={"count": 1, "max_pending": 10},
                               provider={"delay_s": 30})
    running = await create(client, "globex")  # keeps the one worker busy
    while (await (await client.get(f"/generations/{running}", headers=bearer("globex"))).json())["status"] != "processing":
        await asyncio.sleep(0.02)
    for _ in range(2):
        await create(client, "acme")
    refused = await client.post("/generations", json={"numImages": 1}, headers=bearer("acme"))
    assert refused.status == 429 and int(refused.headers["Retry-After"]) > 0
    assert "of yours" in (await refused.json())["detail"]
    burst = await asyncio.gather(*(client.post("/generations", json={"numImages": 1}, headers=bearer("acme")) for _ in range(5)))
    assert {r.status for r in burst} == {429}
    # The other tenant is not held back by acme's full backlog.
    assert (await client.post("/generations", json={"numImages": 1}, headers=bearer("globex"))).status == 202
    owners = [r["owner"] for r in database.rows("SELECT owner FROM jobs WHERE status = 'pending'")]
    assert sorted(owners) == ["acme", "acme", "globex"]


async def test_workers_take_turns_between_tenants_backlogs(make_client: Any, database: TestDatabase) -> None:
    client = await make_client(auth=auth_section(), workers={"count": 1}, provider={"delay_s": 0.05})
    # acme's backlog is there first and is longer; globex's comes after.
    acme = [await create(client, "acme") for _ in range(6)]
    globex = [await create(client, "globex") for _ in range(3)]
    for tenant, ids in (("acme", acme), ("globex", globex)):
        for job_id in ids:
            await finished(client, tenant, job_id)
    claims = database.rows("SELECT job_id, owner FROM events WHERE name = 'job.processing' ORDER BY seq") if (
        database.backend == "postgres") else database.rows(
        "SELECT job_id, json_extract(job, '$.owner') AS owner FROM events WHERE name = 'job.processing' ORDER BY seq")
    order = [row["owner"] for row in claims]
    # Once both have a backlog, claims alternate until globex's runs out: round-robin.
    first_globex = order.index("globex")
    assert first_globex <= 2, order
    assert order[first_globex - 1:first_globex + 5] == ["acme", "globex"] * 3, order


async def test_jobs_made_before_auth_belong_to_no_key(make_client: Any, database: TestDatabase, tmp_path: Any) -> None:
    open_client = await make_client()
    job_id = (await (await open_client.post("/generations", json={"numImages": 1})).json())["jobId"]
    await open_client.close()
    client = await make_client(auth=auth_section())
    for tenant in ("acme", "globex"):
        assert (await client.get(f"/generations/{job_id}", headers=bearer(tenant))).status == 404
        assert (await (await client.get("/generations", headers=bearer(tenant))).json())["jobs"] == []
    assert [r["owner"] for r in database.rows("SELECT owner FROM jobs")] == [None]  # still there, owned by none


# --- tokens and signed image URLs ------------------------------------------------------------


async def test_a_token_opens_the_callers_streams_and_nothing_else(make_client: Any) -> None:
    client = await make_client(auth=auth_section(token_ttl_s=2))
    response = await client.post("/tokens", headers=bearer("acme"))
    assert response.status == 201
    body = await response.json()
    token = body["token"]
    assert body["expiresAt"].endswith("Z")
    acme = await create(client, "acme")
    globex = await create(client, "globex")
    # The job's stream and the all-jobs stream take it in place of the header...
    async with client.get(f"/generations/{acme}/events", params={"token": token}) as stream:
        assert stream.status == 200
    assert (await client.get(f"/generations/{globex}/events", params={"token": token})).status == 404
    # ...no other route does, and a token cannot make tokens.
    assert (await client.get(f"/generations/{acme}", params={"token": token})).status == 401
    assert (await client.post("/tokens", params={"token": token})).status == 401
    # Tampered: 401.
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    assert (await client.get("/generations/events", params={"token": tampered})).status == 401
    # A stream opened with it ends when it expires; then the token opens nothing.
    started = time.monotonic()
    async with client.get("/generations/events", params={"token": token}) as stream:
        reader = SSEReader(stream)
        assert (await reader.next()).name == "ready"  # type: ignore[union-attr]
        while await reader.next(timeout=5) is not None:
            pass
    assert time.monotonic() - started < 4
    expired = await client.get("/generations/events", params={"token": token})
    assert expired.status == 401 and 'error="invalid_token"' in expired.headers["WWW-Authenticate"]


async def test_image_urls_are_signed_and_open_without_a_key(make_client: Any) -> None:
    client = await make_client(auth=auth_section())
    job = await finished(client, "acme", await create(client, "acme"))
    url = job["imageUrls"][0]
    assert "?exp=" in url and "&sig=" in url
    path = url.split(str(client.port), 1)[1]
    image = await client.get(path)  # no header: the signature is the key to this one image
    assert image.status == 200 and image.content_type == "image/png"
    assert image.headers["Cache-Control"].startswith("private")
    for bad in (path[:-3] + ("abc" if not path.endswith("abc") else "xyz"), path.replace("exp=", "exp=1")):
        assert (await client.get(bad)).status == 404
    # Expired: a signature that was valid until a moment ago.
    credentials = client.app[CREDENTIALS]
    image_path = path.split("?")[0]
    old = credentials.image_query(image_path, int(time.time()) - 1)
    assert (await client.get(image_path + old)).status == 404
    assert (await client.get(image_path)).status == 401  # neither a key nor a signature
    # Another tenant's key with the owner's signed URL: not theirs, whatever the URL carries.
    assert (await client.get(path, headers=bearer("globex"))).status == 404


async def test_with_auth_off_urls_stay_plain(make_client: Any) -> None:
    client = await make_client()
    response = await client.post("/generations", json={"numImages": 1}, headers={"Prefer": "wait=10"})
    job = await response.json()
    assert job["imageUrls"][0].endswith(f"/images/{job['jobId']}/0.png")
    assert (await client.post("/tokens")).status == 404


def test_the_secret_must_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from imagegen.errors import StartupError

    monkeypatch.delenv("IMAGEGEN_SECRET")
    settings = AuthSettings.model_validate(auth_section())
    with pytest.raises(StartupError, match="IMAGEGEN_SECRET .* is not set"):
        Credentials.from_environment(settings)
    monkeypatch.setenv("IMAGEGEN_SECRET", "short")
    with pytest.raises(StartupError, match="shorter than 32"):
        Credentials.from_environment(settings)
