"""Image providers: the one strategy of the service, chosen by `[provider] name`.

A provider turns one ImageRequest into PNG bytes: the next image of a job, or a batch of the
next few when its backend draws several in one call. It knows nothing of HTTP routes, the
database or the queue. Each registry entry is a factory that opens the provider for the
app's lifetime (an async context manager, so a provider can own a client session).

Each provider module holds its own settings section; ProviderSettings, the [provider] section,
gathers them here, beside the registry that its `name` is checked against.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Annotated

from aiohttp import web
from pydantic import Field, field_validator

from ..settings_base import Section
from .automatic1111 import Automatic1111Settings, open_automatic1111
from .base import ImageProvider, ImageRequest, ProviderError, render_prompt
from .local import LocalProvider
from .openai import OpenAISettings, open_openai

__all__ = [
    "PROVIDER",
    "REGISTRY",
    "ImageProvider",
    "ImageRequest",
    "ProviderError",
    "ProviderSettings",
    "provider_context",
    "render_prompt",
]


class ProviderSettings(Section):
    name: str = "local"
    delay_s: Annotated[float, Field(ge=0)] = 0.0
    image_size: Annotated[int, Field(ge=64, le=2048)] = 512
    fail_attempts: Annotated[int, Field(ge=0)] = 0
    prompt_template: str = "A cute cartoon {animal}, friendly sticker illustration, soft pastel background"
    # 0: the provider's own limit (1 for automatic1111, none for openai beyond workers.count).
    max_concurrency: Annotated[int, Field(ge=0, le=256)] = 0
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    read_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    openai: OpenAISettings = OpenAISettings()
    automatic1111: Automatic1111Settings = Automatic1111Settings()

    @field_validator("prompt_template")
    @classmethod
    def _names_the_animal(cls, value: str) -> str:
        try:
            value.format(animal="cat")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"must be a template using only {{animal}}: {exc}") from None
        return value

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str) -> str:
        if value not in REGISTRY:
            raise ValueError(f"unknown provider {value!r}; known: {', '.join(sorted(REGISTRY))}")
        return value


ProviderFactory = Callable[[ProviderSettings], AbstractAsyncContextManager[ImageProvider]]


def _local(settings: ProviderSettings) -> AbstractAsyncContextManager[ImageProvider]:
    return contextlib.nullcontext(LocalProvider(settings))


REGISTRY: dict[str, ProviderFactory] = {
    "local": _local,
    "openai": open_openai,
    "automatic1111": open_automatic1111,
}

PROVIDER = web.AppKey("provider", ImageProvider)


def provider_context(settings: ProviderSettings) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context: the provider `settings` name is open while the app runs."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        async with REGISTRY[settings.name](settings) as provider:
            app[PROVIDER] = provider
            yield

    return context
