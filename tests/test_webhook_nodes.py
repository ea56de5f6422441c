"""Webhooks across nodes on PostgreSQL (server.py processes): any node delivers, each delivery is
attempted by one node at a time, and a node killed mid-attempt loses no delivery."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import aiohttp
import pytest

from imagegen.webhooks import new_secret

from .nodes import Cluster, create, until
from .receiver import receiver


@pytest.fixture
def backend() -> str:
    return "postgres"


def webhook_env(timeout_s: float = 2.0) -> dict[str, str]:
    return {
        "IMAGEGEN_WEBHOOK_SECRET": new_secret(),
        "IMAGEGEN_WEBHOOKS__ALLOW_NETWORKS": '["127.0.0.1/32"]',
        "IMAGEGEN_WEBHOOKS__TIMEOUT_S": str(timeout_s),
        "IMAGEGEN_WEBHOOKS__RETRY_BASE_S": "0.2",
    }


async def test_two_nodes_deliver_each_event_exactly_once(cluster: Cluster) -> None:
    env = webhook_env()
    async with receiver() as hook, aiohttp.ClientSession() as session:
        nodes = cluster.start_nodes(2, env)
        jobs = [await create(session, nodes[n % 2], webhook=hook.url) for n in range(20)]
        await hook.wait_for(20, timeout=60)
        await asyncio.sleep(1)  # any duplicate would arrive by now
        ids = Counter(r.headers["webhook-id"] for r in hook.received)
        assert len(ids) == 20 and set(ids.values()) == {1}, ids
        rows = await cluster.rows("SELECT status, attempts FROM deliveries")
        assert len(rows) == 20 and {row["status"] for row in rows} == {"delivered"}
        assert sorted(jobs) == sorted(row["job_id"] for row in await cluster.rows("SELECT job_id FROM deliveries"))


async def test_a_node_killed_mid_attempt_loses_no_delivery(cluster: Cluster) -> None:
    env = webhook_env(timeout_s=2.0)
    async with receiver(answers=["hang"]) as hook, aiohttp.ClientSession() as session:
        (first,) = cluster.start_nodes(1, env)
        job_id = await create(session, first, webhook=hook.url)
        await hook.wait_for(1, timeout=30)  # the first attempt hangs at the receiver...
        await asyncio.to_thread(first.kill9)  # ...and its node dies
        (second,) = cluster.start_nodes(1, env)
        # Once the dead node's lease lapses (2 x timeout_s + 1 s), the other node attempts it.
        await hook.wait_for(2, timeout=30)
        assert hook.received[0].headers["webhook-id"] == hook.received[1].headers["webhook-id"]

        async def delivered() -> list[dict[str, object]]:
            rows = await cluster.rows("SELECT status, attempts FROM deliveries WHERE job_id = ?", (job_id,))
            return [row for row in rows if row["status"] == "delivered"]

        (row,) = await until(delivered, 10, "the delivery recorded as delivered")
        # The dead node's attempt was never recorded; the one that was is the second node's 200.
        assert [attempt["status"] for attempt in json.loads(str(row["attempts"]))] == [200]
        assert second.running
