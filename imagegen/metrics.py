"""The service's Prometheus metrics, in a registry of the app's own (never the global one, so that
several apps in one process, as in the tests, count apart).

What happened on this process is counted where it happens (a commit of this process's store, a
worker's attempt, a request's handler); what is true of the whole cluster (jobs by status, the
queue) is read from the database when /metrics is scraped, so every node reports the same.
With [metrics] enabled = false there is no Metrics at all: every recording site checks for None.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .models import JobStatus

if TYPE_CHECKING:
    from .store import JobEvent

# Seconds, for request latencies and database commits: 0.5 ms to 10 s.
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# Seconds, for drawing and whole jobs: 10 ms to an hour.
SLOW_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)
# Writes per group commit (SQLite's writer batches up to store.sqlite.MAX_BATCH).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

FINAL = (JobStatus.COMPLETED.value, JobStatus.FAILED.value, JobStatus.CANCELED.value)
# HTTP methods a label may name; any other method a client invents is counted as "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


class Metrics:
    """Every metric of one app, registered in its own registry; see README "Health and metrics"."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=False)
        # --- jobs, as this process committed them ---
        self.jobs_created = Counter("imagegen_jobs_created", "Jobs created by this process.", registry=registry)
        self.jobs_finished = Counter(
            "imagegen_jobs_finished", "Jobs this process moved to a final status.", ["status"], registry=registry
        )
        self.job_duration = Histogram(
            "imagegen_job_duration_seconds", "From a job's creation to its final status, by that status.",
            ["status"], buckets=SLOW_BUCKETS, registry=registry,
        )
        self.retries = Counter("imagegen_job_retries", "Failed attempts put back to pending for another try.",
                               registry=registry)
        self.rescues = Counter("imagegen_job_rescues", "Jobs whose lease expired, handed back (or failed as "
                               "poison) by this node's rescuer (PostgreSQL).", registry=registry)
        self.recoveries = Counter("imagegen_job_recoveries", "Jobs a crash left processing, handed back (or failed "
                                  "as poison) at start-up (SQLite).", registry=registry)
        # --- the workers ---
        self.image_duration = Histogram(
            "imagegen_image_duration_seconds", "Drawing time per image (a provider call's time over its images).",
            buckets=SLOW_BUCKETS, registry=registry,
        )
        self.provider_errors = Counter(
            "imagegen_provider_errors", "Failed provider calls, by error code.", ["code"], registry=registry
        )
        # --- webhooks ---
        self.webhook_attempts = Counter(
            "imagegen_webhook_attempts", "Webhook delivery attempts this node made, by what the delivery "
            "became (delivered, pending: to be retried, failed, given_up).", ["outcome"], registry=registry,
        )
        # --- read from the database at scrape time ---
        self.jobs = Gauge("imagegen_jobs", "Jobs in the database, by current status.", ["status"], registry=registry)
        self.queue_depth = Gauge("imagegen_queue_depth", "Pending jobs in the database (every node's).",
                                 registry=registry)
        self.oldest_pending = Gauge(
            "imagegen_oldest_pending_age_seconds", "Age of the oldest pending job; 0 with none.", registry=registry
        )
        # --- streams ---
        self.subscribers = Gauge("imagegen_sse_subscribers", "Open event streams on this process.",
                                 registry=registry)
        self.events_delivered = Counter("imagegen_sse_events_delivered", "Job events written to event streams.",
                                        registry=registry)
        # --- HTTP ---
        self.http_requests = Counter(
            "imagegen_http_requests", "Requests answered, by route template, method and status.",
            ["route", "method", "status"], registry=registry,
        )
        self.http_duration = Histogram(
            "imagegen_http_request_duration_seconds", "Time to answer a request (a stream: its whole life), "
            "by route template and method.", ["route", "method"], buckets=FAST_BUCKETS, registry=registry,
        )
        # --- the database ---
        self.commit_batch = Histogram(
            "imagegen_db_commit_batch_size", "Writes per group commit (SQLite's writer).",
            buckets=BATCH_BUCKETS, registry=registry,
        )
        self.commit_duration = Histogram(
            "imagegen_db_commit_seconds", "Time of one group commit (SQLite) or one writing statement (PostgreSQL).",
            buckets=FAST_BUCKETS, registry=registry,
        )
        # Label lookups cost more than the count itself (a lock and a tuple of strings): each
        # (route, method, status)'s children are looked up once.
        self._http: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def committed(self, events: Sequence[JobEvent]) -> None:
        """Count the job events this process's store just committed (not other nodes')."""
        for event in events:
            name = event.name
            if name == "job.created":
                self.jobs_created.inc()
            elif name == "job.retrying":
                self.retries.inc()
            elif event.status in FINAL and name != "job.deleted":
                job = event.job
                self.jobs_finished.labels(event.status).inc()
                if job.completed_at is not None:
                    seconds = _seconds_between(job.created_at, job.completed_at)
                    self.job_duration.labels(event.status).observe(max(0.0, seconds))

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request of `route` (its template: bounded label values)."""
        # Keyed by the label, not the method sent: a client inventing methods must not grow this.
        label = method if method in METHODS else "other"
        key = (route, label, status)
        children = self._http.get(key)
        if children is None:
            children = self._http[key] = (
                self.http_requests.labels(route, label, str(status)),
                self.http_duration.labels(route, label),
            )
        children[0].inc()
        children[1].observe(seconds)

    def scraped(self, by_status: dict[str, int], oldest_pending: str | None, subscribers: int) -> None:
        """Set the gauges that are read at scrape time."""
        for status in JobStatus:
            self.jobs.labels(status.value).set(by_status.get(status.value, 0))
        self.queue_depth.set(by_status.get(JobStatus.PENDING.value, 0))
        now = datetime.now(UTC).isoformat()
        self.oldest_pending.set(0.0 if oldest_pending is None else max(0.0, _seconds_between(oldest_pending, now)))
        self.subscribers.set(subscribers)


METRICS = web.AppKey("metrics", Metrics)


def metrics_of(app: web.Application) -> Metrics | None:
    """The app's metrics; None with [metrics] enabled = false."""
    return app.get(METRICS)
