"""The default provider: draws a picture of the job's animal offline with Pillow."""

from __future__ import annotations

import asyncio
import io
from typing import TYPE_CHECKING

from .base import ImageRequest, ProviderError
from .local_art import ANIMALS, draw

if TYPE_CHECKING:
    from . import ProviderSettings  # for annotations only: the package imports this module


class LocalProvider:
    """Deterministic cartoon animals: the same job and index always give the same PNG."""

    def __init__(self, settings: ProviderSettings) -> None:
        self._delay_s = settings.delay_s
        self._fail_attempts = settings.fail_attempts

    async def generate(self, request: ImageRequest) -> list[bytes]:
        # One image per call, whatever request.count: the latency of delay_s is per image.
        if request.animal not in ANIMALS:
            raise ProviderError(f"The local provider cannot draw a {request.animal!r}", code="unknown_animal")
        if self._delay_s:
            await asyncio.sleep(self._delay_s)  # simulated provider latency, by configuration
        if request.attempt <= self._fail_attempts:
            # Simulated transient failure, by configuration (provider.fail_attempts).
            raise ProviderError(
                f"Simulated failure of attempt {request.attempt} (provider.fail_attempts = {self._fail_attempts})",
                code="simulated_failure",
                retryable=True,
            )
        # Drawing and PNG encoding take tens of milliseconds of CPU: keep them off the loop.
        return [await asyncio.to_thread(_render_png, request)]


def _render_png(request: ImageRequest) -> bytes:
    image = draw(request.animal, request.seed, request.size)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
