"""The application factory: settings in, a wired aiohttp application out, no I/O."""

from __future__ import annotations

from typing import Literal

from aiohttp import web

from .api import auth, deliveries, health, page, routes, streams
from .api.cors import add_cors
from .api.docs import add_docs
from .api.forwarded import forwarded_middleware
from .api.params import PUBLIC_URL
from .api.problems import add_fallback_route, problem_errors
from .auth import credentials_context
from .config import SETTINGS, Settings
from .dispatch import dispatcher_context
from .events import broadcaster_context, end_streams
from .feed import FEED, Feed
from .jobs import jobs_context
from .logs import add_request_id
from .maintenance import maintenance_context
from .metrics import METRICS, Metrics
from .models import CreateJob
from .providers import provider_context
from .storage import IMAGES, ImageStore
from .store import store_context
from .webhooks import signer_context
from .webhooks.deliver import deliverer_context
from .workers import begin_stopping_workers, workers_context

# What a process does: "api" serves HTTP and the event streams, "worker" draws jobs and serves
# nothing, "all" both (the only role on SQLite, where one process owns the database file).
Role = Literal["all", "api", "worker"]
ROLES: tuple[Role, ...] = ("all", "api", "worker")

# A create request is a few hundred bytes, and at most a 500-character prompt and a 2,048-character
# webhook URL, each character up to 12 bytes as a JSON escape (a surrogate pair): ~31 KB. Anything
# far bigger is a mistake or an attack, refused with 413 before it is read.
MAX_BODY_BYTES = 64 * 1024


def create_app(settings: Settings, role: Role = "all") -> web.Application:
    """Build the app; its resources open on startup and close in reverse order on cleanup."""
    # Only the middlewares the settings need: each costs every request (see api/auth.py).
    middlewares = []
    if settings.server.trusted_proxies:  # first: everything after it sees the client's own facts
        middlewares.append(forwarded_middleware(settings.server.trusted_proxies))
    if settings.auth.enabled:
        middlewares.append(auth.authenticate)
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=middlewares)
    app[SETTINGS] = settings
    app[FEED] = Feed()
    app[IMAGES] = ImageStore(settings.storage.data_dir)
    app[routes.CREATE_JOB] = CreateJob.configured(settings)
    app[PUBLIC_URL] = settings.server.public_url
    if settings.metrics.enabled:
        app[METRICS] = Metrics()  # before any context: each counts into it from its start
    app[health.READINESS] = readiness = health.Readiness(workers=role in ("all", "worker"))
    app.on_shutdown.append(readiness.on_shutdown)  # first: unready the moment shutdown begins
    # Order matters: each context needs the ones before it, and they unwind in reverse, so
    # the workers stop before the provider closes and the store closes last.
    if settings.auth.enabled:
        app.cleanup_ctx.append(credentials_context)  # first: a missing secret stops start-up before any I/O
    app.cleanup_ctx.append(signer_context)  # also before any I/O: a malformed webhook secret stops start-up
    app.cleanup_ctx.append(store_context)
    app.cleanup_ctx.append(dispatcher_context)
    app.cleanup_ctx.append(jobs_context)
    app.cleanup_ctx.append(broadcaster_context)
    app.cleanup_ctx.append(maintenance_context)
    if role in ("all", "worker"):
        app.cleanup_ctx.append(provider_context(settings.provider))
        app.cleanup_ctx.append(workers_context)
        app.cleanup_ctx.append(deliverer_context)
        app.on_shutdown.append(begin_stopping_workers)
    if role in ("all", "api"):
        app.cleanup_ctx.append(page.page_context)
        app.on_shutdown.append(end_streams)
        _add_routes(app.router)
        _add_health_routes(app.router, metrics=settings.metrics.enabled)
        if settings.auth.enabled:
            app.router.add_post("/tokens", problem_errors(auth.create_token))
        add_docs(app)
    add_fallback_route(app.router)  # last: it takes whatever the others do not
    # A signal, not a middleware: it runs only as an answer's headers go out, which for a
    # stream is before its handler returns, and for a middleware's 401 too.
    app.on_response_prepare.append(add_request_id)
    if settings.server.cors_origins:  # after every route, the fallback too: each gets CORS headers
        add_cors(app, settings.server.cors_origins)
    return app


def _add_routes(router: web.UrlDispatcher) -> None:
    # Every GET route also answers HEAD (RFC 9110: GET's status and headers, no body); the
    # OpenAPI document leaves those implicit HEAD routes out (api/openapi.build_document).
    # Every handler answers its errors as problem+json (api/problems.problem_errors).
    router.add_get("/", problem_errors(page.index))
    router.add_post("/generations", problem_errors(routes.create_generation))
    router.add_get("/generations", problem_errors(routes.list_generations))
    # The event streams go before {jobId}: "events" would otherwise be taken for a job id.
    router.add_get("/generations/events", problem_errors(streams.stream_all))
    router.add_get("/generations/{jobId}/events", problem_errors(streams.stream_job))
    # "events" is never a job id: without the lookahead, DELETE /generations/events would
    # reach delete_generation and the Allow header of /generations/events would list DELETE.
    job = "/generations/{jobId:(?!events$)[^{}/]+}"
    router.add_get(job, problem_errors(routes.get_generation))
    router.add_delete(job, problem_errors(routes.delete_generation))
    router.add_post("/generations/{jobId}/cancel", problem_errors(routes.cancel_generation))
    router.add_get("/generations/{jobId}/deliveries", problem_errors(deliveries.list_deliveries))
    router.add_post("/generations/{jobId}/deliveries/{deliveryId}/retry", problem_errors(deliveries.retry_delivery))
    # ASCII digits only (\d would take other scripts' digits), and no more than an index can be.
    router.add_get(r"/images/{jobId}/{index:[0-9]{1,6}}.png", problem_errors(routes.get_image))


def _add_health_routes(router: web.UrlDispatcher, metrics: bool) -> None:
    router.add_get("/healthz", problem_errors(health.healthz))
    router.add_get("/readyz", problem_errors(health.readyz))
    if metrics:  # off: /metrics is no route at all (404)
        router.add_get("/metrics", problem_errors(health.metrics))
