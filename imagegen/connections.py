"""What the process does about its connections under pressure: enough file descriptors, accept
errors and malformed requests logged briefly, not as torrents of tracebacks.

- systemd starts services with a soft limit of 1,024 open files: a thousand idle connections
  then make every new one fail in accept(). The soft limit is raised to the hard one at start.
- When accept() fails anyway (EMFILE, ENFILE, ENOBUFS), asyncio stops accepting for a second
  and reports it with a traceback each time; that is logged at most once per ACCEPT_LOG_EVERY_S
  with how many there were.
- A malformed request (aiohttp answers it 400) is a one-line WARNING, not an ERROR with a
  traceback: it is the client's mistake, not the service's.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger("imagegen.connections")

ACCEPT_LOG_EVERY_S = 5.0


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit; return (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):  # a kernel cap below the hard limit (nr_open): keep the soft one
            return soft, soft
        return soft, wanted
    return soft, soft


class AcceptErrors:
    """A loop exception handler that counts accept() failures and logs them at most once per
    ACCEPT_LOG_EVERY_S; every other report goes to the loop's default handler."""

    def __init__(self, every_s: float = ACCEPT_LOG_EVERY_S) -> None:
        self._every_s = every_s
        self._count = 0
        self._last_logged = float("-inf")

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            loop.default_exception_handler(context)
            return
        self._count += 1
        now = time.monotonic()
        if now - self._last_logged >= self._every_s:
            exc = context.get("exception")
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            log.warning(
                "cannot accept new connections (%s): %d times since the last report; open files are limited "
                "to %d", reason, self._count, resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            )
            self._count = 0
            self._last_logged = now


class ProtocolErrors(logging.Filter):
    """On aiohttp's server logger: a malformed request becomes one WARNING line, without the
    traceback (the client was answered 400 already)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = "malformed request from %s answered 400: %s"
            record.args = (*(record.args or ("?",))[:1], str(exc.message).strip().splitlines()[0][:200])
            record.exc_info = None
            record.exc_text = None
        return True


def install(loop: asyncio.AbstractEventLoop) -> None:
    """The handlers above, on this loop and aiohttp's server logger."""
    loop.set_exception_handler(AcceptErrors())
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ProtocolErrors) for f in server_log.filters):
        server_log.addFilter(ProtocolErrors())
