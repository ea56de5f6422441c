"""Run imagegen: python server.py [--config PATH] [--host H] [--port P] [--role all|api|worker]."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from aiohttp import web
from pydantic import ValidationError

from imagegen import connections
from imagegen.app import ROLES, create_app
from imagegen.config import ENV_PREFIX, ConfigError, ServerSettings, Settings, load_settings
from imagegen.errors import StartupError
from imagegen.logs import RequestLog, configure as configure_logging, requests_log, shutdown_summary, startup_summary

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.toml"

# The cyclic garbage collector's thresholds (generation 0, 1, 2). Python's default (700, 10, 10)
# runs a full collection every 70,000 net allocations; a busy server holds hundreds of thousands
# of long-lived objects (queued ids, recent jobs, open streams), and walking them all stalled
# requests for tens of milliseconds (bench/http_bench.py: create p99 26-30 ms, 7-9 ms with these).
# Reference counting still frees almost everything at once; only cycles wait longer.
GC_THRESHOLDS = (50_000, 20, 100)


EPILOG = f"""\
Every setting in the config file can be overridden from the environment as
{ENV_PREFIX}<SECTION>__<KEY> (or {ENV_PREFIX}<SECTION>__<SUBSECTION>__<KEY>), with the value
written as in TOML: e.g. {ENV_PREFIX}SERVER__PORT=9000, {ENV_PREFIX}STORAGE__DATA_DIR=/srv/imagegen,
{ENV_PREFIX}JOBS__ANIMALS='["cat", "owl"]', {ENV_PREFIX}PROVIDER__OPENAI__MODEL=dall-e-3.
--host and --port win over both the file and the environment. A server that cannot
start says why in one line and exits with status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (and exit status 2, as argparse does)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        description="imagegen: the image-generation job service",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="TOML settings file")
    parser.add_argument("--host", help="listen address (overrides server.host)")
    parser.add_argument("--port", type=int, help="listen port (overrides server.port)")
    parser.add_argument(
        "--role", choices=ROLES, default="all",
        help="api: serve HTTP and streams; worker: draw jobs, serve nothing; all: both (default)",
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"imagegen: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.role != "all" and settings.storage.backend == "sqlite":
        print(
            f"imagegen: --role {args.role} needs [storage] backend = \"postgres\": on SQLite one process "
            "owns the database file, so it runs as --role all",
            file=sys.stderr,
        )
        return 2
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:  # validated like the file's values: --port 70000 is refused here, not by the socket
        server = ServerSettings.model_validate({**settings.server.model_dump(), **overrides})
    except ValidationError as exc:
        first = exc.errors()[0]
        print(f"imagegen: configuration error: --{first['loc'][0]}: {first['msg']}", file=sys.stderr)
        return 2
    settings = settings.model_copy(update={"server": server})
    configure_logging(settings.server.log_format)
    before, after = connections.raise_open_files_limit()
    if after > before:
        logging.getLogger("imagegen").info("open files limit raised from %d to %d", before, after)
    gc.set_threshold(*GC_THRESHOLDS)
    # Set once every resource has opened: an OSError after it is the listening socket's.
    started = False

    async def mark_started(_app: web.Application) -> None:
        nonlocal started
        started = True
        connections.install(asyncio.get_running_loop())

    try:
        if args.role == "worker":
            asyncio.run(run_worker(settings))
            return 0
        app = create_app(settings, args.role)
        app.on_startup.append(mark_started)  # after the cleanup contexts' start-up halves
        # shutdown_timeout bounds how long open requests may hold a graceful stop.
        web.run_app(
            app,
            host=settings.server.host,
            port=settings.server.port,
            shutdown_timeout=settings.workers.shutdown_grace_s,
            # One line per request from aiohttp's access logger, handed each finished answer:
            # no middleware (see imagegen/logs.py).
            access_log_class=RequestLog,
            access_log=requests_log if settings.server.request_log else None,
            # Called once the socket listens: a server that cannot start logs nothing but its error.
            print=lambda _: startup_summary(
                app, args.role, f"serving on http://{settings.server.host}:{settings.server.port}"
            ),
        )
        shutdown_summary(app)
    except ConfigError as exc:  # found at start-up, e.g. a provider's secret missing from the environment
        print(f"imagegen: configuration error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:  # e.g. the database cannot be reached
        print(f"imagegen: cannot start: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if not started:
            print(f"imagegen: cannot start: {_os_error(exc)}", file=sys.stderr)
        else:  # run_app binds after start-up: a port in use, an address this host does not have
            address = f"{settings.server.host}:{settings.server.port}"
            print(f"imagegen: cannot listen on {address}: {_os_error(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # anything else a resource raised while opening: still one line
        if started:
            raise
        print(f"imagegen: cannot start: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


def _os_error(exc: OSError) -> str:
    # "address already in use" rather than asyncio's "[Errno 98] error while attempting to bind ...".
    return os.strerror(exc.errno).lower() if exc.errno else str(exc)


async def run_worker(settings: Settings) -> None:
    """--role worker: the app's resources and workers, no listening socket, until SIGINT/SIGTERM."""
    app = create_app(settings, "worker")
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()  # runs the cleanup contexts' start-up halves: store, dispatcher, workers
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    startup_summary(app, "worker", "worker running; no HTTP served")
    try:
        await stop.wait()
    finally:
        await runner.cleanup()  # on_shutdown (the workers' grace starts), then the contexts unwind
    shutdown_summary(app)


if __name__ == "__main__":
    sys.exit(main())
