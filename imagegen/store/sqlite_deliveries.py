"""SQLiteStore's webhook deliveries (a mixin: it runs through the store's reader and its
group-committing writer). The outbox rows themselves are written by the events_outbox trigger."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .deliveries import Attempt, Delivery, DeliveryNotRetryable, DeliveryStatus

if TYPE_CHECKING:
    from collections.abc import Callable

INSERT_WEBHOOK = "INSERT INTO job_webhooks (job_id, owner, url, host, events) VALUES (?, ?, ?, ?, ?)"

# The due deliveries, oldest due first, each the earliest pending one of its job (a job's
# deliveries go out in event order), none to a host that has all the attempts it may have.
CLAIM_DELIVERIES = """
UPDATE deliveries SET lease_until_ms = ?1 + ?2, lease_owner = ?5
WHERE id IN (
    SELECT d.id FROM deliveries AS d
    WHERE d.status = 'pending' AND d.next_at_ms <= ?1 AND (d.lease_until_ms IS NULL OR d.lease_until_ms < ?1)
      AND d.host NOT IN (SELECT value FROM json_each(?3))
      AND NOT EXISTS (SELECT 1 FROM deliveries AS e WHERE e.job_id = d.job_id AND e.seq < d.seq AND e.status = 'pending')
    ORDER BY d.next_at_ms LIMIT ?4
)
RETURNING *
"""
RECORD_ATTEMPT = """
UPDATE deliveries SET status = ?, next_at_ms = ?, lease_until_ms = NULL, lease_owner = NULL, updated_at = ?,
       attempts = json_insert(attempts, '$[#]', json(?))
WHERE id = ? AND status = 'pending' AND lease_owner = ?
"""
RELEASE_DELIVERIES = (
    "UPDATE deliveries SET lease_until_ms = NULL, lease_owner = NULL WHERE id IN (SELECT value FROM json_each(?))"
    " AND lease_owner = ?"
)
RELEASE_ALL_DELIVERIES = "UPDATE deliveries SET lease_until_ms = NULL, lease_owner = NULL WHERE lease_until_ms IS NOT NULL"
JOB_DELIVERIES = "SELECT * FROM deliveries WHERE job_id = ? ORDER BY seq"
RETRY_DELIVERY = """
UPDATE deliveries SET status = 'pending', next_at_ms = ?1, window_ms = ?1, updated_at = ?2
WHERE id = ?3 AND job_id = ?4 AND status IN ('failed', 'given_up')
RETURNING *
"""
DELIVERY_STATUS = "SELECT status FROM deliveries WHERE id = ? AND job_id = ?"
NEXT_DUE = "SELECT min(next_at_ms) AS due FROM deliveries WHERE status = 'pending'"
# Deliveries are kept while their job is; once it is gone, its finished deliveries and its
# webhook go too (its job.deleted delivery, if it asked for one, is sent first).
PRUNE_DELIVERIES = """
DELETE FROM deliveries WHERE status <> 'pending' AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = deliveries.job_id)
"""
PRUNE_WEBHOOKS = """
DELETE FROM job_webhooks WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = job_webhooks.job_id)
  AND NOT EXISTS (SELECT 1 FROM deliveries WHERE deliveries.job_id = job_webhooks.job_id AND status = 'pending')
"""


class SQLiteDeliveries:
    """The deliveries half of SQLiteStore."""

    _write: Callable[..., Any]
    _fetch_all: Callable[..., Any]
    _fetch_one: Callable[..., Any]

    async def claim_deliveries(
        self, owner: str, now_ms: int, lease_ms: int, limit: int, busy_hosts: Sequence[str]
    ) -> list[Delivery]:
        def op(conn: sqlite3.Connection) -> list[Any]:
            params = (now_ms, lease_ms, json.dumps(list(busy_hosts)), limit, owner)
            return conn.execute(CLAIM_DELIVERIES, params).fetchall()

        rows = await self._write(op)
        return sorted((Delivery.from_row(row) for row in rows), key=lambda d: d.next_at_ms or 0)

    async def record_attempt(
        self, owner: str, delivery: Delivery, attempt: Attempt, status: DeliveryStatus, next_at_ms: int | None
    ) -> None:
        params = (status, next_at_ms, attempt.at, json.dumps(attempt.as_json()), delivery.delivery_id, owner)

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(RECORD_ATTEMPT, params)

        await self._write(op)

    async def release_deliveries(self, owner: str, delivery_ids: Sequence[str] | None = None) -> None:
        """Lift `owner`'s leases of these deliveries (None: every lease, as the one process starts)."""
        def op(conn: sqlite3.Connection) -> None:
            if delivery_ids is None:
                conn.execute(RELEASE_ALL_DELIVERIES)
            else:
                conn.execute(RELEASE_DELIVERIES, (json.dumps(list(delivery_ids)), owner))

        await self._write(op)

    async def deliveries_of(self, job_id: str) -> list[Delivery]:
        return [Delivery.from_row(row) for row in await self._fetch_all(JOB_DELIVERIES, (job_id,))]

    async def retry_delivery(self, job_id: str, delivery_id: str, now_ms: int, now: str) -> Delivery | None:
        def op(conn: sqlite3.Connection) -> Any:
            row = conn.execute(RETRY_DELIVERY, (now_ms, now, delivery_id, job_id)).fetchone()
            if row is not None:
                return row
            found = conn.execute(DELIVERY_STATUS, (delivery_id, job_id)).fetchone()
            return None if found is None else found["status"]

        raw = await self._write(op)
        if isinstance(raw, str):
            raise DeliveryNotRetryable(raw)
        return None if raw is None else Delivery.from_row(raw)

    async def next_delivery_due(self) -> int | None:
        row = await self._fetch_one(NEXT_DUE)
        return None if row is None else row["due"]
