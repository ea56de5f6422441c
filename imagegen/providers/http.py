"""What the HTTP image providers share: a client session for the app's lifetime, timeouts, a
concurrency limit, failures turned into ProviderErrors a user can act on, and the check that
what came back is an image of the size asked for."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDictProxy
from PIL import Image

from ..settings_base import ConfigError
from .base import ProviderError

if TYPE_CHECKING:
    from . import ProviderSettings  # for annotations only: the package imports this module

# Enough of an upstream error message to act on; some servers send whole tracebacks.
DETAIL_MAX_CHARS = 300


@dataclass(frozen=True)
class Reply:
    """An answer of the API: its status, headers and JSON body (None when the body is not JSON)."""

    path: str
    status: int
    headers: CIMultiDictProxy[str]
    body: Any


class ImageApi:
    """One remote image API: its session, its concurrency limit, and its errors in words."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: ProviderSettings,
        base_url: str,
        *,
        name: str,
        max_concurrency: int | None,
        auth_hint: str,
        not_found_hint: str = "check its base_url",
    ) -> None:
        self._session = session
        self._settings = settings
        self.base_url = base_url
        self.name = name  # how messages name the API, e.g. "the image API at https://api.openai.com"
        self._auth_hint = auth_hint
        self._not_found_hint = not_found_hint
        self._limit: AbstractAsyncContextManager[Any] = (
            asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
        )

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: ProviderSettings, base_url: str, **options: Any) -> AsyncIterator[ImageApi]:
        """The API with one client session for the provider's lifetime, and the configured timeouts."""
        # No total timeout: a large batch may take long, and sock_read bounds each silence instead.
        timeout = aiohttp.ClientTimeout(
            total=None, connect=settings.connect_timeout_s, sock_read=settings.read_timeout_s
        )
        async with aiohttp.ClientSession(timeout=timeout) as session:
            yield cls(session, settings, base_url, **options)

    async def post(self, path: str, payload: dict[str, Any], **kwargs: Any) -> Reply:
        """POST `payload` as JSON to `path`, within the concurrency limit; any status comes back."""
        async with self._limit:
            with self._transport_errors(self.name):
                async with self._session.post(self.base_url + path, json=payload, **kwargs) as response:
                    raw = await response.read()
                    status, headers = response.status, response.headers
        # A batch of images in base64 is megabytes of JSON: parse it off the event loop.
        return Reply(path, status, headers, await asyncio.to_thread(_json_or_none, raw))

    async def download(self, url: str) -> bytes:
        """GET an image the API answered with a link to, outside the limit and without our
        credentials: the link is on another host, and expires, so it is fetched at once."""
        where = f"the image host {urlsplit(url).hostname}"
        with self._transport_errors(where):
            async with self._session.get(url) as response:
                if response.status != 200:
                    # A retry draws again and gets a fresh link.
                    raise ProviderError(
                        f"Downloading a generated image from {where} failed (HTTP {response.status})",
                        code="provider_unavailable",
                        retryable=True,
                    )
                return await response.read()

    async def png(self, data: bytes, size: int) -> bytes:
        """`data` as PNG bytes, once it decodes as a size x size image; else an invalid_image error.

        Not retryable: a server that answers with the wrong size, or with bytes that are not an
        image, answers the same request the same way again.
        """
        return await asyncio.to_thread(_checked_png, data, size, _capitalized(self.name))

    async def png_from_base64(self, text: str, size: int) -> bytes:
        """Like `png`, for an image the API sent as base64 text."""
        try:
            data = base64.b64decode(text)
        except (binascii.Error, ValueError):
            raise self.bad_response("an image that is not base64") from None
        return await self.png(data, size)

    def status_error(self, reply: Reply, detail: str = "") -> ProviderError:
        """The ProviderError for an answer that is not a success, with the API's own words."""
        status, detail = reply.status, clip(detail)
        said = f": {detail}" if detail else ""
        if status in (401, 403):
            return ProviderError(
                f"{_capitalized(self.name)} refused our credentials (HTTP {status}){said}; {self._auth_hint}",
                code="provider_auth",
                retryable=False,
            )
        if status == 429:
            wait = retry_after(reply.headers)
            asks = f"; it asks us to wait {wait:.0f} s" if wait is not None else ""
            return ProviderError(
                f"{_capitalized(self.name)} is rate limiting us (HTTP 429){said}{asks}",
                code="provider_rate_limited",
                retryable=True,
                retry_after=wait,
            )
        if status == 408 or status >= 500:
            return ProviderError(
                f"{_capitalized(self.name)} failed (HTTP {status}){said}",
                code="provider_unavailable",
                retryable=True,
            )
        if status == 404:
            return ProviderError(
                f"{_capitalized(self.name)} has no {reply.path} (HTTP 404){said}; {self._not_found_hint}",
                code="provider_bad_request",
                retryable=False,
            )
        if 400 <= status < 500:
            return ProviderError(
                f"{_capitalized(self.name)} refused the request (HTTP {status}){said}",
                code="provider_bad_request",
                retryable=False,
            )
        return self.bad_response(f"HTTP {status} instead of 200")

    def bad_response(self, what: str) -> ProviderError:
        """The answer was a success but not what the API documents; a retry would get the same."""
        return ProviderError(
            f"{_capitalized(self.name)} answered with something that is not its API's answer ({what}); "
            "check that base_url points at the right kind of server",
            code="provider_bad_response",
            retryable=False,
        )

    @contextlib.contextmanager
    def _transport_errors(self, where: str) -> Iterator[None]:
        settings = self._settings
        try:
            yield
        except aiohttp.ConnectionTimeoutError:
            raise ProviderError(
                f"Could not connect to {where} within {settings.connect_timeout_s:g} s "
                "(provider.connect_timeout_s)",
                code="provider_timeout",
                retryable=True,
            ) from None
        except TimeoutError:
            raise ProviderError(
                f"{_capitalized(where)} did not answer within {settings.read_timeout_s:g} s "
                "(provider.read_timeout_s)",
                code="provider_timeout",
                retryable=True,
            ) from None
        except aiohttp.ClientError as exc:
            # A connection error names the host and the reason; other client errors (a cut-off
            # body, a malformed link) could quote a signed link, so only their kind is shown.
            reason = str(exc) if isinstance(exc, aiohttp.ClientConnectionError) else ""
            raise ProviderError(
                f"Lost the connection to {where}: {clip(reason) or type(exc).__name__}",
                code="provider_unavailable",
                retryable=True,
            ) from None


def secret_from_env(variable: str, setting: str, what: str) -> str:
    """The secret held by environment variable `variable`, which `setting` names; a ConfigError
    at start-up when it is empty or not set, rather than every job failing later."""
    value = os.environ.get(variable, "")
    if not value:
        raise ConfigError(f"{setting}: the environment variable {variable} is not set; put {what} in it")
    return value


def retry_after(headers: CIMultiDictProxy[str]) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date); None if absent or unreadable."""
    value = headers.get("Retry-After", "").strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _checked_png(data: bytes, size: int, api_name: str) -> bytes:
    try:
        image = Image.open(io.BytesIO(data))
        if image.size == (size, size):
            image.load()  # decodes every pixel: a truncated or corrupt image fails here
    except Exception as exc:  # Pillow raises many kinds of error for bytes that are not an image
        raise ProviderError(
            f"{api_name} returned data that is not a readable image ({clip(str(exc)) or type(exc).__name__})",
            code="invalid_image",
            retryable=False,
        ) from None
    if image.size != (size, size):
        width, height = image.size
        raise ProviderError(
            f"{api_name} returned a {width}x{height} image instead of {size}x{size}: "
            "set [provider] image_size to a size the model draws",
            code="invalid_image",
            retryable=False,
        )
    if image.format == "PNG":
        return data
    # The service stores and serves PNG files: JPEG and WebP answers are converted.
    if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def clip(text: str) -> str:
    """An upstream message on one line, cut to DETAIL_MAX_CHARS."""
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_MAX_CHARS else text[: DETAIL_MAX_CHARS - 1] + "…"
