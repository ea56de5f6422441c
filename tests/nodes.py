"""Helpers for the multi-node tests: several real server.py processes on one PostgreSQL database.

Every node shares the test's data directory (as nodes sharing one mounted volume would), so an
image drawn on one node is served by any other. Nodes talk only to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, TypeVar

import aiohttp

from .conftest import TestDatabase
from .serverproc import ServerProcess
from .sse import SSEReader

T = TypeVar("T")

# Small images (fast to draw), no shutdown grace unless a test sets one.
BASE_ENV = {
    "IMAGEGEN_PROVIDER__IMAGE_SIZE": "64",
    "IMAGEGEN_WORKERS__SHUTDOWN_GRACE_S": "0",
}

TERMINAL = ("job.completed", "job.failed", "job.canceled")

# Event streams stay open for a whole test: no total deadline, only between reads.
STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30)


class Cluster:
    """The server.py processes of one test, all on `database`. close() kills what still runs."""

    def __init__(self, database: TestDatabase, env: dict[str, str] | None = None) -> None:
        assert database.backend == "postgres", "multi-node tests need the postgres backend"
        self.database = database
        self.env = {**database.env, **BASE_ENV, **(env or {})}
        self.nodes: list[ServerProcess] = []

    def node(self, env: dict[str, str] | None = None, role: str = "all") -> ServerProcess:
        """A node (not started yet) with the cluster's settings and `env` on top."""
        args = [] if role == "all" else ["--role", role]
        proc = ServerProcess(self.database.data_dir, {**self.env, **(env or {})}, args=args)
        self.nodes.append(proc)
        return proc

    def start(self, *nodes: ServerProcess, timeout: float = 30.0) -> None:
        """Start `nodes` side by side and return once every one is ready."""
        offsets = [node.spawn() for node in nodes]
        for node, offset in zip(nodes, offsets):
            node.wait_ready(offset, timeout)

    def start_nodes(
        self, count: int, env: dict[str, str] | None = None, role: str = "all"
    ) -> list[ServerProcess]:
        nodes = [self.node(env, role) for _ in range(count)]
        self.start(*nodes)
        return nodes

    def owner_node(self, owner: str | None) -> ServerProcess | None:
        """The node whose worker pool holds a lease named `owner` (host:pid:random)."""
        if owner is None:
            return None
        pid = int(owner.split(":")[-2])
        return next((node for node in self.nodes if node.proc is not None and node.proc.pid == pid), None)

    def close(self) -> None:
        for node in self.nodes:
            if node.running:
                node.kill9()  # SIGKILL ends a SIGSTOPped process too

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- node {n.port} ({n.role}) ---\n{n.log_text()[-tail:]}" for n in self.nodes)

    async def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Read what was committed, on a plain connection of its own (off the event loop)."""
        return await asyncio.to_thread(self.database.rows, sql, params)

    async def job_row(self, job_id: str) -> dict[str, Any]:
        (row,) = await self.rows("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return row

    async def job_events(self, job_id: str) -> list[dict[str, Any]]:
        sql = "SELECT seq, name, created_at FROM events WHERE job_id = ? ORDER BY seq"
        return await self.rows(sql, (job_id,))


async def until(check: Callable[[], Awaitable[T]], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll `check` until it returns something truthy (returned), failing after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what} (last: {last!r})")
        await asyncio.sleep(interval)  # polling interval, bounded by the deadline


async def post_job(
    session: aiohttp.ClientSession,
    node: ServerProcess,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """POST /generations on `node`: (status, JSON body, headers)."""
    payload = {"numImages": 1, **(body or {})}
    async with session.post(f"{node.url}/generations", json=payload, headers=headers) as r:
        return r.status, await r.json(content_type=None), dict(r.headers)


async def create(session: aiohttp.ClientSession, node: ServerProcess, **body: Any) -> str:
    status, answer, _ = await post_job(session, node, body)
    assert status == 202, answer
    return answer["jobId"]


async def get_job(session: aiohttp.ClientSession, node: ServerProcess, job_id: str) -> dict[str, Any]:
    async with session.get(f"{node.url}/generations/{job_id}") as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def wait_status(
    session: aiohttp.ClientSession,
    node: ServerProcess,
    job_id: str,
    statuses: Iterable[str],
    timeout: float = 20.0,
) -> dict[str, Any]:
    wanted = set(statuses)

    async def check() -> dict[str, Any] | None:
        job = await get_job(session, node, job_id)
        return job if job["status"] in wanted else None

    return await until(check, timeout, f"job {job_id} {sorted(wanted)} on {node.url}")


@asynccontextmanager
async def stream(
    session: aiohttp.ClientSession, url: str, last_event_id: int | None = None
) -> AsyncIterator[SSEReader]:
    """An open event stream at `url` (resuming after `last_event_id`), closed on exit."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    async with session.get(url, headers=headers, timeout=STREAM_TIMEOUT) as response:
        assert response.status == 200, await response.text()
        yield SSEReader(response)


def parse_time(text: str) -> datetime:
    """An API/database timestamp (ISO 8601 UTC with milliseconds and Z)."""
    return datetime.fromisoformat(text)


def ms_between(earlier: str, later: str) -> float:
    return (parse_time(later) - parse_time(earlier)).total_seconds() * 1000


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
