"""The API's concepts as pydantic models: one model per concept, used from database row to JSON."""

from __future__ import annotations

import enum
import functools
import json
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    computed_field,
    create_model,
    field_serializer,
)
from pydantic.alias_generators import to_camel

from .config import Settings


def now_text() -> str:
    """The current time as ISO 8601 UTC with milliseconds and Z: the one time format of the
    API and the database."""
    return time_text(time.time_ns() // 1_000_000)


def time_text(milliseconds: int) -> str:
    """A Unix time in milliseconds, in the API's time format (now_text's)."""
    seconds, millis = divmod(milliseconds, 1000)
    return f"{_second_text(seconds)}.{millis:03d}Z"


@functools.lru_cache(maxsize=4)
def _second_text(seconds: int) -> str:
    # Every write stamps the time: formatting each second once keeps that off the hot path.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


# Stored in both databases already in the API's format (ISO 8601 UTC, milliseconds, Z), so a job goes
# from row to JSON without parsing and re-formatting every timestamp on every read.
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]

# A job id is a UUID in its 8-4-4-4-12 hex form, in either case (ids are stored lowercase).
JOB_ID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"

# Long enough for a scene description, short enough to keep rows and provider calls small.
PROMPT_MAX_LENGTH = 500


# Makes a job's image URL from its id and the image's index (the HTTP layer supplies it).
ImageUrl = Callable[[str, int], str]


def _relative_image_url(job_id: str, index: int) -> str:
    return f"/images/{job_id}/{index}.png"


class JobStatus(enum.StrEnum):
    """Where a job is in its life; schema.sql lists the allowed transitions."""

    PENDING = "pending"  # committed, waiting for a worker
    PROCESSING = "processing"  # a worker is drawing its images
    COMPLETED = "completed"  # every image is stored (terminal)
    FAILED = "failed"  # it could not be drawn; see `error` (terminal)
    CANCELED = "canceled"  # a client canceled it (terminal)

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED})


# The events a webhook may ask for: those the SSE streams carry.
WebhookEvent = Literal[
    "job.created", "job.processing", "job.progress", "job.retrying", "job.requeued",
    "job.completed", "job.failed", "job.canceled", "job.deleted",
]


class _CamelModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)


class CreateJob(_CamelModel):
    """Body of POST /generations."""

    # strict: `true` and "3" are not numbers of images; unknown fields are mistakes.
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=False, extra="forbid", strict=True, frozen=True
    )

    num_images: int = Field(ge=1, description="How many images to draw (at most jobs.max_images_per_job).")
    animal: str | None = Field(
        default=None, description="One of the configured animals; drawn at random when absent."
    )
    prompt: str | None = Field(
        default=None,
        min_length=1,
        max_length=PROMPT_MAX_LENGTH,
        # No NUL: PostgreSQL's text cannot hold it, and no image prompt needs it. Refused on
        # both backends alike, so a request means the same wherever it is stored.
        pattern=r"^[^\x00]*$",
        description="Optional free text added to the provider's prompt for this animal (no NUL characters).",
    )

    webhook: str | None = Field(
        default=None,
        max_length=2048,
        description="An absolute URL, of scheme http or https, to POST the job's events to (Standard Webhooks "
        "signatures; no credentials in it, a port among [webhooks] allowed_ports).",
    )
    webhook_events: list[WebhookEvent] | None = Field(
        default=None,
        min_length=1,
        description="Which events to POST to the webhook (default: job.completed, job.failed, job.canceled).",
    )

    @classmethod
    @functools.cache
    def configured(cls, settings: Settings) -> type[CreateJob]:
        """This body narrowed to the configured limit and animals: what POST /generations
        validates and what the API document shows, from the one model."""
        jobs, fields = settings.jobs, cls.model_fields
        return create_model(
            cls.__name__,
            __base__=cls,
            __doc__=cls.__doc__,
            num_images=(Annotated[int, Field(le=jobs.max_images_per_job)], fields["num_images"]),
            animal=(Literal[jobs.animals] | None, fields["animal"]),
        )


class JobAccepted(_CamelModel):
    """Body of the 202 answer to POST /generations."""

    job_id: str
    status: JobStatus


class JobError(_CamelModel):
    """Why a job failed."""

    code: str = Field(description="Machine-readable reason, e.g. provider_error.")
    message: str = Field(description="What went wrong, in words a user can act on.")
    retryable: bool = Field(description="Whether the failure was transient (a retry might succeed).")


class Progress(_CamelModel):
    """How many of the job's images are stored."""

    done: int
    total: int


class Job(_CamelModel):
    """A generation job: the row in the database, and the body of GET /generations/{jobId}."""

    # Its place in creation order (the list cursor); not part of the API's JSON.
    seq: int = Field(exclude=True)
    # The tenant (API key name) that created it; None for a job made with auth off. Internal:
    # it decides who may see the job, and is never shown.
    owner: str | None = Field(default=None, exclude=True)
    job_id: str
    status: JobStatus
    num_images: int
    animal: str
    prompt: str | None
    # Stored image paths relative to data_dir; the API shows them as absolute URLs.
    images: tuple[str, ...] = Field(serialization_alias="imageUrls")
    attempts: int = Field(description="How many times a worker has taken the job up.")
    # Where a pending job stands among the pending jobs (1 = next); it changes without the job
    # changing, so it is not stored: the caller supplies it when rendering.
    queue_position: int | None = None
    error: JobError | None
    created_at: Timestamp
    updated_at: Timestamp
    started_at: Timestamp | None
    completed_at: Timestamp | None
    def to_json(self, image_url: ImageUrl, queue_position: int | None = None) -> bytes:
        """The job as GET /generations/{jobId} shows it, each image's URL made by `image_url`
        (job id, index) and, if it is pending, its current `queue_position`."""
        context = {"image_url": image_url, "queue_position": queue_position}
        return self.model_dump_json(by_alias=True, context=context).encode()

    @computed_field  # derived from the stored images, never stored itself
    @property
    def progress(self) -> Progress:
        return Progress(done=len(self.images), total=self.num_images)

    @field_serializer("queue_position")
    def _queue_position(self, _: int | None, info: SerializationInfo) -> int | None:
        return (info.context or {}).get("queue_position") if self.status is JobStatus.PENDING else None

    @field_serializer("images")
    def _image_urls(self, images: tuple[str, ...], info: SerializationInfo) -> list[str]:
        # The URL depends on the request (its base, and with auth a signature), so it comes in
        # the serialisation context rather than living in the model.
        image_url = (info.context or {}).get("image_url", _relative_image_url)
        return [image_url(self.job_id, index) for index in range(len(images))]

    @classmethod
    def from_row(cls, row: Any) -> Job:
        """Build a Job from a `SELECT * FROM jobs` row (sqlite3.Row, or a dict of one).

        The row is trusted (the schema's types and CHECKs hold), so validation is skipped:
        this runs for every change and every read.
        """
        error = None
        if row["error_code"] is not None:
            error = JobError.model_construct(
                code=row["error_code"],
                message=row["error_message"],
                retryable=bool(row["error_retryable"]),
            )
        try:
            owner = row["owner"]
        except (KeyError, IndexError):  # an event snapshot from before tenants existed
            owner = None
        return cls.model_construct(
            seq=row["seq"],
            owner=owner,
            status=JobStatus(row["status"]),
            job_id=row["id"],
            num_images=row["num_images"],
            animal=row["animal"],
            prompt=row["prompt"],
            images=tuple(json.loads(row["images"])),
            attempts=row["attempts"],
            error=error,
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            started_at=row["started_at"],
            completed_at=row["completed_at"],
        )


class JobPage(_CamelModel):
    """One page of GET /generations, newest first."""

    jobs: list[Job]
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null on the last page.")


class DeliveryAttempt(_CamelModel):
    """One attempt at a webhook delivery."""

    at: Timestamp = Field(description="When the attempt started.")
    duration_ms: int = Field(description="How long it took, in milliseconds.")
    status: int | None = Field(description="The receiver's HTTP status, if it answered.")
    error: str | None = Field(
        description="What went wrong if it did not answer: timeout, connection_error, dns_error or "
        "blocked_address (the host resolves to an address webhooks may not reach)."
    )
    detail: str | None = Field(description="A word more on it (for a 429, its Retry-After).")


class DeliveryView(_CamelModel):
    """One event of a job, POSTed (or to be POSTed) to its webhook."""

    delivery_id: str = Field(description="Its webhook-id header: the same on every attempt.")
    event: WebhookEvent
    event_id: int = Field(description="The event's id, as on the SSE streams.")
    url: str
    status: Literal["pending", "delivered", "failed", "given_up"] = Field(
        description="pending (an attempt is due or under way), delivered (a 2xx), failed (a final answer "
        "or a blocked address) or given_up (retried for [webhooks] retry_for_s)."
    )
    created_at: Timestamp
    attempts: list[DeliveryAttempt]
    next_attempt_at: Timestamp | None = Field(description="When the next attempt is due, if pending.")


class DeliveryList(_CamelModel):
    """Body of GET /generations/{jobId}/deliveries."""

    deliveries: list[DeliveryView] = Field(description="In event order.")
