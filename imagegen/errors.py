"""Domain errors: what went wrong, in the service's own terms. They know nothing of HTTP;
api/problems.py maps each to a status and a problem+json body.

Each is a small class whose docstring is its default message.
"""

from __future__ import annotations


class ImagegenError(Exception):
    """Something went wrong."""

    def __init__(self, detail: str | None = None) -> None:
        self.detail = detail or (self.__doc__ or "").strip()
        super().__init__(self.detail)


class InvalidJob(ImagegenError):
    """The job asked for is not one this service makes."""

    def __init__(self, detail: str, *, field: str, reason: str) -> None:
        super().__init__(detail)
        self.field = field  # the request field at fault, by its API name (numImages, animal)
        self.reason = reason


class IdempotencyKeyReused(ImagegenError):
    """This Idempotency-Key was already used with a different request body."""


class JobNotFound(ImagegenError):
    """No job has this id."""


class JobConflict(ImagegenError):
    """The job is not in a state that allows this."""


class QueueFull(ImagegenError):
    """Too many jobs are waiting; try again later."""

    def __init__(self, detail: str | None = None, *, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class StoreUnavailable(ImagegenError):
    """The store cannot write (or answer) for now; nothing was written; try again later.

    A worker that meets one keeps its job's outcome and records it once the store answers
    again, under `code`; a client gets 503 with Retry-After.
    """

    retry_after_s = 5
    code = "store_unavailable"


class StorageFull(StoreUnavailable):
    """The disk is full: nothing could be written; try again once space is freed."""

    retry_after_s = 30
    code = "storage_full"


class DatabaseUnavailable(StoreUnavailable):
    """The database cannot be reached: nothing was written; try again shortly."""

    retry_after_s = 5
    code = "database_unavailable"


class StartupError(ImagegenError):
    """The service cannot start; the message says why, in one line."""
