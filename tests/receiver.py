"""A webhook receiver for the tests: a real aiohttp server on a loopback address that records
every request (headers, body, time) and answers from a script, as a real receiver would."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()


@dataclass
class Receiver:
    """`answers`: the statuses to give, in order (then `then`); an entry may be (status, headers),
    or "hang" to never answer."""

    answers: list[Any] = field(default_factory=list)
    then: Any = 200
    received: list[Received] = field(default_factory=list)
    open_now: int = 0  # requests being answered right now
    most_open: int = 0
    url: str = ""
    body: bytes = b"ok"  # what each answer carries
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(Received(dict(request.headers), await request.read(), time.monotonic()))
        self.arrived.set()
        answer = self.answers.pop(0) if self.answers else self.then
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            if answer == "hang":
                await asyncio.sleep(3600)
            status, headers = answer if isinstance(answer, tuple) else (answer, {})
            return web.Response(status=status, body=self.body, headers=headers)
        finally:
            self.open_now -= 1

    async def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            assert time.monotonic() < deadline, f"{len(self.received)} of {count} deliveries arrived"
            await asyncio.sleep(0.02)
        return self.received


@asynccontextmanager
async def receiver(host: str = "127.0.0.1", **kwargs: Any) -> AsyncIterator[Receiver]:
    """A Receiver listening on `host` (a loopback address) at a free port, path /hook."""
    recv = Receiver(**kwargs)
    app = web.Application()
    app.router.add_post("/hook", recv.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    shown = f"[{host}]" if ":" in host else host
    recv.url = f"http://{shown}:{port}/hook"
    try:
        yield recv
    finally:
        await runner.cleanup()
