"""The automatic1111 provider: Stable Diffusion WebUI (AUTOMATIC1111 or Forge), its txt2img API."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

import aiohttp
from pydantic import Field, model_validator

from ..settings_base import BaseUrl, Section
from .base import ImageRequest
from .http import ImageApi, secret_from_env

if TYPE_CHECKING:
    from . import ProviderSettings  # for annotations only: the package imports this module

PATH = "/sdapi/v1/txt2img"


class Automatic1111Settings(Section):
    base_url: BaseUrl = "http://127.0.0.1:7860"
    steps: Annotated[int, Field(ge=1, le=150)] = 20
    negative_prompt: str = ""
    sampler_name: str = ""
    max_batch_size: Annotated[int, Field(ge=1, le=100)] = 1
    username: str = ""
    password_env: str = ""

    @model_validator(mode="after")
    def _password_with_username(self) -> Automatic1111Settings:
        if self.username and not self.password_env:
            raise ValueError("with a username, password_env must name the variable holding the password")
        return self


class Automatic1111Provider:
    """Draws a job's images in batches of up to `max_batch_size`, seeded so that a batch draws
    what one call per image would."""

    def __init__(self, api: ImageApi, settings: Automatic1111Settings, headers: dict[str, str]) -> None:
        self._api = api
        self._settings = settings
        self._headers = headers

    async def generate(self, request: ImageRequest) -> list[bytes]:
        settings = self._settings
        batch_size = min(request.count, settings.max_batch_size)
        payload: dict[str, Any] = {
            "prompt": request.prompt,
            "negative_prompt": settings.negative_prompt,
            "width": request.size,
            "height": request.size,
            "steps": settings.steps,
            "batch_size": batch_size,
            "n_iter": 1,
            # The server seeds the batch's images seed, seed + 1, ...: the seeds of index, index + 1, ...
            "seed": request.seed,
        }
        if settings.sampler_name:
            payload["sampler_name"] = settings.sampler_name
        reply = await self._api.post(PATH, payload, headers=self._headers)
        if reply.status != 200:
            raise self._api.status_error(reply, _detail(reply.body))
        images = reply.body.get("images") if isinstance(reply.body, dict) else None
        if not isinstance(images, list) or not images or not all(isinstance(image, str) for image in images):
            raise self._api.bad_response("no images list")
        return [await self._api.png_from_base64(image, request.size) for image in images[:batch_size]]


def _detail(body: Any) -> str:
    """The words of an error: FastAPI's {"detail": ...}, or {"error", "detail", "body", "errors"}."""
    if not isinstance(body, dict):
        return ""
    detail = body.get("detail")
    if isinstance(detail, list):  # request validation: [{"loc": [...], "msg": ..., "type": ...}]
        return "; ".join(
            f"{'.'.join(str(part) for part in item.get('loc', []))}: {item.get('msg', '')}"
            for item in detail
            if isinstance(item, dict)
        )
    if detail:
        return str(detail)
    if body.get("error"):
        return f"{body['error']}: {body.get('errors') or ''}".rstrip(": ")
    return ""


@contextlib.asynccontextmanager
async def open_automatic1111(settings: ProviderSettings) -> AsyncIterator[Automatic1111Provider]:
    """The provider with its own client session, open while the app runs."""
    webui = settings.automatic1111
    if webui.username:
        setting = "provider.automatic1111.password_env"
        password = secret_from_env(webui.password_env, setting, "the --api-auth password")
        headers = {"Authorization": aiohttp.encode_basic_auth(webui.username, password)}
        auth_hint = f"check provider.automatic1111.username and the password in ${webui.password_env}"
    else:
        headers = {}
        auth_hint = "the server wants a login (--api-auth): set its username and password_env"
    async with ImageApi.open(
        settings,
        webui.base_url,
        name=f"AUTOMATIC1111 at {webui.base_url}",
        # The server draws one request at a time and queues the rest: a second request in
        # flight would only wait there, eating its read timeout.
        max_concurrency=settings.max_concurrency or 1,
        auth_hint=auth_hint,
        not_found_hint="check its base_url, and that it runs with --api",
    ) as api:
        yield Automatic1111Provider(api, webui, headers)
