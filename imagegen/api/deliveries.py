"""GET /generations/{jobId}/deliveries and POST .../deliveries/{deliveryId}/retry: a job's webhook
deliveries, scoped to its tenant like every job route (another tenant's job is not found)."""

from __future__ import annotations

import re
import time

from aiohttp import web
from pydantic import BaseModel, Field

from ..errors import JobConflict, JobNotFound
from ..jobs import JOBS
from ..models import DeliveryList, DeliveryView, now_text, time_text
from ..store import STORE
from ..store.deliveries import Delivery, DeliveryNotRetryable
from ..webhooks.deliver import DELIVERER
from .auth import tenant_of
from .openapi import JSON, Reply, operation
from .params import JobId, JobPath, parse_job_id

_DELIVERY_ID = re.compile(r"msg_[0-9a-f]{24,32}")


class DeliveryPath(BaseModel):
    """Path parameters of /generations/{jobId}/deliveries/{deliveryId}/retry."""

    job_id: JobId
    delivery_id: str = Field(alias="deliveryId", description="A delivery's id (its webhook-id header).")


def view(delivery: Delivery) -> DeliveryView:
    next_at = None
    if delivery.status == "pending" and delivery.next_at_ms is not None:
        next_at = time_text(delivery.next_at_ms)
    return DeliveryView(
        delivery_id=delivery.delivery_id, event=delivery.event, event_id=delivery.seq,  # type: ignore[arg-type]
        url=delivery.url, status=delivery.status, created_at=delivery.created_at,
        attempts=delivery.attempts, next_attempt_at=next_at,  # type: ignore[arg-type]
    )


@operation(
    "List a job's webhook deliveries",
    description="Each delivery is one event of the job, POSTed to its webhook, with every attempt so far.",
    tags=("webhooks",),
    path=JobPath,
    replies={200: Reply(DeliveryList, "The job's deliveries, in event order.")},
    errors=(404, 422, 503),
)
async def list_deliveries(request: web.Request) -> web.Response:
    """GET /generations/{jobId}/deliveries."""
    job_id = parse_job_id(request.match_info["jobId"])
    await request.app[JOBS].get(job_id, tenant_of(request))  # JobNotFound unless the caller's
    deliveries = await request.app[STORE].deliveries_of(job_id)
    body = DeliveryList(deliveries=[view(d) for d in deliveries]).model_dump_json(by_alias=True)
    return web.Response(body=body.encode(), content_type=JSON)


@operation(
    "Send a failed or given-up delivery again",
    description="The delivery becomes pending, due now, with a new retry window; its webhook-id stays.",
    tags=("webhooks",),
    path=DeliveryPath,
    replies={202: Reply(DeliveryView, "The delivery, pending again.")},
    errors=(404, 409, 422, 503),
)
async def retry_delivery(request: web.Request) -> web.Response:
    """POST /generations/{jobId}/deliveries/{deliveryId}/retry."""
    job_id = parse_job_id(request.match_info["jobId"])
    await request.app[JOBS].get(job_id, tenant_of(request))
    delivery_id = request.match_info["deliveryId"]
    missing = JobNotFound(f"Job {job_id} has no delivery {delivery_id[:64]!r}")
    if not _DELIVERY_ID.fullmatch(delivery_id):
        raise missing
    try:
        delivery = await request.app[STORE].retry_delivery(job_id, delivery_id, time.time_ns() // 1_000_000, now_text())
    except DeliveryNotRetryable as exc:
        raise JobConflict(f"The delivery is {exc.status}: only failed or given-up deliveries can be retried") from None
    if delivery is None:
        raise missing
    if DELIVERER in request.app:
        request.app[DELIVERER].wake()  # other nodes find it within their poll
    return web.Response(status=202, body=view(delivery).model_dump_json(by_alias=True).encode(), content_type=JSON)
