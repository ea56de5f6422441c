"""The deliverer: claims due deliveries from the store and POSTs each to its webhook.

One loop per node that runs workers. It looks for due deliveries when the feed says something
was committed (at most every MIN_GAP_S), when an attempt ends, and at the next retry's time;
each claim leases its deliveries (so on PostgreSQL one node at a time attempts one). Attempts run
as their own tasks, at most `[webhooks] concurrency` on the node and `per_host` to one receiver
host, so a slow, dead or flooding receiver holds only its own slots: job processing, other
receivers and other tenants go on. A job's deliveries go out in event order (the claim takes
only the earliest pending one of each job).

Each attempt resolves the host once, refuses it if any address is one the SSRF guard blocks,
and connects to exactly the addresses it checked (a resolver pinned to them): no second lookup.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import random
import re
import secrets
import socket
from concurrent.futures import ThreadPoolExecutor
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import suppress
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from ..api.params import PUBLIC_URL
from ..api.render import Links
from ..auth import CREDENTIALS
from ..config import SETTINGS, WebhookSettings
from ..feed import FEED, Feed
from ..metrics import METRICS, Metrics
from ..models import Job, now_text
from ..store import STORE, JobEvent
from ..store.deliveries import Attempt, Delivery, DeliveryStatus
from . import SIGNER, Signer
from .addresses import IPAddress, blocked_reason

log = logging.getLogger(__name__)

# How long the loop sleeps with nothing due, at most: what a delivery another node made
# retryable (or whose lease lapsed with its node) waits at worst.
POLL_S = 1.0
# The least time between two looks for due deliveries, however often the feed wakes the loop:
# a busy server's commits must not each cost a query.
MIN_GAP_S = 0.02
# A receiver's answer is read up to this many bytes (its body is only for the log).
MAX_RESPONSE_BYTES = 4096
# A claim is leased for twice the attempt's timeout and a second more (time to record the
# outcome); a node that dies mid-attempt hands the delivery to another once the lease lapses.
def lease_s(timeout_s: float) -> float:
    return 2 * timeout_s + 1.0

# The longest single backoff, whatever the attempt count (retries still end at retry_for_s).
MAX_BACKOFF_S = 6 * 3600.0

USER_AGENT = "imagegen-webhooks/1"

# (host, port) -> the host's addresses. Replaceable (a stub resolver in tests).
Resolve = Callable[[str, int], Awaitable[list[IPAddress]]]


class BlockedAddress(Exception):
    """The webhook's host resolves to an address it may not be sent to."""


# getaddrinfo blocks a thread until the DNS answers (or never): lookups get threads of their own,
# so receivers' slow name servers cannot take the default pool the providers and storage use.
_LOOKUPS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="imagegen-webhook-dns")


async def system_resolve(host: str, port: int) -> list[IPAddress]:
    """The host's addresses as the system resolver gives them (an address given as such is itself)."""
    infos = await asyncio.get_running_loop().run_in_executor(
        _LOOKUPS, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM
    )
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos))


class _PinnedResolver(AbstractResolver):
    """aiohttp's resolver for one attempt: it answers only with the addresses already checked."""

    def __init__(self, addresses: Sequence[IPAddress]) -> None:
        self._addresses = addresses

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host, host=str(address), port=port,
                family=socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                proto=0, flags=socket.AI_NUMERICHOST,
            )
            for address in self._addresses
        ]

    async def close(self) -> None:
        pass


def backoff_s(attempts: int, base_s: float, retry_after_s: float | None) -> float:
    """The wait before attempt `attempts` + 1: exponential from `base_s` with +-20 % jitter, or
    what the receiver's Retry-After asked for if that is longer."""
    delay = min(base_s * 2 ** min(attempts - 1, 40), MAX_BACKOFF_S) * random.uniform(0.8, 1.2)
    # A Retry-After past the retry window gives the delivery up: capped, it still is.
    return max(delay, min(retry_after_s or 0.0, 366 * 86_400.0))


def retry_after_s(value: str | None) -> float | None:
    """A Retry-After header's seconds (delta-seconds or an HTTP date), None if absent or unreadable."""
    if not value:
        return None
    if re.fullmatch(r"[0-9]{1,10}", value.strip()):  # ASCII digits only: "²".isdigit() is true too
        return float(value.strip())
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


class Deliverer:
    def __init__(
        self, store: Any, feed: Feed, settings: WebhookSettings, signer: Signer,
        body_of: Callable[[Delivery], bytes], resolve: Resolve = system_resolve, metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._store = store
        self._feed = feed
        self._settings = settings
        self._signer = signer
        self._body_of = body_of
        self._resolve = resolve
        self._wake = asyncio.Event()
        self._in_flight: dict[str, asyncio.Task[None]] = {}  # delivery id -> its attempt
        self._per_host: Counter[str] = Counter()
        self._loop_task: asyncio.Task[None] | None = None
        # Who holds this node's leases: only the holder records an outcome or lifts a lease.
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"

    async def start(self) -> None:
        if self._store.backend == "sqlite":
            await self._store.release_deliveries(self._owner, None)  # one process: a lease left is a dead one's
        self._feed.subscribe(self._on_events)
        self._loop_task = asyncio.create_task(self._run(), name="imagegen-webhooks")

    def wake(self) -> None:
        self._wake.set()

    def _on_events(self, events: Sequence[JobEvent]) -> None:
        self._wake.set()  # any commit may have written a delivery (the outbox trigger)

    async def stop(self) -> None:
        """Stop looking; interrupt attempts in flight and lift their leases (they are attempted
        again, with the same webhook-id, on the next start or by another node)."""
        self._feed.unsubscribe(self._on_events)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        interrupted = list(self._in_flight)
        for task in self._in_flight.values():
            task.cancel()
        await asyncio.gather(*self._in_flight.values(), return_exceptions=True)
        if interrupted:
            with suppress(Exception):
                await self._store.release_deliveries(self._owner, interrupted)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            delay = POLL_S
            try:
                delay = await self._claim_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: look again later
                log.warning("looking for due webhook deliveries failed (%s); trying again", type(exc).__name__)
            with suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            await asyncio.sleep(MIN_GAP_S)

    async def _claim_due(self) -> float:
        """Start the attempts that are due and have room; return how long to sleep before looking again."""
        settings = self._settings
        while True:
            due = await self._store.next_delivery_due()
            now_ms = time.time_ns() // 1_000_000
            if due is None:
                return POLL_S
            if due > now_ms:
                return min(POLL_S, (due - now_ms) / 1000)
            room = settings.concurrency - len(self._in_flight)
            if room <= 0:
                return POLL_S  # an attempt that ends wakes the loop
            busy = [host for host, n in self._per_host.items() if n >= settings.per_host]
            lease_ms = int(lease_s(settings.timeout_s) * 1000)
            claimed = await self._store.claim_deliveries(self._owner, now_ms, lease_ms, room, busy)
            excess = []
            for delivery in claimed:
                if delivery.delivery_id in self._in_flight:
                    continue  # its lease lapsed while this node still records it: not twice
                if self._per_host[delivery.host] >= settings.per_host:
                    excess.append(delivery.delivery_id)  # one claim took more for a host than it may have
                    continue
                self._per_host[delivery.host] += 1
                task = asyncio.create_task(self._attempt(delivery), name=f"imagegen-webhook-{delivery.delivery_id}")
                self._in_flight[delivery.delivery_id] = task
            if excess:
                await self._store.release_deliveries(self._owner, excess)
            if not claimed or excess:
                # What is due waits for an earlier delivery of its job, a busy host or another
                # node's lease: each of those wakes the loop, or the poll looks again.
                return POLL_S

    async def _attempt(self, delivery: Delivery) -> None:
        try:
            try:
                attempt = await self._send(delivery)
                status, next_at_ms = self._outcome(delivery, attempt)
            except Exception as exc:  # never lose the outcome: an attempt that broke is retried
                log.exception("webhook %s: the attempt failed", delivery.delivery_id)
                attempt = Attempt(now_text(), 0, None, "internal_error", type(exc).__name__)
                status, next_at_ms = self._outcome(delivery, attempt)
            await self._record(delivery, attempt, status, next_at_ms)
        finally:
            self._in_flight.pop(delivery.delivery_id, None)
            self._per_host[delivery.host] -= 1
            if not self._per_host[delivery.host]:
                del self._per_host[delivery.host]
            self._wake.set()

    async def _record(self, delivery: Delivery, attempt: Attempt, status: DeliveryStatus, next_at_ms: int | None) -> None:
        delay = 0.5
        while True:
            try:
                await self._store.record_attempt(self._owner, delivery, attempt, status, next_at_ms)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a full disk, the database away: the attempt is not lost
                log.warning("recording webhook delivery %s failed (%s); again in %g s",
                            delivery.delivery_id, type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        if self._metrics is not None:
            self._metrics.webhook_attempts.labels(status).inc()
        level = logging.INFO if status in ("delivered", "pending") else logging.WARNING
        log.log(level, "webhook %s %s for job %s: %s (attempt %d, %s)", delivery.delivery_id, delivery.event,
                delivery.job_id, status, len(delivery.attempts) + 1,
                attempt.http_status if attempt.http_status is not None else attempt.error)

    async def _send(self, delivery: Delivery) -> Attempt:
        """One attempt: resolve and check the host, POST the signed body to the checked addresses."""
        at = now_text()
        started = time.perf_counter()

        def result(status: int | None, error: str | None, detail: str | None = None) -> Attempt:
            return Attempt(at, int((time.perf_counter() - started) * 1000), status, error, detail)

        target = URL(delivery.url)
        assert target.host is not None and target.port is not None
        timeout = aiohttp.ClientTimeout(total=self._settings.timeout_s)
        try:
            async with asyncio.timeout(self._settings.timeout_s):
                addresses = await self._resolve(target.host, target.port)
        except (OSError, TimeoutError) as exc:
            return result(None, "dns_error", f"{target.host} did not resolve: {type(exc).__name__}")
        refused = [(address, reason) for address in addresses
                   if (reason := blocked_reason(address, self._settings.allow_networks)) is not None]
        if refused or not addresses:
            address, reason = refused[0] if refused else (None, "no address")
            return result(None, "blocked_address", f"{target.host} resolves to {address} ({reason})")
        body = self._body_of(delivery)
        headers = {
            **self._signer.headers(delivery.delivery_id, int(time.time()), body),
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
        connector = aiohttp.TCPConnector(resolver=_PinnedResolver(addresses), use_dns_cache=False, force_close=True)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
                async with session.post(target, data=body, headers=headers, allow_redirects=False) as response:
                    with suppress(aiohttp.ClientError, TimeoutError):  # the status is the answer; the body only a courtesy
                        await response.content.read(MAX_RESPONSE_BYTES)
                    return result(response.status, None, response.headers.get("Retry-After"))
        except TimeoutError:
            return result(None, "timeout", f"no answer within {self._settings.timeout_s:g} s")
        except (aiohttp.ClientError, OSError) as exc:
            return result(None, "connection_error", f"{type(exc).__name__}: {str(exc)[:200]}")

    def _outcome(self, delivery: Delivery, attempt: Attempt) -> tuple[DeliveryStatus, int | None]:
        """What the attempt makes of the delivery: delivered, failed for good, or retried then
        (given up once retries would run past retry_for_s)."""
        status = attempt.http_status
        if status is not None and 200 <= status < 300:
            return "delivered", None
        if attempt.error == "blocked_address":
            return "failed", None
        retryable = status is None or status in (408, 429) or status >= 500
        if not retryable:
            return "failed", None  # 3xx (redirects are not followed) and other 4xx are final
        wanted = retry_after_s(attempt.detail) if status == 429 else None
        delay = backoff_s(len(delivery.attempts) + 1, self._settings.retry_base_s, wanted)
        next_at_ms = time.time_ns() // 1_000_000 + int(delay * 1000)
        if next_at_ms > delivery.window_ms + int(self._settings.retry_for_s * 1000):
            return "given_up", None
        return "pending", next_at_ms


def webhook_body(delivery: Delivery, links: Links) -> bytes:
    """The body of a delivery: the event as the SSE stream carries it, as a Standard Webhooks
    payload (type, timestamp, data = the job as GET shows it)."""
    job = Job.from_row(json.loads(delivery.snapshot))
    head = json.dumps({"type": delivery.event, "timestamp": delivery.event_at}, separators=(",", ":"))
    return head[:-1].encode() + b',"data":' + job.to_json(links.image_url) + b"}"


RESOLVER = web.AppKey("webhook_resolver", Callable[[str, int], Awaitable[list[IPAddress]]])
DELIVERER = web.AppKey("webhook_deliverer", Deliverer)


async def deliverer_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context (roles with workers): deliver webhooks while the app runs, if a secret is set."""
    signer = app.get(SIGNER)
    if signer is None:
        yield
        return
    settings = app[SETTINGS]
    # No request to take a base URL from: server.public_url, else the address the server binds.
    base = app[PUBLIC_URL] or f"http://{settings.server.host}:{settings.server.port}"
    credentials = app.get(CREDENTIALS)

    def body_of(delivery: Delivery) -> bytes:
        return webhook_body(delivery, Links(base, credentials))

    deliverer = Deliverer(
        app[STORE], app[FEED], settings.webhooks, signer, body_of, app.get(RESOLVER, system_resolve), app.get(METRICS)
    )
    await deliverer.start()
    app[DELIVERER] = deliverer
    try:
        yield
    finally:
        await deliverer.stop()
