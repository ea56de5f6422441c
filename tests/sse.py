"""A small server-sent-events reader for tests, following the WHATWG parsing rules."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Event:
    name: str
    data: str
    id: str | None  # the id field of this event, if it had one

    @property
    def job(self) -> dict[str, Any]:
        return json.loads(self.data)

    @property
    def seq(self) -> int:
        assert self.id is not None, f"{self.name} has no id"
        return int(self.id)


@dataclass
class SSEReader:
    """Reads events from an open text/event-stream response."""

    response: aiohttp.ClientResponse
    comments: list[str] = field(default_factory=list)
    retry: int | None = None

    async def next(self, timeout: float = 10.0) -> Event | None:
        """The next dispatched event, or None when the stream ends."""
        return await asyncio.wait_for(self._next(), timeout)

    async def _next(self) -> Event | None:
        name, data, event_id, has_id = "", [], None, False
        while True:
            raw = await self.response.content.readline()
            if not raw:
                return None
            line = raw.decode().rstrip("\r\n")
            if line == "":
                if data:
                    return Event(name or "message", "\n".join(data), event_id if has_id else None)
                name, data, has_id = "", [], False
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)
            elif key == "id":
                event_id, has_id = value, True
            elif key == "retry":
                self.retry = int(value)

    async def comment(self, timeout: float = 10.0) -> str:
        """Read raw lines until a comment line (a heartbeat) arrives; return its text.
        Only for a stream with no events pending: events read meanwhile are discarded."""

        async def read() -> str:
            while True:
                raw = await self.response.content.readline()
                assert raw, "stream ended before a comment"
                if raw.startswith(b":"):
                    return raw.decode()[1:].strip()

        return await asyncio.wait_for(read(), timeout)

    async def until(self, predicate, timeout: float = 20.0) -> list[Event]:
        """Events up to and including the first for which predicate(event) is true."""

        async def collect() -> list[Event]:
            events = []
            while True:
                event = await self._next()
                assert event is not None, f"stream ended before the awaited event; got {events}"
                events.append(event)
                if predicate(event):
                    return events

        return await asyncio.wait_for(collect(), timeout)

    async def rest(self, timeout: float = 20.0) -> list[Event]:
        """Every event until the server ends the stream."""

        async def collect() -> list[Event]:
            events = []
            while (event := await self._next()) is not None:
                events.append(event)
            return events

        return await asyncio.wait_for(collect(), timeout)


TERMINAL = {"job.completed", "job.failed", "job.canceled"}


def is_terminal_of(job_id: str):
    return lambda event: event.name in TERMINAL and event.job["jobId"] == job_id
