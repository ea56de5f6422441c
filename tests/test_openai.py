"""The openai provider against a faithful fake of the OpenAI images API: alone, and through the app."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest

from imagegen.config import ConfigError
from imagegen.providers import ImageRequest, ProviderError

from .conftest import ROOT, create_job, db_rows, wait_for_status
from .fakes import FakeOpenAI, Scripted, assert_png, open_provider, openai_error, picture, provider_failure


@pytest.fixture
def backend() -> str:
    """The openai provider, alone and through the app: the job store is incidental here."""
    return "sqlite"

KEY = "sk-test-SECRET-0123456789abcdef"
KEY_ENV = "FAKE_OPENAI_API_KEY"  # not IMAGEGEN_*: those are settings


@pytest.fixture
async def fake(aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeOpenAI]:
    monkeypatch.setenv(KEY_ENV, KEY)
    fake = FakeOpenAI(KEY)
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("")).rstrip("/")
    yield fake
    fake.release()  # a held answer must finish for the server to close


def openai(fake: FakeOpenAI, image_size: int = 256, **openai: Any) -> dict[str, Any]:
    """[provider] settings for the fake: dall-e-2, whose sizes start at 256, unless told otherwise."""
    openai = {"base_url": fake.url, "api_key_env": KEY_ENV, "model": "dall-e-2", **openai}
    return {"name": "openai", "image_size": image_size, "openai": openai}


def request(size: int = 256, count: int = 1, prompt: str = "A cute cartoon owl") -> ImageRequest:
    return ImageRequest(str(uuid.uuid4()), 0, "owl", size, 1, prompt, count)


async def failure(tmp_path: Path, provider: dict[str, Any]) -> ProviderError:
    return await provider_failure(tmp_path, provider, request())


# --- answers ---------------------------------------------------------------------------------


async def test_b64_json_answer_becomes_checked_pngs(fake: FakeOpenAI, tmp_path: Path) -> None:
    async with open_provider(tmp_path, openai(fake, max_n_per_request=3, quality="standard")) as provider:
        images = await provider.generate(request(count=5, prompt="A cute cartoon owl. In a hat"))
    assert len(images) == 3  # n is capped at the model's limit; the worker asks again for the rest
    for data in images:
        assert_png(data, 256)
    assert fake.requests == [
        {
            "model": "dall-e-2",
            "prompt": "A cute cartoon owl. In a hat",
            "n": 3,
            "size": "256x256",
            "response_format": "b64_json",
            "quality": "standard",
        }
    ]


async def test_url_answer_is_downloaded_at_once_without_our_key(fake: FakeOpenAI, tmp_path: Path) -> None:
    async with open_provider(tmp_path, openai(fake, response_format="url", max_n_per_request=2)) as provider:
        images = await provider.generate(request(count=2))
    assert [assert_png(data, 256).size for data in images] == [(256, 256)] * 2
    # Each link was fetched once, before generate returned, and never got the API key.
    assert fake.downloads == [(200, None), (200, None)]


async def test_an_expired_link_fails_the_attempt_as_retryable(fake: FakeOpenAI, tmp_path: Path) -> None:
    gone = f"{fake.url}/blob/img-gone.png?sig=x"
    fake.scripted.append(Scripted(200, {"created": 0, "data": [{"url": gone}]}))
    error = await failure(tmp_path, openai(fake, response_format="url"))
    assert (error.code, error.retryable) == ("provider_unavailable", True)
    assert "HTTP 404" in str(error) and "sig=" not in str(error)


@pytest.mark.parametrize("image_format", ["JPEG", "WEBP"])
async def test_other_formats_are_stored_as_png(fake: FakeOpenAI, tmp_path: Path, image_format: str) -> None:
    fake.image_format = image_format
    async with open_provider(tmp_path, openai(fake)) as provider:
        (data,) = await provider.generate(request())
    assert_png(data, 256)


async def test_gpt_image_1_without_response_format(fake: FakeOpenAI, tmp_path: Path) -> None:
    provider = openai(fake, image_size=1024, model="gpt-image-1", response_format="", max_n_per_request=10)
    async with open_provider(tmp_path, provider) as opened_provider:
        (data,) = await opened_provider.generate(request(1024))
    assert_png(data, 1024)
    assert "response_format" not in fake.requests[0]


# --- failures the attempt cannot get past --------------------------------------------------


async def test_an_image_of_the_wrong_size_is_refused(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.draw_size = (512, 512)
    error = await failure(tmp_path, openai(fake))
    assert (error.code, error.retryable) == ("invalid_image", False)
    assert "512x512 image instead of 256x256" in str(error) and "image_size" in str(error)


@pytest.mark.parametrize("data", [b"<html>not an image</html>", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
async def test_bytes_that_are_not_an_image_are_refused(fake: FakeOpenAI, tmp_path: Path, data: bytes) -> None:
    fake.image_bytes = data
    error = await failure(tmp_path, openai(fake))
    assert (error.code, error.retryable) == ("invalid_image", False)
    assert "not a readable image" in str(error)


async def test_a_truncated_png_is_refused(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.image_bytes = picture(256, 256, 1)[:-200]
    error = await failure(tmp_path, openai(fake))
    assert (error.code, error.retryable) == ("invalid_image", False)


async def test_refused_credentials_name_the_variable_and_never_show_the_key(
    fake: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "sk-wrong-SECRET-fedcba9876543210"
    monkeypatch.setenv(KEY_ENV, wrong)
    caplog.set_level(logging.DEBUG)
    error = await failure(tmp_path, openai(fake))
    assert (error.code, error.retryable) == ("provider_auth", False)
    assert "(HTTP 401)" in str(error) and f"${KEY_ENV}" in str(error)
    for text in (str(error), caplog.text):
        assert "SECRET" not in text and wrong[-4:] not in text


async def test_a_refused_prompt_is_a_content_policy_error(fake: FakeOpenAI, tmp_path: Path) -> None:
    async with open_provider(tmp_path, openai(fake)) as provider:
        with pytest.raises(ProviderError) as info:
            await provider.generate(request(prompt=f"A cute cartoon owl. {FakeOpenAI.BANNED}"))
    assert (info.value.code, info.value.retryable) == ("content_policy", False)
    assert "safety system" in str(info.value) and "prompt" in str(info.value)


async def test_n_above_the_models_limit_is_a_bad_request(fake: FakeOpenAI, tmp_path: Path) -> None:
    provider = openai(fake, image_size=1024, model="dall-e-3", max_n_per_request=2)
    async with open_provider(tmp_path, provider) as opened_provider:
        with pytest.raises(ProviderError) as info:
            await opened_provider.generate(request(1024, count=2))
    assert (info.value.code, info.value.retryable) == ("provider_bad_request", False)
    assert "You must provide n=1 for this model." in str(info.value)


async def test_a_size_the_model_does_not_draw_is_a_bad_request(fake: FakeOpenAI, tmp_path: Path) -> None:
    error = await failure(tmp_path, openai(fake, model="dall-e-3"))
    assert (error.code, error.retryable) == ("provider_bad_request", False)
    assert "HTTP 400" in str(error) and "The size is not supported by this model." in str(error)


async def test_an_exhausted_quota_is_not_worth_retrying(fake: FakeOpenAI, tmp_path: Path) -> None:
    message = "You exceeded your current quota, please check your plan and billing details."
    body = openai_error(message, "insufficient_quota", None, "insufficient_quota")
    fake.scripted.append(Scripted(429, body))
    error = await failure(tmp_path, openai(fake))
    assert (error.code, error.retryable) == ("provider_quota_exceeded", False)
    assert message in str(error)


async def test_a_200_that_is_not_the_api_is_a_bad_response(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.scripted.append(Scripted(200, "<html><body>Welcome to nginx!</body></html>"))
    error = await failure(tmp_path, openai(fake))
    assert (error.code, error.retryable) == ("provider_bad_response", False)
    assert "base_url" in str(error)


async def test_a_wrong_base_url_says_so(fake: FakeOpenAI, tmp_path: Path) -> None:
    provider = openai(fake)
    provider["openai"]["base_url"] = f"{fake.url}/openai"
    error = await failure(tmp_path, provider)
    assert (error.code, error.retryable) == ("provider_bad_request", False)
    assert "/v1/images/generations (HTTP 404)" in str(error) and "base_url" in str(error)


# --- transient failures ----------------------------------------------------------------------


async def test_429_carries_retry_after_in_seconds(fake: FakeOpenAI, tmp_path: Path) -> None:
    body = openai_error("Rate limit reached for dall-e-2 in organization org-x on images per minute (IPM): "
                        "Limit 5, Used 5, Requested 1.", "requests", None, "rate_limit_exceeded")
    fake.scripted.append(Scripted(429, body, {"Retry-After": "7"}))
    error = await failure(tmp_path, openai(fake))
    assert (error.code, error.retryable, error.retry_after) == ("provider_rate_limited", True, 7.0)
    assert "Rate limit reached" in str(error)


async def test_429_carries_retry_after_as_an_http_date(fake: FakeOpenAI, tmp_path: Path) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    fake.scripted.append(Scripted(429, openai_error("Slow down", "requests"), {"Retry-After": when}))
    error = await failure(tmp_path, openai(fake))
    assert error.code == "provider_rate_limited" and error.retryable
    assert error.retry_after is not None and 100 < error.retry_after <= 120


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_are_retryable(fake: FakeOpenAI, tmp_path: Path, status: int) -> None:
    message = "The server had an error while processing your request. Sorry about that!"
    body = openai_error(message, "server_error")
    fake.scripted.append(Scripted(status, body))
    error = await failure(tmp_path, openai(fake))
    assert (error.code, error.retryable) == ("provider_unavailable", True)
    assert f"HTTP {status}" in str(error) and "Sorry about that" in str(error)


async def test_a_slow_answer_times_out(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.hold()
    provider = {**openai(fake), "read_timeout_s": 0.2}
    error = await failure(tmp_path, provider)
    assert (error.code, error.retryable) == ("provider_timeout", True)
    assert "0.2 s" in str(error) and "read_timeout_s" in str(error)


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A port on 127.0.0.1 that is bound but not listening: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_a_refused_connection_is_retryable(fake: FakeOpenAI, tmp_path: Path, refused_url: str) -> None:
    provider = openai(fake)
    provider["openai"]["base_url"] = refused_url
    error = await failure(tmp_path, provider)
    assert (error.code, error.retryable) == ("provider_unavailable", True)
    assert refused_url.removeprefix("http://") in str(error)


# --- the key --------------------------------------------------------------------------------


async def test_a_missing_key_stops_the_provider_from_opening(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"provider.openai.api_key_env: the environment variable {KEY_ENV}"):
        async with open_provider(tmp_path, {"name": "openai", "openai": {"api_key_env": KEY_ENV}}):
            pass


def test_server_refuses_to_start_without_the_key_in_one_line(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "IMAGEGEN_STORAGE__DATA_DIR": str(tmp_path / "data"),
        "IMAGEGEN_PROVIDER__NAME": "openai",
        "IMAGEGEN_PROVIDER__OPENAI__API_KEY_ENV": KEY_ENV,
    }
    command = [sys.executable, "server.py", "--port", "0"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and KEY_ENV in lines[0], result.stderr


# --- through the app -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "size", "max_n", "calls"),
    [("dall-e-2", 256, 2, [2, 2, 1]), ("dall-e-3", 1024, 1, [1, 1, 1, 1, 1])],
)
async def test_a_job_is_split_into_calls_of_at_most_n(
    fake: FakeOpenAI, make_client: Any, model: str, size: int, max_n: int, calls: list[int]
) -> None:
    client = await make_client(provider=openai(fake, image_size=size, model=model, max_n_per_request=max_n))
    job_id = await create_job(client, numImages=5, animal="fox", prompt="wearing a scarf")
    job = await wait_for_status(client, job_id, {"completed", "failed"})
    assert job["status"] == "completed", job["error"]
    assert [call["n"] for call in fake.requests] == calls
    assert {call["prompt"] for call in fake.requests} == {
        "A cute cartoon fox, friendly sticker illustration, soft pastel background. wearing a scarf"
    }
    served = []
    for index in range(5):
        response = await client.get(f"/images/{job_id}/{index}.png")
        assert response.status == 200
        served.append(assert_png(await response.read(), size).tobytes())
    assert len(set(served)) == 5  # five pictures, each stored once at its own index


async def test_url_answers_through_the_app(fake: FakeOpenAI, make_client: Any) -> None:
    client = await make_client(provider=openai(fake, response_format="url", max_n_per_request=10))
    job_id = await create_job(client, numImages=3)
    job = await wait_for_status(client, job_id, {"completed", "failed"})
    assert job["status"] == "completed", job["error"]
    assert [status for status, _ in fake.downloads] == [200, 200, 200]
    for index in range(3):
        response = await client.get(f"/images/{job_id}/{index}.png")
        assert_png(await response.read(), 256)


async def test_a_refused_prompt_fails_the_job_with_a_reason(fake: FakeOpenAI, make_client: Any) -> None:
    client = await make_client(provider=openai(fake))
    job_id = await create_job(client, numImages=2, prompt=f"something {FakeOpenAI.BANNED}")
    job = await wait_for_status(client, job_id, {"completed", "failed"})
    assert job["status"] == "failed" and job["imageUrls"] == []
    assert job["error"]["code"] == "content_policy" and job["error"]["retryable"] is False
    assert "safety system" in job["error"]["message"]


async def test_refused_credentials_fail_the_job_without_showing_the_key(
    fake: FakeOpenAI, make_client: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-wrong-SECRET-fedcba9876543210")
    caplog.set_level(logging.DEBUG)
    client = await make_client(provider=openai(fake))
    job_id = await create_job(client)
    job = await wait_for_status(client, job_id, {"completed", "failed"})
    assert job["error"]["code"] == "provider_auth" and job["error"]["retryable"] is False
    assert f"${KEY_ENV}" in job["error"]["message"]
    assert "SECRET" not in job["error"]["message"] and "SECRET" not in caplog.text


async def test_a_rate_limited_job_waits_out_retry_after_then_completes(
    fake: FakeOpenAI, make_client: Any, tmp_path: Path
) -> None:
    fake.scripted.append(Scripted(429, openai_error("Rate limit reached", "requests"), {"Retry-After": "1"}))
    client = await make_client(provider=openai(fake), jobs={"retry_base_s": 0.01, "max_attempts": 3})
    job_id = await create_job(client)
    job = await wait_for_status(client, job_id, {"completed", "failed"})
    assert job["status"] == "completed" and job["attempts"] == 2 and job["error"] is None
    (retry,) = db_rows(
        tmp_path / "data",
        "SELECT json_extract(job, '$.updated_at') AS at, json_extract(job, '$.error_code') AS code "
        "FROM events WHERE job_id = ? AND name = 'job.retrying'",
        (job_id,),
    )
    (second,) = db_rows(
        tmp_path / "data",
        "SELECT created_at FROM events WHERE job_id = ? AND name = 'job.processing' ORDER BY seq DESC LIMIT 1",
        (job_id,),
    )
    assert retry["code"] == "provider_rate_limited"
    waited = datetime.fromisoformat(second["created_at"]) - datetime.fromisoformat(retry["at"])
    assert waited >= timedelta(seconds=0.95), "the retry honoured Retry-After, not the 10 ms backoff"
