"""Webhook deliveries as the store keeps them: the types both backends share.

A job made with a webhook has a Webhook row; each of its events whose name the job asked for
becomes a Delivery, written by a database trigger in the event's own transaction (the outbox:
migrations sqlite/005 and postgres/004). The deliverer (imagegen/webhooks/) claims due deliveries
through the store, attempts them, and records each attempt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

DeliveryStatus = Literal["pending", "delivered", "failed", "given_up"]
FINAL: tuple[DeliveryStatus, ...] = ("delivered", "failed", "given_up")


@dataclass(frozen=True)
class Webhook:
    """Where a job's chosen events are POSTed."""

    url: str
    host: str  # the receiver, "host:port" (lowercased): attempts in flight are bounded per receiver
    events: tuple[str, ...]

    @property
    def events_json(self) -> str:
        return json.dumps(list(self.events))


@dataclass(frozen=True)
class Delivery:
    """One event of one job, to be POSTed to its webhook, and the attempts made so far."""

    delivery_id: str  # msg_<hex>: the webhook-id header, the same on every attempt
    job_id: str
    owner: str | None
    seq: int  # the event's id
    event: str  # the event's name
    snapshot: str  # the job after the event, as the event log keeps it: the body's data
    event_at: str  # when the event was committed
    url: str
    host: str
    status: DeliveryStatus
    attempts: list[dict[str, Any]] = field(default_factory=list)
    next_at_ms: int | None = None  # pending: the next attempt is due then (Unix ms)
    window_ms: int = 0  # retries end [webhooks] retry_for_s after this
    created_at: str = ""

    @classmethod
    def from_row(cls, row: Any) -> Delivery:
        return cls(
            row["id"], row["job_id"], row["owner"], row["seq"], row["event"], row["job"], row["event_at"],
            row["url"], row["host"], row["status"], json.loads(row["attempts"]), row["next_at_ms"],
            row["window_ms"], row["created_at"],
        )


@dataclass(frozen=True)
class Attempt:
    """The outcome of one attempt, as the deliverer records it."""

    at: str  # when it started
    duration_ms: int
    http_status: int | None  # the receiver's answer, if it answered
    error: str | None  # what went wrong (timeout, connection_error, blocked_address...), if anything
    detail: str | None = None  # a short human-readable word on it

    def as_json(self) -> dict[str, Any]:
        return {"at": self.at, "durationMs": self.duration_ms, "status": self.http_status,
                "error": self.error, "detail": self.detail}


class DeliveryNotRetryable(Exception):
    """The delivery asked to be retried is pending or delivered already."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status
