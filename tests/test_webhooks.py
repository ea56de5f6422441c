"""Webhooks end to end, on both backends: real receivers on loopback addresses, signatures
verified with the `standardwebhooks` package, retries, Retry-After, order, restarts, tenants, and
refusals of what may not be submitted. The SSRF guard's own tests are in test_webhook_ssrf.py."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from standardwebhooks import Webhook

from imagegen.webhooks import new_secret

from .auth_keys import SECRET, auth_section, bearer
from .conftest import TestDatabase, create_job, prune, wait_for_status
from .receiver import receiver

SECRET_ENV = "IMAGEGEN_WEBHOOK_SECRET"
LOOPBACK = {"allow_networks": ["127.0.0.1/32"], "retry_base_s": 0.2}


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    value = new_secret()
    monkeypatch.setenv(SECRET_ENV, value)
    return value


async def deliveries(client: Any, job_id: str, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    response = await client.get(f"/generations/{job_id}/deliveries", headers=headers or {})
    assert response.status == 200, await response.text()
    return (await response.json())["deliveries"]


async def settled(client: Any, job_id: str, timeout: float = 20, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The job's deliveries once none is pending."""
    deadline = time.monotonic() + timeout
    while True:
        found = await deliveries(client, job_id, headers)
        if found and all(d["status"] != "pending" for d in found):
            return found
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.05)


async def test_a_delivery_is_signed_the_standard_webhooks_way_and_carries_the_job_as_get_shows_it(
    make_client: Any, secret: str
) -> None:
    async with receiver() as hook:
        # No request to take a base URL from: image URLs in webhooks are under server.public_url.
        client = await make_client(webhooks=LOOPBACK, server={"public_url": "https://imagegen.example"})
        job_id = await create_job(client, webhook=hook.url, numImages=2)
        (received,) = await hook.wait_for(1)
        # Exactly what a receiver does: verify with the package, against the raw body.
        payload = Webhook(secret).verify(received.body, received.headers)
        assert payload["type"] == "job.completed"
        job = await (await client.get(f"/generations/{job_id}")).json()
        assert payload["data"] == job and len(job["imageUrls"]) == 2
        assert payload["timestamp"].endswith("Z")
        assert received.headers["Content-Type"] == "application/json"
        # A tampered body or a wrong secret does not verify.
        with pytest.raises(Exception):
            Webhook(secret).verify(received.body.replace(b"completed", b"failed"), received.headers)
        with pytest.raises(Exception):
            Webhook(new_secret()).verify(received.body, received.headers)
        (delivery,) = await settled(client, job_id)
        assert delivery["deliveryId"] == received.headers["webhook-id"]
        assert delivery["status"] == "delivered" and delivery["event"] == "job.completed"
        assert [a["status"] for a in delivery["attempts"]] == [200] and delivery["nextAttemptAt"] is None
        # The image URLs in the body fetch the images.
        image = await client.get(payload["data"]["imageUrls"][0].removeprefix("https://imagegen.example"))
        assert image.status == 200 and (await image.read()).startswith(b"\x89PNG")


async def test_500_twice_then_200_is_one_successful_delivery_after_backoff(make_client: Any, secret: str) -> None:
    async with receiver(answers=[500, 503]) as hook:
        client = await make_client(webhooks=LOOPBACK)
        job_id = await create_job(client, webhook=hook.url)
        received = await hook.wait_for(3)
        await asyncio.sleep(0.5)
        assert len(hook.received) == 3  # nothing after the 200
        assert len({r.headers["webhook-id"] for r in received}) == 1  # one delivery, retried
        for r in received:
            Webhook(secret).verify(r.body, r.headers)  # each attempt is signed afresh
        gaps = [b.at - a.at for a, b in zip(received, received[1:])]
        assert gaps[0] >= 0.2 * 0.8 - 0.02 and gaps[1] >= 0.4 * 0.8 - 0.02, gaps  # exponential, with jitter
        (delivery,) = await settled(client, job_id)
        assert [a["status"] for a in delivery["attempts"]] == [500, 503, 200]
        assert delivery["status"] == "delivered"
        # Each attempt is counted by what it made of the delivery.
        text = await (await client.get("/metrics")).text()
        counted = {sample.labels["outcome"]: sample.value for family in text_string_to_metric_families(text)
                   if family.name == "imagegen_webhook_attempts" for sample in family.samples
                   if sample.name.endswith("_total")}
        assert counted == {"pending": 2.0, "delivered": 1.0}, counted


async def test_429_with_retry_after_is_honoured(make_client: Any, secret: str) -> None:
    async with receiver(answers=[(429, {"Retry-After": "1"})]) as hook:
        client = await make_client(webhooks={**LOOPBACK, "retry_base_s": 0.05})
        job_id = await create_job(client, webhook=hook.url)
        first, second = await hook.wait_for(2)
        assert second.at - first.at >= 0.95, second.at - first.at  # not the 0.05 s backoff
        (delivery,) = await settled(client, job_id)
        assert [a["status"] for a in delivery["attempts"]] == [429, 200]
        assert delivery["attempts"][0]["detail"] == "1"


async def test_a_final_answer_fails_the_delivery_and_a_retry_sends_it_again(make_client: Any, secret: str) -> None:
    async with receiver(answers=[410, (302, {"Location": "http://127.0.0.1:1/elsewhere"})]) as hook:
        client = await make_client(webhooks=LOOPBACK)
        job_id = await create_job(client, webhook=hook.url)
        (delivery,) = await settled(client, job_id)
        assert delivery["status"] == "failed" and [a["status"] for a in delivery["attempts"]] == [410]
        again = await client.post(f"/generations/{job_id}/deliveries/{delivery['deliveryId']}/retry")
        assert again.status == 202 and (await again.json())["status"] == "pending"
        # A redirect is an answer, not followed: final again.
        (delivery,) = await settled(client, job_id)
        assert [a["status"] for a in delivery["attempts"]] == [410, 302] and delivery["status"] == "failed"
        assert len(hook.received) == 2
        assert (await client.post(f"/generations/{job_id}/deliveries/{delivery['deliveryId']}/retry")).status == 202
        (delivery,) = await settled(client, job_id)
        assert delivery["status"] == "delivered"
        conflict = await client.post(f"/generations/{job_id}/deliveries/{delivery['deliveryId']}/retry")
        assert conflict.status == 409 and conflict.content_type == "application/problem+json"
        missing = await client.post(f"/generations/{job_id}/deliveries/msg_{'0' * 24}/retry")
        assert missing.status == 404


async def test_a_jobs_deliveries_arrive_in_event_order(make_client: Any, secret: str) -> None:
    # The first delivery fails once: the later events wait for it instead of overtaking it.
    async with receiver(answers=[500]) as hook:
        client = await make_client(webhooks={**LOOPBACK, "per_host": 8}, provider={"delay_s": 0.05})
        events = ["job.created", "job.processing", "job.progress", "job.completed"]
        job_id = await create_job(client, webhook=hook.url, webhookEvents=events, numImages=3)
        await wait_for_status(client, job_id, {"completed"})
        found = await settled(client, job_id)
        names = [d["event"] for d in found]
        assert names == ["job.created", "job.processing", "job.progress", "job.progress", "job.progress", "job.completed"]
        received = await hook.wait_for(7)
        bodies = [json.loads(r.body) for r in received]
        assert [b["type"] for b in bodies] == ["job.created", *names]  # the created one twice: 500, then 200
        assert [len(b["data"]["imageUrls"]) for b in bodies[3:6]] == [1, 2, 3]


async def test_a_restart_in_the_middle_of_retries_delivers_after_the_restart(
    make_client: Any, secret: str, database: TestDatabase
) -> None:
    async with receiver(answers=[500]) as hook:
        client = await make_client(webhooks={**LOOPBACK, "retry_base_s": 1.5})
        job_id = await create_job(client, webhook=hook.url)
        await hook.wait_for(1)
        (delivery,) = await deliveries(client, job_id)
        assert delivery["status"] == "pending" and delivery["nextAttemptAt"]
        await client.close()  # stopped before the retry is due
        await asyncio.sleep(1.5)
        assert len(hook.received) == 1
        client = await make_client(webhooks={**LOOPBACK, "retry_base_s": 1.5})
        (delivery,) = await settled(client, job_id, timeout=20)
        assert [a["status"] for a in delivery["attempts"]] == [500, 200]
        assert len({r.headers["webhook-id"] for r in hook.received}) == 1 and len(hook.received) == 2


async def test_a_receiver_that_never_answers_holds_only_its_own_slots(make_client: Any, secret: str) -> None:
    async with receiver(then="hang") as stuck, receiver() as fine:
        client = await make_client(webhooks={**LOOPBACK, "timeout_s": 30, "per_host": 2}, workers={"count": 2})
        stuck_jobs = [await create_job(client, webhook=stuck.url) for _ in range(6)]
        fine_jobs = [await create_job(client, webhook=fine.url) for _ in range(6)]
        plain = [await create_job(client) for _ in range(6)]
        for job_id in stuck_jobs + fine_jobs + plain:
            await wait_for_status(client, job_id, {"completed"})
        # Both are on 127.0.0.1, at two ports: two receivers. With per_host 2 the stuck one holds two slots of 32:
        # the other receiver's deliveries all go through meanwhile.
        await fine.wait_for(6)
        await asyncio.sleep(0.3)
        assert stuck.most_open == 2 and len(stuck.received) == 2


async def test_deliveries_are_scoped_to_their_tenant(make_client: Any, secret: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_SECRET", SECRET)
    async with receiver(answers=[400]) as hook:
        client = await make_client(webhooks=LOOPBACK, auth=auth_section())
        response = await client.post("/generations", json={"numImages": 1, "webhook": hook.url}, headers=bearer("acme"))
        job_id = (await response.json())["jobId"]
        (delivery,) = await settled(client, job_id, headers=bearer("acme"))
        payload = Webhook(secret).verify((await hook.wait_for(1))[0].body, hook.received[0].headers)
        assert "sig=" in payload["data"]["imageUrls"][0]  # signed image URLs with auth on
        other = await client.get(f"/generations/{job_id}/deliveries", headers=bearer("globex"))
        missing = await client.get(f"/generations/{'0' * 8}-0000-7000-8000-{'0' * 12}/deliveries", headers=bearer("globex"))
        assert other.status == 404 == missing.status
        body, missing_body = await other.json(), await missing.json()
        assert body["title"] == missing_body["title"]
        retry = await client.post(f"/generations/{job_id}/deliveries/{delivery['deliveryId']}/retry", headers=bearer("globex"))
        assert retry.status == 404
        assert (await client.get(f"/generations/{job_id}/deliveries")).status == 401


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"webhook": "ftp://example.com/hook"}, "webhook"),
        ({"webhook": "/relative/hook"}, "webhook"),
        ({"webhook": "https://user:pw@example.com/hook"}, "webhook"),
        ({"webhook": "https://example.com:22/hook"}, "webhook"),
        ({"webhook": "https://example.com/" + "a" * 2040}, "webhook"),
        ({"webhook": "https://exa mple.com/hook"}, "webhook"),
        ({"webhook": 42}, "webhook"),
        ({"webhook": "https://example.com/hook", "webhookEvents": ["job.exploded"]}, "webhookEvents.0"),
        ({"webhook": "https://example.com/hook", "webhookEvents": []}, "webhookEvents"),
        ({"webhookEvents": ["job.completed"]}, "webhookEvents"),
    ],
)
async def test_invalid_webhooks_are_422_naming_the_field_and_write_nothing(
    secret: str, client: Any, body: dict[str, Any], field: str, database: TestDatabase
) -> None:
    response = await client.post("/generations", json={"numImages": 1, **body})
    assert response.status == 422, await response.text()
    assert response.content_type == "application/problem+json"
    names = [p["name"] for p in (await response.json())["invalidParams"]]
    assert field in names, names
    assert database.rows("SELECT count(*) AS n FROM jobs")[0]["n"] == 0
    assert database.rows("SELECT count(*) AS n FROM job_webhooks")[0]["n"] == 0


async def test_without_a_secret_a_webhook_is_refused_with_the_reason(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    response = await client.post("/generations", json={"numImages": 1, "webhook": "https://example.com/hook"})
    assert response.status == 422
    assert "secret is not set" in (await response.json())["detail"]


async def test_an_idempotent_repeat_with_another_webhook_is_refused(
    secret: str, client: Any, database: TestDatabase
) -> None:
    headers = {"Idempotency-Key": "k1"}
    first = await client.post("/generations", json={"numImages": 1, "webhook": "https://example.com/a"}, headers=headers)
    again = await client.post("/generations", json={"numImages": 1, "webhook": "https://example.com/a"}, headers=headers)
    other = await client.post("/generations", json={"numImages": 1, "webhook": "https://example.com/b"}, headers=headers)
    assert (first.status, again.status, other.status) == (202, 202, 422)
    # The repeats made no job; on PostgreSQL each left a webhook row for the id it never used,
    # which the prune pass removes.
    assert database.rows("SELECT count(*) AS n FROM jobs")[0]["n"] == 1
    await prune(client)
    assert database.rows("SELECT count(*) AS n FROM job_webhooks")[0]["n"] == 1


async def test_a_deleted_job_still_announces_its_deletion_and_its_deliveries_are_pruned_after(
    make_client: Any, secret: str, database: TestDatabase
) -> None:
    async with receiver() as hook:
        client = await make_client(webhooks=LOOPBACK)
        job_id = await create_job(client, webhook=hook.url, webhookEvents=["job.completed", "job.deleted"])
        await hook.wait_for(1)
        await settled(client, job_id)
        assert (await client.delete(f"/generations/{job_id}")).status == 204
        second = (await hook.wait_for(2))[1]
        assert json.loads(second.body)["type"] == "job.deleted"
        deadline = time.monotonic() + 10
        while database.rows("SELECT count(*) AS n FROM deliveries WHERE status = 'pending'")[0]["n"]:
            assert time.monotonic() < deadline  # until its outcome is recorded
            await asyncio.sleep(0.05)
        await prune(client)
        assert database.rows("SELECT count(*) AS n FROM deliveries")[0]["n"] == 0
        assert database.rows("SELECT count(*) AS n FROM job_webhooks")[0]["n"] == 0


async def test_timeouts_408_and_refused_connections_are_retried_until_the_window_ends(
    make_client: Any, secret: str
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
    refused_url = f"http://127.0.0.1:{closed.getsockname()[1]}/hook"
    settings = {**LOOPBACK, "timeout_s": 0.5, "retry_base_s": 0.2, "retry_for_s": 2.5}
    try:
        async with receiver(answers=[408, "hang"], then=500) as hook, receiver(then=(200, {})) as big:
            big.body = b"x" * 1_000_000  # an answer far over what is read of it
            client = await make_client(webhooks=settings)
            answered = await create_job(client, webhook=hook.url)
            refused = await create_job(client, webhook=refused_url)
            fine = await create_job(client, webhook=big.url)
            (delivery,) = await settled(client, answered, timeout=30)
            outcomes = [a["status"] or a["error"] for a in delivery["attempts"]]
            assert outcomes[:3] == [408, "timeout", 500] and set(outcomes[3:]) <= {500}, outcomes
            assert delivery["status"] == "given_up" and delivery["nextAttemptAt"] is None
            (delivery,) = await settled(client, refused, timeout=30)
            assert delivery["status"] == "given_up" and len(delivery["attempts"]) >= 2
            assert {a["error"] for a in delivery["attempts"]} == {"connection_error"}
            (delivery,) = await settled(client, fine)
            assert delivery["status"] == "delivered"
    finally:
        closed.close()


def test_a_retry_after_of_any_shape_is_read_safely() -> None:
    from imagegen.webhooks.deliver import backoff_s, retry_after_s

    assert retry_after_s("7") == 7.0 and retry_after_s(" 7 ") == 7.0
    assert retry_after_s("9" * 400) is None and retry_after_s("\u00b2") is None  # not ASCII digits, or absurd
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    assert retry_after_s("soon") is None and retry_after_s(None) is None
    assert backoff_s(5000, 5.0, 10.0**30) < 10**9  # huge attempt counts and waits stay finite


async def test_only_the_holder_of_a_deliverys_lease_records_its_outcome(
    make_client: Any, secret: str, database: TestDatabase
) -> None:
    # A node whose lease lapsed (and another took the delivery over) must not overwrite the
    # other's outcome nor lift its lease. The store is driven directly, as two deliverers would.
    from imagegen.store import STORE
    from imagegen.store.deliveries import Attempt
    from imagegen.webhooks.deliver import DELIVERER

    client = await make_client(webhooks=LOOPBACK)
    await client.app[DELIVERER].stop()  # this test is the deliverer
    store = client.app[STORE]
    job_id = await create_job(client, webhook="http://127.0.0.1:9999/hook")
    await wait_for_status(client, job_id, {"completed"})
    now = lambda: time.time_ns() // 1_000_000  # noqa: E731
    (first,) = await store.claim_deliveries("node-a", now(), 50, 10, [])
    assert await store.claim_deliveries("node-b", now(), 50, 10, []) == []  # leased to node-a
    await asyncio.sleep(0.2)  # node-a's lease lapses
    (taken,) = await store.claim_deliveries("node-b", now(), 60_000, 10, [])
    assert taken.delivery_id == first.delivery_id
    late = Attempt("2026-12-01T00:00:00.000Z", 1, 200, None)
    await store.record_attempt("node-a", first, late, "delivered", None)
    await store.release_deliveries("node-a", [first.delivery_id])
    (row,) = database.rows("SELECT status, lease_owner, attempts FROM deliveries")
    assert (row["status"], row["lease_owner"], row["attempts"]) == ("pending", "node-b", "[]")
    await store.record_attempt("node-b", taken, late, "delivered", None)
    (row,) = database.rows("SELECT status, lease_owner FROM deliveries")
    assert (row["status"], row["lease_owner"]) == ("delivered", None)
