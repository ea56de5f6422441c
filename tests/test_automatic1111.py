"""The automatic1111 provider against a faithful fake of the WebUI API: alone, and through the app."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from imagegen.config import ConfigError
from imagegen.providers import ImageRequest, ProviderError

from .conftest import create_job, db_rows, wait_for_status
from .fakes import FakeAutomatic1111, Scripted, assert_png, open_provider, provider_failure


@pytest.fixture
def backend() -> str:
    """The automatic1111 provider, alone and through the app: the job store is incidental here."""
    return "sqlite"

PASSWORD_ENV = "FAKE_WEBUI_PASSWORD"


async def start(aiohttp_server: Any, fake: FakeAutomatic1111) -> FakeAutomatic1111:
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
async def fake(aiohttp_server: Any) -> AsyncIterator[FakeAutomatic1111]:
    fake = await start(aiohttp_server, FakeAutomatic1111())
    yield fake
    fake.release()  # a held answer must finish for the server to close


def webui(fake: FakeAutomatic1111, image_size: int = 64, **automatic1111: Any) -> dict[str, Any]:
    """[provider] settings for the fake."""
    automatic1111 = {"base_url": fake.url, **automatic1111}
    return {"name": "automatic1111", "image_size": image_size, "automatic1111": automatic1111}


def request(job_id: str | None = None, index: int = 0, count: int = 1, size: int = 64) -> ImageRequest:
    return ImageRequest(job_id or str(uuid.uuid4()), index, "frog", size, 1, "A cute cartoon frog", count)


async def failure(tmp_path: Path, provider: dict[str, Any], size: int = 64) -> ProviderError:
    return await provider_failure(tmp_path, provider, request(size=size))


# --- answers ---------------------------------------------------------------------------------


async def test_txt2img_request_and_answer(fake: FakeAutomatic1111, tmp_path: Path) -> None:
    provider = webui(fake, steps=8, negative_prompt="blurry, text", sampler_name="Euler a", max_batch_size=4)
    job = request(count=3)
    async with open_provider(tmp_path, provider) as opened_provider:
        images = await opened_provider.generate(job)
    assert len(images) == 3
    for data in images:
        assert_png(data, 64)
    assert fake.requests == [
        {
            "prompt": "A cute cartoon frog",
            "negative_prompt": "blurry, text",
            "width": 64,
            "height": 64,
            "steps": 8,
            "batch_size": 3,
            "n_iter": 1,
            "seed": job.seed,
            "sampler_name": "Euler a",
        }
    ]


async def test_a_batch_draws_what_one_call_per_image_draws(fake: FakeAutomatic1111, tmp_path: Path) -> None:
    job_id = str(uuid.uuid4())
    async with open_provider(tmp_path, webui(fake, max_batch_size=3)) as provider:
        batch = await provider.generate(request(job_id, count=3))
        singles = [(await provider.generate(request(job_id, index)))[0] for index in range(3)]
    assert batch == singles and len(set(batch)) == 3


@pytest.mark.parametrize("samples_format", ["JPEG", "WEBP"])
async def test_other_formats_are_stored_as_png(
    fake: FakeAutomatic1111, tmp_path: Path, samples_format: str
) -> None:
    fake.samples_format = samples_format
    async with open_provider(tmp_path, webui(fake)) as provider:
        (data,) = await provider.generate(request())
    assert_png(data, 64)


async def test_a_size_the_model_rounds_is_refused(fake: FakeAutomatic1111, tmp_path: Path) -> None:
    error = await failure(tmp_path, webui(fake, image_size=100), size=100)
    assert (error.code, error.retryable) == ("invalid_image", False)
    assert "96x96 image instead of 100x100" in str(error)


# --- one request at a time -------------------------------------------------------------------


async def test_the_fake_catches_a_second_request_in_flight(fake: FakeAutomatic1111, tmp_path: Path) -> None:
    # Without this, the next test would prove nothing: with the limit lifted to 2, the fake
    # must notice the second request.
    fake.hold()
    async with open_provider(tmp_path, {**webui(fake), "max_concurrency": 2}) as provider:
        first = asyncio.create_task(provider.generate(request()))
        await asyncio.wait_for(fake.arrived.wait(), 10)
        with pytest.raises(ProviderError) as second:
            await provider.generate(request())
        fake.release()
        assert len(await first) == 1
    assert fake.overlaps == 1
    assert (second.value.code, second.value.retryable) == ("provider_unavailable", True)
    assert "RuntimeError: the fake WebUI got a second request" in str(second.value)


async def test_several_workers_never_send_two_requests_at_once(
    fake: FakeAutomatic1111, make_client: Any
) -> None:
    fake.hold()
    client = await make_client(workers={"count": 4}, provider=webui(fake))
    ids = [await create_job(client, numImages=2) for _ in range(6)]

    async def four_busy_workers_or_an_overlap() -> None:
        while not fake.overlaps:
            response = await client.get("/generations", params={"status": "processing"})
            if len((await response.json())["jobs"]) == 4:
                return
            await asyncio.sleep(0.01)  # polling interval, bounded by wait_for below

    # Every worker has a job and calls the provider while the first answer is held back: a
    # second request would reach the fake now, not after the first is done.
    await asyncio.wait_for(four_busy_workers_or_an_overlap(), 20)
    fake.release()
    for job_id in ids:
        job = await wait_for_status(client, job_id, {"completed", "failed"})
        assert job["status"] == "completed", job["error"]
    assert len(fake.requests) == 12 and fake.overlaps == 0


# --- basic auth ------------------------------------------------------------------------------


@pytest.fixture
async def locked(aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch) -> FakeAutomatic1111:
    monkeypatch.setenv(PASSWORD_ENV, "hunter2")
    return await start(aiohttp_server, FakeAutomatic1111(credentials=("imagegen", "hunter2")))


async def test_basic_auth(locked: FakeAutomatic1111, tmp_path: Path) -> None:
    login = webui(locked, username="imagegen", password_env=PASSWORD_ENV)
    async with open_provider(tmp_path, login) as provider:
        (data,) = await provider.generate(request())
    assert_png(data, 64)


async def test_a_wrong_password_is_an_auth_error(
    locked: FakeAutomatic1111, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "hunter3")
    error = await failure(tmp_path, webui(locked, username="imagegen", password_env=PASSWORD_ENV))
    assert (error.code, error.retryable) == ("provider_auth", False)
    assert "Incorrect username or password" in str(error) and f"${PASSWORD_ENV}" in str(error)
    assert "hunter" not in str(error)


async def test_no_login_for_a_server_that_wants_one(locked: FakeAutomatic1111, tmp_path: Path) -> None:
    error = await failure(tmp_path, webui(locked))
    assert (error.code, error.retryable) == ("provider_auth", False)
    assert "Not authenticated" in str(error) and "username" in str(error)


async def test_a_missing_password_stops_the_provider_from_opening(
    fake: FakeAutomatic1111, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"the environment variable {PASSWORD_ENV}"):
        async with open_provider(tmp_path, webui(fake, username="imagegen", password_env=PASSWORD_ENV)):
            pass


# --- errors ----------------------------------------------------------------------------------


async def test_an_unknown_sampler_is_a_bad_request(fake: FakeAutomatic1111, tmp_path: Path) -> None:
    error = await failure(tmp_path, webui(fake, sampler_name="Euler z"))
    assert (error.code, error.retryable) == ("provider_bad_request", False)
    assert "(HTTP 400): Sampler not found" in str(error)


async def test_a_validation_error_names_the_field(fake: FakeAutomatic1111, tmp_path: Path) -> None:
    detail = [{"loc": ["body", "steps"], "msg": "ensure this value is less than 151", "type": "value_error"}]
    fake.scripted.append(Scripted(422, {"detail": detail}))
    error = await failure(tmp_path, webui(fake))
    assert (error.code, error.retryable) == ("provider_bad_request", False)
    assert "body.steps: ensure this value is less than 151" in str(error)


async def test_out_of_memory_is_a_server_error(fake: FakeAutomatic1111, tmp_path: Path) -> None:
    fake.scripted.append(Scripted(500, {
        "error": "OutOfMemoryError", "detail": "", "body": "",
        "errors": "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)",
    }))
    error = await failure(tmp_path, webui(fake))
    assert (error.code, error.retryable) == ("provider_unavailable", True)
    assert "(HTTP 500): OutOfMemoryError: CUDA out of memory" in str(error)


async def test_a_server_without_api_says_how_to_fix_it(fake: FakeAutomatic1111, tmp_path: Path) -> None:
    provider = webui(fake)
    provider["automatic1111"]["base_url"] = f"{fake.url}/ui"
    error = await failure(tmp_path, provider)
    assert (error.code, error.retryable) == ("provider_bad_request", False)
    assert "/sdapi/v1/txt2img (HTTP 404)" in str(error) and "--api" in str(error)


async def test_a_slow_server_times_out(fake: FakeAutomatic1111, tmp_path: Path) -> None:
    fake.hold()
    error = await failure(tmp_path, {**webui(fake), "read_timeout_s": 0.2})
    assert (error.code, error.retryable) == ("provider_timeout", True)


# --- through the app -----------------------------------------------------------------------


async def test_a_job_is_drawn_in_batches_and_served_as_pngs(
    fake: FakeAutomatic1111, make_client: Any, tmp_path: Path
) -> None:
    client = await make_client(provider=webui(fake, image_size=96, max_batch_size=2))
    job_id = await create_job(client, numImages=5, animal="frog")
    job = await wait_for_status(client, job_id, {"completed", "failed"})
    assert job["status"] == "completed", job["error"]
    assert [call["batch_size"] for call in fake.requests] == [2, 2, 1]
    seeds = [call["seed"] for call in fake.requests]
    assert seeds == [seeds[0], seeds[0] + 2, seeds[0] + 4]  # each batch starts at its first image's seed
    for index in range(5):
        response = await client.get(f"/images/{job_id}/{index}.png")
        assert_png(await response.read(), 96)
    # Progress still moves one image at a time.
    progress = "SELECT name FROM events WHERE job_id = ? AND name = 'job.progress'"
    assert len(db_rows(tmp_path / "data", progress, (job_id,))) == 5


async def test_a_failing_server_fails_the_job_with_a_reason(
    fake: FakeAutomatic1111, make_client: Any
) -> None:
    client = await make_client(provider=webui(fake, sampler_name="Euler z"))
    job_id = await create_job(client)
    job = await wait_for_status(client, job_id, {"completed", "failed"})
    assert job["status"] == "failed"
    assert job["error"] == {
        "code": "provider_bad_request",
        "message": f"AUTOMATIC1111 at {fake.url} refused the request (HTTP 400): Sampler not found",
        "retryable": False,
    }
