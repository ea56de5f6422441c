"""A reverse proxy for tests that serves the service under a path prefix, as nginx does with

    location /imagegen/ { proxy_pass http://127.0.0.1:8000/; proxy_buffering off; ... }

It strips the prefix, sets X-Forwarded-For (appended to), -Proto and -Host, passes answers
through as they arrive (the event streams go through it too), and redirects the bare prefix to
the prefix with a slash, as nginx does for such a location.

    proxy = PrefixProxy("/imagegen")
    server = await aiohttp_server(proxy.app())
    proxy.upstream = "http://127.0.0.1:8000"     # once the service is listening
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import hdrs, web

# Headers about one connection (RFC 9110 section 7.6.1), never passed on; and the framing of
# the answer, which this proxy makes anew.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "content-length",
})


class PrefixProxy:
    """Forwards `prefix`/... to `upstream`/... ."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.upstream = ""
        self.forwarded: list[str] = []  # every path it passed on, with its query
        self._session: aiohttp.ClientSession | None = None
        self._handling: set[asyncio.Task[object]] = set()

    def app(self) -> web.Application:
        app = web.Application()
        app.cleanup_ctx.append(self._client)
        app.on_shutdown.append(self._end_streams)
        app.router.add_get(self.prefix, self._to_slash)
        app.router.add_route("*", self.prefix + "/{tail:.*}", self._forward)
        return app

    async def _client(self, app: web.Application) -> AsyncIterator[None]:
        # No decompression: the answer's bytes go on as they came, with their Content-Encoding.
        self._session = aiohttp.ClientSession(auto_decompress=False)
        yield
        await self._session.close()

    async def _end_streams(self, app: web.Application) -> None:
        # A stream the browser left is noticed only at its next write: end them all here, as the
        # service ends its own, so that stopping the proxy waits for nothing.
        for task in self._handling:
            task.cancel()

    async def _to_slash(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPMovedPermanently(self.prefix + "/")

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None and self.upstream, "set upstream once the service listens"
        task = asyncio.current_task()
        assert task is not None
        self._handling.add(task)
        try:
            return await self._pass_on(request)
        finally:
            self._handling.discard(task)

    async def _pass_on(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        path = "/" + request.match_info["tail"]
        target = path + (f"?{request.query_string}" if request.query_string else "")
        self.forwarded.append(target)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP | {"host"}}
        sender = request.headers.get(hdrs.X_FORWARDED_FOR)
        headers[hdrs.X_FORWARDED_FOR] = f"{sender}, {request.remote}" if sender else str(request.remote)
        headers[hdrs.X_FORWARDED_PROTO] = request.scheme
        headers[hdrs.X_FORWARDED_HOST] = request.host
        body = await request.read()
        async with self._session.request(
            request.method, self.upstream + target, headers=headers, data=body or None, allow_redirects=False
        ) as answer:
            response = web.StreamResponse(status=answer.status, reason=answer.reason)
            for name, value in answer.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            await response.prepare(request)
            async for chunk in answer.content.iter_any():  # as it comes: no buffering
                await response.write(chunk)
            await response.write_eof()
            return response
