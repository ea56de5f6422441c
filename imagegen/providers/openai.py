"""The openai provider: any OpenAI-compatible images API, POST {base_url}/v1/images/generations."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, field_validator

from ..settings_base import BaseUrl, Section
from .base import ImageRequest, ProviderError
from .http import ImageApi, Reply, clip, secret_from_env

if TYPE_CHECKING:
    from . import ProviderSettings  # for annotations only: the package imports this module

PATH = "/v1/images/generations"

# The error codes of a refusal by the API's safety system (dall-e-*, gpt-image-*): only another
# prompt helps, never a retry.
CONTENT_POLICY_CODES = frozenset({"content_policy_violation", "moderation_blocked"})


class OpenAISettings(Section):
    base_url: BaseUrl = "https://api.openai.com"
    api_key_env: str = "OPENAI_API_KEY"
    model: str = "dall-e-3"
    response_format: Literal["b64_json", "url", ""] = "b64_json"
    max_n_per_request: Annotated[int, Field(ge=1, le=100)] = 1
    quality: str = ""
    style: str = ""

    @field_validator("base_url")
    @classmethod
    def _without_v1(cls, value: str) -> str:
        if value.endswith("/v1"):
            raise ValueError("leave out /v1: the provider adds /v1/images/generations itself")
        return value


class OpenAIProvider:
    """Draws a job's images n at a time, n at most the model's limit (`max_n_per_request`)."""

    def __init__(self, api: ImageApi, settings: OpenAISettings, api_key: str) -> None:
        self._api = api
        self._settings = settings
        # Sent with API calls only, never with downloads: image links are on other hosts.
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def generate(self, request: ImageRequest) -> list[bytes]:
        settings = self._settings
        n = min(request.count, settings.max_n_per_request)
        payload: dict[str, Any] = {
            "model": settings.model,
            "prompt": request.prompt,
            "n": n,
            "size": f"{request.size}x{request.size}",
        }
        # Empty means "do not send": gpt-image-1 refuses response_format, dall-e-2 refuses style.
        for key in ("response_format", "quality", "style"):
            if value := getattr(settings, key):
                payload[key] = value
        reply = await self._api.post(PATH, payload, headers=self._headers)
        if reply.status != 200:
            raise self._error(reply)
        data = reply.body.get("data") if isinstance(reply.body, dict) else None
        if not isinstance(data, list) or not data or not all(isinstance(item, dict) for item in data):
            raise self._api.bad_response("no data list of images")
        return [await self._image(item, request.size) for item in data[:n]]

    async def _image(self, item: dict[str, Any], size: int) -> bytes:
        if isinstance(item.get("b64_json"), str):
            return await self._api.png_from_base64(item["b64_json"], size)
        if isinstance(item.get("url"), str):
            # Upstream links expire within the hour: download now, store our own copy.
            return await self._api.png(await self._api.download(item["url"]), size)
        raise self._api.bad_response("an image with neither b64_json nor url")

    def _error(self, reply: Reply) -> ProviderError:
        # {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
        error = reply.body.get("error") if isinstance(reply.body, dict) else None
        error = error if isinstance(error, dict) else {}
        message = str(error.get("message") or "")
        code = error.get("code") or error.get("type")
        if code in CONTENT_POLICY_CODES:
            return ProviderError(
                f"The image API refused the prompt under its content policy: {clip(message)} "
                "Change the job's prompt, or [provider] prompt_template",
                code="content_policy",
                retryable=False,
            )
        if code == "insufficient_quota":
            # A 429, but no wait ends it: the account behind the key has run out of credit.
            return ProviderError(
                f"The image API says the account is out of quota (HTTP {reply.status}): {clip(message)} "
                "Check the plan and billing of the account behind the API key",
                code="provider_quota_exceeded",
                retryable=False,
            )
        if reply.status == 401:
            message = ""  # OpenAI quotes part of the key here: keep it out of job errors and logs
        return self._api.status_error(reply, message)


@contextlib.asynccontextmanager
async def open_openai(settings: ProviderSettings) -> AsyncIterator[OpenAIProvider]:
    """The provider with its own client session, open while the app runs."""
    openai = settings.openai
    if openai.api_key_env:
        what = 'the API key (or set api_key_env = "" for a server that needs none)'
        api_key = secret_from_env(openai.api_key_env, "provider.openai.api_key_env", what)
        auth_hint = f"check the API key in ${openai.api_key_env}"
    else:
        api_key = ""
        auth_hint = "the server wants an API key: set provider.openai.api_key_env to the variable holding it"
    async with ImageApi.open(
        settings,
        openai.base_url,
        name=f"the image API at {openai.base_url}",
        # 0: no limit of our own; workers.count bounds the calls, the API's 429s pace them.
        max_concurrency=settings.max_concurrency or None,
        auth_hint=auth_hint,
    ) as api:
        yield OpenAIProvider(api, openai, api_key)
