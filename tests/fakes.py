"""Faithful fakes of the image APIs the providers call, served by aiohttp test servers, and
the helpers that open a provider against them.

They follow the real request and response shapes, error bodies included, and keep a record of
what they were sent. Knobs on each fake script the awkward answers: errors, images of another
size or format, and answers held back (on an asyncio.Event) until the test lets them go.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from PIL import Image

from imagegen.providers import REGISTRY, ImageProvider, ImageRequest, ProviderError

from .conftest import make_settings


@contextlib.asynccontextmanager
async def open_provider(data_dir: Path, provider: dict[str, Any]) -> AsyncIterator[ImageProvider]:
    """The provider that these [provider] settings (over config.toml) name, opened as the app opens it."""
    settings = make_settings(data_dir, provider=provider).provider
    async with REGISTRY[settings.name](settings) as opened:
        yield opened


async def provider_failure(data_dir: Path, provider: dict[str, Any], request: ImageRequest) -> ProviderError:
    """The ProviderError the provider raises for `request`."""
    async with open_provider(data_dir, provider) as opened:
        with pytest.raises(ProviderError) as info:
            await opened.generate(request)
    return info.value


def assert_png(data: bytes, size: int) -> Image.Image:
    """`data` decoded, once it is a whole PNG of size x size pixels."""
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == (size, size)
    image.load()
    return image


@dataclass
class Scripted:
    """An answer given instead of drawing: status, JSON body (or raw text), headers."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)

    def response(self) -> web.Response:
        if isinstance(self.body, str):
            return web.Response(status=self.status, text=self.body, headers=self.headers)
        return web.json_response(self.body, status=self.status, headers=self.headers)


def picture(width: int, height: int, colour: int, image_format: str = "PNG") -> bytes:
    """A small real picture: a gradient tinted by `colour`, encoded as `image_format`."""
    tint = Image.new("RGB", (width, height), tuple((colour * k) % 256 for k in (67, 131, 199)))
    gradient = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    buffer = io.BytesIO()
    Image.blend(tint, gradient, 0.4).save(buffer, format=image_format)
    return buffer.getvalue()


class _Fake:
    def __init__(self) -> None:
        self.url = ""  # where the test server listens, set by the fixture that starts it
        self.scripted: list[Scripted] = []  # answered, in order, before anything is drawn
        self.held: asyncio.Event | None = None  # while set to an unset Event, answers wait for it
        self.arrived = asyncio.Event()  # set when a call reaches the drawing step

    def hold(self) -> None:
        """Hold every answer back until release(): a server that is slow to draw."""
        self.held = asyncio.Event()

    def release(self) -> None:
        if self.held is not None:
            self.held.set()

    async def _drawing(self) -> None:
        self.arrived.set()
        if self.held is not None:
            await self.held.wait()


# --- OpenAI images API ------------------------------------------------------------------------

# What each model accepts, as the real API enforces it.
OPENAI_MODELS: dict[str, dict[str, Any]] = {
    "dall-e-2": {"sizes": {"256x256", "512x512", "1024x1024"}, "max_n": 10, "response_format": True},
    "dall-e-3": {"sizes": {"1024x1024", "1792x1024", "1024x1792"}, "max_n": 1, "response_format": True},
    "gpt-image-1": {
        "sizes": {"1024x1024", "1536x1024", "1024x1536", "auto"}, "max_n": 10, "response_format": False,
    },
}


def openai_error(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The body of every OpenAI API error."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class FakeOpenAI(_Fake):
    """POST /v1/images/generations with a Bearer key; image links that work exactly once."""

    # A prompt with this word is refused by the "safety system".
    BANNED = "forbidden"

    def __init__(self, api_key: str) -> None:
        super().__init__()
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []  # JSON bodies of the generation calls
        self.downloads: list[tuple[int, str | None]] = []  # (status answered, Authorization sent)
        self.image_format = "PNG"  # what the drawn images are encoded as
        self.draw_size: tuple[int, int] | None = None  # draw this size instead of the one asked
        self.image_bytes: bytes | None = None  # answer with these bytes instead of a picture
        self._links: dict[str, bytes] = {}
        self._drawn = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/images/generations", self._generations)
        app.router.add_get("/blob/{name}", self._blob)
        return app

    async def _generations(self, request: web.Request) -> web.Response:
        sent = request.headers.get("Authorization")
        if sent is None:
            return web.json_response(
                openai_error(
                    "You didn't provide an API key. You need to provide your API key in an Authorization "
                    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                    "invalid_request_error",
                ),
                status=401,
            )
        if sent != f"Bearer {self.api_key}":
            key = sent.removeprefix("Bearer ")
            return web.json_response(
                openai_error(
                    f"Incorrect API key provided: {key[:3]}{'*' * max(len(key) - 7, 0)}{key[-4:]}. You can "
                    "find your API key at https://platform.openai.com/account/api-keys.",
                    "invalid_request_error",
                    code="invalid_api_key",
                ),
                status=401,
            )
        try:
            body = await request.json()
        except ValueError:
            return web.json_response(openai_error("We could not parse the JSON body of your request.",
                                                  "invalid_request_error"), status=400)
        self.requests.append(body)
        if self.scripted:
            return self.scripted.pop(0).response()
        refusal = self._refusal(body)
        if refusal is not None:
            return web.json_response(refusal, status=400)
        await self._drawing()
        width, height = self.draw_size or tuple(int(side) for side in body["size"].split("x"))
        data = []
        for _ in range(body.get("n", 1)):
            self._drawn += 1
            image = self.image_bytes or picture(width, height, self._drawn, self.image_format)
            links = OPENAI_MODELS[body["model"]]["response_format"]  # gpt-image-1 always answers b64_json
            if links and body.get("response_format", "url") == "url":
                name = f"img-{secrets.token_hex(8)}.png"
                self._links[name] = image
                # Like the real links: signed, on blob storage, valid for an hour.
                signature = f"se=2030-01-01T00%3A00%3A00Z&sig={secrets.token_hex(16)}"
                url = f"{request.url.origin()}/blob/{name}?{signature}"
                data.append({"url": url, "revised_prompt": body["prompt"]})
            else:
                data.append({"b64_json": base64.b64encode(image).decode(), "revised_prompt": body["prompt"]})
        return web.json_response({"created": int(time.time()), "data": data})

    def _refusal(self, body: dict[str, Any]) -> dict[str, Any] | None:
        model = OPENAI_MODELS.get(body.get("model", "dall-e-2"))
        if model is None:
            return openai_error(
                f"Invalid value: '{body['model']}'. "
                "Supported values are: 'gpt-image-1', 'dall-e-2' and 'dall-e-3'.",
                "invalid_request_error", "model", "invalid_value",
            )
        if not isinstance(body.get("prompt"), str) or not body["prompt"]:
            return openai_error("Missing required parameter: 'prompt'.", "invalid_request_error", "prompt",
                                "missing_required_parameter")
        if "response_format" in body and not model["response_format"]:
            return openai_error("Unknown parameter: 'response_format'.", "invalid_request_error",
                                "response_format", "unknown_parameter")
        n = body.get("n", 1)
        if n > model["max_n"]:
            if model["max_n"] == 1:
                return openai_error("You must provide n=1 for this model.", "invalid_request_error", "n")
            return openai_error(
                "Invalid 'n': integer above maximum value. "
                f"Expected a value <= {model['max_n']}, but got {n} instead.",
                "invalid_request_error", "n", "integer_above_max_value",
            )
        if body.get("size", "1024x1024") not in model["sizes"]:
            return openai_error("The size is not supported by this model.", "invalid_request_error", None,
                                "invalid_size")
        if self.BANNED in body["prompt"]:
            return openai_error(
                "Your request was rejected as a result of our safety system. Your prompt may contain text "
                "that is not allowed by our safety system.",
                "invalid_request_error", None, "content_policy_violation",
            )
        return None

    async def _blob(self, request: web.Request) -> web.Response:
        # A link serves its image once, then is gone: proof that the provider downloads at once.
        image = self._links.pop(request.match_info["name"], None)
        status = 200 if image is not None else 404
        self.downloads.append((status, request.headers.get("Authorization")))
        if image is None:
            return web.Response(
                status=404, content_type="application/xml",
                text='<?xml version="1.0" encoding="utf-8"?><Error><Code>BlobNotFound</Code>'
                     "<Message>The specified blob does not exist.</Message></Error>",
            )
        return web.Response(body=image, content_type="image/png")


# --- AUTOMATIC1111 / Forge WebUI API ----------------------------------------------------------

SAMPLERS = ("DPM++ 2M", "Euler a", "Euler", "DDIM")


def webui_error(error: str, detail: str, status: int) -> dict[str, Any]:
    """The body the WebUI's own exception handler gives (HTTPException and any other error)."""
    errors = f"{status}: {detail}" if detail else error
    return {"error": error, "detail": detail, "body": "", "errors": errors}


class FakeAutomatic1111(_Fake):
    """POST /sdapi/v1/txt2img of a WebUI started with --api (and --api-auth if `credentials`).

    The real server queues a request that arrives while it draws another; this one fails it
    with a 500 and counts it in `overlaps`, so a test can show the provider never sends one.
    """

    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        super().__init__()
        self.credentials = credentials
        self.requests: list[dict[str, Any]] = []
        self.overlaps = 0
        self.samples_format = "PNG"  # the server's "File format for images" option
        self._busy = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/sdapi/v1/txt2img", self._txt2img)
        return app

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        if self.credentials is None:
            return None
        header = request.headers.get("Authorization", "")
        detail = "Not authenticated"
        if header.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user = password = ""
            if (user, password) == self.credentials:
                return None
            detail = "Incorrect username or password"
        # The WebUI's handler drops the WWW-Authenticate header of the HTTPException.
        return web.json_response(webui_error("HTTPException", detail, 401), status=401)

    async def _txt2img(self, request: web.Request) -> web.Response:
        refused = self._unauthorized(request)
        if refused is not None:
            return refused
        try:
            body = await request.json()
        except ValueError:
            return web.json_response(
                {"detail": [{"loc": ["body"], "msg": "value is not a valid dict",
                             "type": "type_error.dict"}]},
                status=422,
            )
        invalid = [
            {"loc": ["body", key], "msg": f"value is not a valid {kind.__name__}",
             "type": f"type_error.{kind.__name__}"}
            for key, kind in (("prompt", str), ("negative_prompt", str), ("width", int), ("height", int),
                              ("steps", int), ("batch_size", int), ("n_iter", int), ("seed", int))
            if key in body and not isinstance(body[key], kind)
        ]
        if invalid:
            return web.json_response({"detail": invalid}, status=422)
        self.requests.append(body)
        if self.scripted:
            return self.scripted.pop(0).response()
        if "sampler_name" in body and body["sampler_name"] not in SAMPLERS:
            return web.json_response(webui_error("HTTPException", "Sampler not found", 400), status=400)
        if self._busy:
            self.overlaps += 1
            return web.json_response(
                {"error": "RuntimeError", "detail": "", "body": "",
                 "errors": "the fake WebUI got a second request while it was drawing"},
                status=500,
            )
        self._busy = True
        try:
            await self._drawing()
            images = await asyncio.to_thread(self._draw, body)  # yields to the loop, as drawing would
        finally:
            self._busy = False
        seed = body.get("seed", -1)
        seeds = [seed + i for i in range(body.get("batch_size", 1))]
        info = {"prompt": body.get("prompt", ""), "all_seeds": seeds, "seed": seed}
        return web.json_response({"images": images, "parameters": body, "info": json.dumps(info)})

    def _draw(self, body: dict[str, Any]) -> list[str]:
        # The latent space is 8 times smaller: sizes are rounded down to a multiple of 8.
        width, height = body.get("width", 512) // 8 * 8, body.get("height", 512) // 8 * 8
        seed = body.get("seed", -1)
        return [
            base64.b64encode(picture(width, height, seed + i, self.samples_format)).decode()
            for i in range(body.get("batch_size", 1))
        ]
