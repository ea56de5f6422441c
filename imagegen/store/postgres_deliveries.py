"""PostgresStore's webhook deliveries (a mixin over the store's pooled connections). Any node
may attempt a delivery: a claim leases it (FOR UPDATE SKIP LOCKED, then lease_until_ms), so one
node at a time does, and when a node dies mid-attempt its lease lapses and another takes it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .deliveries import Attempt, Delivery, DeliveryNotRetryable, DeliveryStatus

if TYPE_CHECKING:
    from collections.abc import Callable

INSERT_WEBHOOK = """
INSERT INTO job_webhooks (job_id, owner, url, host, events) VALUES (%(id)s, %(owner)s, %(url)s, %(host)s, %(events)s::jsonb)
"""
# The database's clock in Unix milliseconds: leases are compared by one clock, whatever each
# node's says.
NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
# As SQLite's CLAIM_DELIVERIES (sqlite_deliveries.py), skipping rows another node is claiming.
CLAIM_DELIVERIES = f"""
UPDATE deliveries SET lease_until_ms = {NOW_MS} + %(lease)s, lease_owner = %(owner)s
WHERE id IN (
    SELECT d.id FROM deliveries AS d
    WHERE d.status = 'pending' AND d.next_at_ms <= {NOW_MS} AND (d.lease_until_ms IS NULL OR d.lease_until_ms < {NOW_MS})
      AND d.host <> ALL(%(busy)s::text[])
      AND NOT EXISTS (SELECT 1 FROM deliveries AS e WHERE e.job_id = d.job_id AND e.seq < d.seq AND e.status = 'pending')
    ORDER BY d.next_at_ms LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
RETURNING *
"""
# Only the lease's holder records: a node whose lease lapsed (and was taken over) records nothing.
RECORD_ATTEMPT = """
UPDATE deliveries SET status = %(status)s, next_at_ms = %(next)s, lease_until_ms = NULL, lease_owner = NULL,
       updated_at = %(now)s, attempts = (attempts::jsonb || jsonb_build_array(%(attempt)s::jsonb))::text
WHERE id = %(id)s AND status = 'pending' AND lease_owner = %(owner)s
RETURNING id
"""
RELEASE_DELIVERIES = (
    "UPDATE deliveries SET lease_until_ms = NULL, lease_owner = NULL WHERE id = ANY(%s::text[]) AND lease_owner = %s"
)
JOB_DELIVERIES = "SELECT * FROM deliveries WHERE job_id = %s ORDER BY seq"
RETRY_DELIVERY = """
UPDATE deliveries SET status = 'pending', next_at_ms = %(now_ms)s, window_ms = %(now_ms)s, updated_at = %(now)s
WHERE id = %(id)s AND job_id = %(job)s AND status IN ('failed', 'given_up')
RETURNING *
"""
DELIVERY_STATUS = "SELECT status FROM deliveries WHERE id = %s AND job_id = %s"
NEXT_DUE = "SELECT min(next_at_ms) AS due FROM deliveries WHERE status = 'pending'"
PRUNE_DELIVERIES = """
DELETE FROM deliveries AS d WHERE d.status <> 'pending' AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = d.job_id)
"""
PRUNE_WEBHOOKS = """
DELETE FROM job_webhooks AS w WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = w.job_id)
  AND NOT EXISTS (SELECT 1 FROM deliveries AS d WHERE d.job_id = w.job_id AND d.status = 'pending')
"""


class PostgresDeliveries:
    """The deliveries half of PostgresStore."""

    _write: Callable[..., Any]
    _fetch_all: Callable[..., Any]
    _fetch_one: Callable[..., Any]

    async def claim_deliveries(
        self, owner: str, now_ms: int, lease_ms: int, limit: int, busy_hosts: Sequence[str]
    ) -> list[Delivery]:
        # now_ms is unused: on many nodes the database's clock decides (NOW_MS).
        params = {"owner": owner, "lease": lease_ms, "busy": list(busy_hosts), "limit": limit}
        rows = await self._write(CLAIM_DELIVERIES, params)
        return sorted((Delivery.from_row(row) for row in rows), key=lambda d: d.next_at_ms or 0)

    async def record_attempt(
        self, owner: str, delivery: Delivery, attempt: Attempt, status: DeliveryStatus, next_at_ms: int | None
    ) -> None:
        await self._write(RECORD_ATTEMPT, {
            "status": status, "next": next_at_ms, "now": attempt.at, "attempt": json.dumps(attempt.as_json()),
            "id": delivery.delivery_id, "owner": owner,
        })

    async def release_deliveries(self, owner: str, delivery_ids: Sequence[str] | None = None) -> None:
        """Lift `owner`'s leases of these deliveries (None: nothing, on PostgreSQL: other nodes'
        leases are live, and this node's lapse)."""
        if delivery_ids:
            await self._fetch_all(RELEASE_DELIVERIES + " RETURNING id", (list(delivery_ids), owner))

    async def deliveries_of(self, job_id: str) -> list[Delivery]:
        return [Delivery.from_row(row) for row in await self._fetch_all(JOB_DELIVERIES, (job_id,))]

    async def retry_delivery(self, job_id: str, delivery_id: str, now_ms: int, now: str) -> Delivery | None:
        rows = await self._write(RETRY_DELIVERY, {"now_ms": now_ms, "now": now, "id": delivery_id, "job": job_id})
        if rows:
            return Delivery.from_row(rows[0])
        found = await self._fetch_one(DELIVERY_STATUS, (delivery_id, job_id))
        if found is not None:
            raise DeliveryNotRetryable(found["status"])
        return None

    async def next_delivery_due(self) -> int | None:
        row = await self._fetch_one(NEXT_DUE)
        return None if row is None else row["due"]
