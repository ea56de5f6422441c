"""GET /healthz, GET /readyz and GET /metrics: what a load balancer, an orchestrator and Prometheus ask.

All three are public (no API key, with [auth] on too): they say nothing about any tenant's jobs
beyond counts, and /metrics is meant to be restricted at the proxy (README "Health and metrics").
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from ..config import SETTINGS
from ..events import BROADCASTER
from ..metrics import METRICS
from ..store import STORE
from ..workers import WORKERS
from .access import access
from .openapi import Reply, operation

log = logging.getLogger(__name__)


class Readiness:
    """What GET /readyz checks beside the database: whether this app has workers that must be
    running (roles all and worker), and whether it has begun shutting down."""

    def __init__(self, workers: bool) -> None:
        self.workers = workers
        self.stopping = False

    async def on_shutdown(self, app: web.Application) -> None:
        """on_shutdown (first): from now on the node is unready, while open requests drain."""
        self.stopping = True


READINESS = web.AppKey("readiness", Readiness)


class Alive(BaseModel):
    """Body of GET /healthz."""

    status: Literal["alive"]


class Check(BaseModel):
    """One readiness check's state."""

    ok: bool
    detail: str = Field(description='"ok", or what is wrong, in words.')


class Ready(BaseModel):
    """Body of GET /readyz: every check by name (database, workers where this node has them,
    shutdown), and the verdict."""

    status: Literal["ready", "unready"]
    checks: dict[str, Check] = Field(description="Each check by name: database, workers (roles with "
                                     "workers only), shutdown.")


@operation(
    "Liveness: the process answers",
    description="200 while the process serves HTTP at all; it checks nothing else (see /readyz).",
    tags=("operations",),
    replies={200: Reply(Alive, "The process is alive.")},
)
@access("public")
async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process is alive."""
    return web.json_response({"status": "alive"}, headers={"Cache-Control": "no-store"})


async def _database(request: web.Request) -> Check:
    timeout_s = request.app[SETTINGS].health.timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            await request.app[STORE].check_write()
    except TimeoutError:
        return Check(ok=False, detail=f"the database did not commit a write within {timeout_s:g} s")
    except Exception as exc:
        log.warning("readiness: the database write failed: %s", exc)
        return Check(ok=False, detail=f"the database write failed ({type(exc).__name__})")
    return Check(ok=True, detail="ok")


@operation(
    "Readiness: this node can take work",
    description="200 when the database commits a small write within [health] timeout_s, the worker pool runs "
    "(on nodes with workers), and the node is not shutting down; 503 otherwise. The body names every "
    "check and its state either way.",
    tags=("operations",),
    replies={
        200: Reply(Ready, "Ready: every check is ok."),
        503: Reply(Ready, "Unready: the checks whose ok is false say why."),
    },
)
@access("public")
async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: 200 when every check passes, else 503; the body names each check."""
    readiness = request.app[READINESS]
    checks = {"database": await _database(request)}
    if readiness.workers:
        pool = request.app.get(WORKERS)
        running = pool is not None and pool.running
        checks["workers"] = Check(ok=running, detail="ok" if running else "the worker pool is not running")
    checks["shutdown"] = Check(
        ok=not readiness.stopping, detail="shutting down" if readiness.stopping else "ok"
    )
    ready = all(check.ok for check in checks.values())
    body = Ready(status="ready" if ready else "unready", checks=checks)
    return web.json_response(
        text=body.model_dump_json(), status=200 if ready else 503, headers={"Cache-Control": "no-store"}
    )


@operation(
    "Metrics in the Prometheus text format",
    description="This process's counters and histograms, and gauges read from the database as it is scraped "
    "(the same on every node). Needs no API key: restrict it at the proxy, or turn it off ([metrics] enabled).",
    tags=("operations",),
    replies={200: Reply(str, "The metrics (text exposition format).", "text/plain")},
)
@access("public")
async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: every metric of this app's registry, the database's gauges read now."""
    found = request.app[METRICS]
    by_status, oldest = await request.app[STORE].job_counts()
    broadcaster = request.app.get(BROADCASTER)
    found.scraped(by_status, oldest, broadcaster.subscriber_count if broadcaster is not None else 0)
    return web.Response(
        body=generate_latest(found.registry), headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"}
    )
