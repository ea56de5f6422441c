"""The provider interface: what a provider is asked for, what it raises, and what it is.

Apart from the registry (in __init__.py) so that each provider module can import it while the
registry imports the provider modules, for their settings.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol


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
