"""server.py with one more provider, "predrawn", for bench/e2e_bench.py only: every image is the
same PNG, drawn once at start-up, so a job costs the service's own work and nothing of drawing.

    .venv/bin/python bench/predrawn_server.py [server.py arguments]   # with IMAGEGEN_PROVIDER__NAME=predrawn
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

import server  # noqa: E402
from imagegen.providers import REGISTRY, ImageRequest, ProviderSettings  # noqa: E402


class PredrawnProvider:
    def __init__(self, settings: ProviderSettings) -> None:
        buffer = io.BytesIO()
        Image.new("RGB", (settings.image_size, settings.image_size), (250, 200, 120)).save(buffer, format="PNG")
        self._png = buffer.getvalue()

    async def generate(self, request: ImageRequest) -> list[bytes]:
        return [self._png] * request.count  # the whole batch at once, as a batching API answers


REGISTRY["predrawn"] = lambda settings: contextlib.nullcontext(PredrawnProvider(settings))

if __name__ == "__main__":
    sys.exit(server.main())
