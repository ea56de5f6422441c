"""Image providers: the one strategy of the service, chosen by `[provider] name`.

A provider turns one ImageRequest into PNG bytes. It knows nothing of HTTP routes, the
database or the queue. Each registry entry is a factory that opens the provider for the
app's lifetime (an async context manager, so a provider can own a client session).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from ..config import SETTINGS, ProviderSettings


@dataclass(frozen=True)
class ImageRequest:
    """One image to draw: the index-th image of a job."""

    job_id: str
    index: int
    animal: str
    size: int
    attempt: int  # which attempt at the job this is, from 1
    prompt: str  # what to draw, in words: the configured template over the animal plus the job's prompt

    @property
    def seed(self) -> int:
        """A stable seed per (job, index): the same request draws the same picture."""
        digest = hashlib.sha256(f"{self.job_id}:{self.index}".encode()).digest()
        return int.from_bytes(digest[:8], "big")


class ProviderError(Exception):
    """The provider could not draw the image."""

    code = "provider_error"
    # Transient failures (timeouts, 429, 5xx, lost connections) may succeed when retried;
    # the rest (bad request, refused credentials, content policy) never will.
    retryable = False

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message or (self.__doc__ or "").strip())
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable
        # Seconds the provider asked us to wait (a 429's Retry-After), if it said.
        self.retry_after = retry_after


def render_prompt(template: str, animal: str, extra: str | None) -> str:
    """The prompt for one job: the configured template over its animal, then its own words."""
    prompt = template.format(animal=animal)
    return f"{prompt}. {extra}" if extra else prompt


class ImageProvider(Protocol):
    """Draws images."""

    async def generate(self, request: ImageRequest) -> bytes:
        """Return the PNG bytes of the requested image, or raise ProviderError."""
        ...


ProviderFactory = Callable[[ProviderSettings], AbstractAsyncContextManager[ImageProvider]]


def _local(settings: ProviderSettings) -> AbstractAsyncContextManager[ImageProvider]:
    from .local import LocalProvider

    return contextlib.nullcontext(LocalProvider(settings))


REGISTRY: dict[str, ProviderFactory] = {"local": _local}

PROVIDER = web.AppKey("provider", ImageProvider)


async def provider_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the configured provider is open while the app runs."""
    settings = app[SETTINGS].provider
    async with REGISTRY[settings.name](settings) as provider:
        app[PROVIDER] = provider
        yield
