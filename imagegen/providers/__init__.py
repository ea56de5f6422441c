"""Image providers: the one strategy of the service, chosen by `[provider] name`.

A provider turns one ImageRequest into PNG bytes: the next image of a job, or a batch of the
next few when its backend draws several in one call. It knows nothing of HTTP routes, the
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
    """Images to draw: the index-th image of a job, and up to count - 1 of the ones after it."""

    job_id: str
    index: int
    animal: str
    size: int
    attempt: int  # which attempt at the job this is, from 1
    prompt: str  # what to draw, in words: the configured template over the animal plus the job's prompt
    count: int = 1  # how many of the job's images are still wanted, from index on

    @property
    def seed(self) -> int:
        """A stable seed per (job, index): the same request draws the same picture.

        Consecutive within a job, because a batch seeded with s draws its images with s, s + 1, ...
        (AUTOMATIC1111 does), so a batch draws what one call per image would. Below 2**32,
        which every backend accepts.
        """
        digest = hashlib.sha256(self.job_id.encode()).digest()
        return int.from_bytes(digest[:4], "big") % 2**31 + self.index


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

    async def generate(self, request: ImageRequest) -> list[bytes]:
        """Return the PNG bytes of the requested images from `request.index` on, in order: at
        least one and at most `request.count`, as many as the backend draws in one call.
        Raise ProviderError when it cannot."""
        ...


ProviderFactory = Callable[[ProviderSettings], AbstractAsyncContextManager[ImageProvider]]


def _local(settings: ProviderSettings) -> AbstractAsyncContextManager[ImageProvider]:
    from .local import LocalProvider

    return contextlib.nullcontext(LocalProvider(settings))


def _openai(settings: ProviderSettings) -> AbstractAsyncContextManager[ImageProvider]:
    from .openai import open_openai

    return open_openai(settings)


def _automatic1111(settings: ProviderSettings) -> AbstractAsyncContextManager[ImageProvider]:
    from .automatic1111 import open_automatic1111

    return open_automatic1111(settings)


REGISTRY: dict[str, ProviderFactory] = {"local": _local, "openai": _openai, "automatic1111": _automatic1111}

PROVIDER = web.AppKey("provider", ImageProvider)


async def provider_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the configured provider is open while the app runs."""
    settings = app[SETTINGS].provider
    async with REGISTRY[settings.name](settings) as provider:
        app[PROVIDER] = provider
        yield
