"""Headless Chromium for tests, driven over the DevTools protocol with aiohttp's websocket client.

The browser can reach only the machine itself, under the name `HOST` (so pages see a real
host name, not localhost) or 127.0.0.1: every other host fails to resolve, and a proxy on a
closed port catches whatever would not. Each page records every URL it asked for, and its
uncaught errors, console errors and refused loads.

    async with Browser() as browser:
        page = await browser.open(f"http://{HOST}:{port}/docs")
        count = await page.wait_for("document.querySelectorAll('.opblock').length")
        title = await page.evaluate("document.title")
        assert page.outside_requests(port) == [] and page.errors == []
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import tempfile
from collections import defaultdict
from typing import Any, Self
from urllib.parse import urlsplit

import aiohttp

HOST = "imagegen.test"

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    f"--host-resolver-rules=MAP {HOST} 127.0.0.1, MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--proxy-server=http://127.0.0.1:9",  # the discard port: closed, so a proxied request fails
    f"--proxy-bypass-list={HOST};127.0.0.1",
    "--remote-debugging-port=0",
]

_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


class BrowserError(Exception):
    """The browser refused a command, or a script threw."""


class Page:
    """One tab: evaluate JavaScript in it, wait for a condition, see what it loaded."""

    def __init__(self, browser: Browser, session_id: str) -> None:
        self._browser = browser
        self._session_id = session_id
        self.requests: list[str] = []
        self.errors: list[str] = []
        self._waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = defaultdict(list)

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._browser.send(method, params, self._session_id)

    def next_event(self, method: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the next `method` event of this page."""
        future = asyncio.get_running_loop().create_future()
        self._waiters[method].append(future)
        return future

    def on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details["text"])
        elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
            self.errors.append(" ".join(str(arg.get("value", arg.get("description"))) for arg in params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(params["entry"]["text"])
        for future in self._waiters.pop(method, []):
            if not future.done():
                future.set_result(params)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (a promise is awaited)."""
        result = await self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in result:
            raise BrowserError(result["exceptionDetails"].get("exception", {}).get("description", result))
        return result["result"].get("value")

    async def wait_for(self, condition: str, timeout: float = 20.0) -> Any:
        """The first truthy value of `condition`, checked by the page on each animation frame."""
        poll = f"""new Promise(resolve => {{
            const check = () => {{ const value = ({condition}); value ? resolve(value) : requestAnimationFrame(check); }};
            check();
        }})"""
        try:
            return await asyncio.wait_for(self.evaluate(poll), timeout)
        except TimeoutError:
            raise TimeoutError(f"not true within {timeout}s: {condition}; errors: {self.errors}") from None

    def outside_requests(self, port: int) -> list[str]:
        """Every URL the page asked for that is not this machine's server on `port` (or inline)."""
        outside = []
        for url in self.requests:
            parts = urlsplit(url)
            if parts.scheme in ("data", "blob", "about"):
                continue
            if parts.hostname not in (HOST, "127.0.0.1") or parts.port != port:
                outside.append(url)
        return outside


class Browser:
    """Headless Chromium, started on entry and stopped on exit."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pages: dict[str, Page] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Self:
        self._profile = tempfile.TemporaryDirectory(prefix="imagegen-chromium-")
        self._process = await asyncio.create_subprocess_exec(
            CHROMIUM, *FLAGS, f"--user-data-dir={self._profile.name}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        try:
            url = await asyncio.wait_for(self._devtools_url(), 30)
            self._tasks.append(asyncio.create_task(self._drain_stderr(), name="chromium-stderr"))
            self._session = aiohttp.ClientSession()
            self._socket = await self._session.ws_connect(url, max_msg_size=0)
        except BaseException:
            await self._stop()
            raise
        self._tasks.append(asyncio.create_task(self._read(), name="chromium-devtools"))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop()

    async def _stop(self) -> None:
        if getattr(self, "_socket", None) is not None:
            await self._socket.close()
        if getattr(self, "_session", None) is not None:
            await self._session.close()
        if self._process.returncode is None:
            self._process.terminate()
        await self._process.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._profile.cleanup()

    async def _devtools_url(self) -> str:
        assert self._process.stderr is not None
        while line := await self._process.stderr.readline():
            if found := _LISTENING.search(line.decode(errors="replace")):
                return found.group(1)
        raise BrowserError(f"chromium exited with {await self._process.wait()} before listening")

    async def _drain_stderr(self) -> None:
        # Chromium keeps logging; an unread pipe would fill up and stall it.
        assert self._process.stderr is not None
        while await self._process.stderr.readline():
            pass

    async def _read(self) -> None:
        async for message in self._socket:
            data = json.loads(message.data)
            if "id" in data:
                future = self._calls.pop(data["id"])
                if future.done():
                    continue  # its caller gave up waiting (wait_for timed out)
                if "error" in data:
                    future.set_exception(BrowserError(data["error"]))
                else:
                    future.set_result(data.get("result", {}))
            elif (page := self._pages.get(data.get("sessionId", ""))) is not None:
                page.on_event(data["method"], data.get("params", {}))
        for future in self._calls.values():
            if not future.done():
                future.set_exception(BrowserError("the browser closed the connection"))

    async def send(self, method: str, params: dict[str, Any] | None = None, session_id: str | None = None) -> dict[str, Any]:
        """Run one DevTools protocol command and return its result."""
        call_id = next(self._ids)
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        future = self._calls[call_id] = asyncio.get_running_loop().create_future()
        await self._socket.send_json(message)
        return await future

    async def open(self, url: str, timeout: float = 30.0) -> Page:
        """A new tab showing `url`, once its load event has fired."""
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = self._pages[attached["sessionId"]] = Page(self, attached["sessionId"])
        for domain in ("Network", "Runtime", "Log", "Page"):
            await page.send(f"{domain}.enable")
        loaded = page.next_event("Page.loadEventFired")
        navigated = await page.send("Page.navigate", {"url": url})
        if "errorText" in navigated:
            raise BrowserError(f"{url}: {navigated['errorText']}")
        await asyncio.wait_for(loaded, timeout)
        return page
