"""Run imagegen: python server.py [--config PATH] [--host H] [--port P] [--role all|api|worker]."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path

from aiohttp import web

from imagegen.app import ROLES, create_app
from imagegen.config import ConfigError, Settings, load_settings
from imagegen.errors import StartupError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.toml"

# The cyclic garbage collector's thresholds (generation 0, 1, 2). Python's default (700, 10, 10)
# runs a full collection every 70,000 net allocations; a busy server holds hundreds of thousands
# of long-lived objects (queued ids, recent jobs, open streams), and walking them all stalled
# requests for tens of milliseconds (bench/http_bench.py: create p99 26-30 ms, 7-9 ms with these).
# Reference counting still frees almost everything at once; only cycles wait longer.
GC_THRESHOLDS = (50_000, 20, 100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="imagegen: the image-generation job service")
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
    server = settings.server.model_copy(
        update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    )
    settings = settings.model_copy(update={"server": server})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        if args.role == "worker":
            asyncio.run(run_worker(settings))
            return 0
        # shutdown_timeout bounds how long open requests may hold a graceful stop.
        web.run_app(
            create_app(settings, args.role),
            host=settings.server.host,
            port=settings.server.port,
            shutdown_timeout=settings.workers.shutdown_grace_s,
            access_log=None,
            print=lambda _: logging.getLogger("imagegen").info(
                "serving on http://%s:%d", settings.server.host, settings.server.port
            ),
        )
    except ConfigError as exc:  # found at start-up, e.g. a provider's secret missing from the environment
        print(f"imagegen: configuration error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:  # e.g. the database cannot be reached
        print(f"imagegen: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


async def run_worker(settings: Settings) -> None:
    """--role worker: the app's resources and workers, no listening socket, until SIGINT/SIGTERM."""
    runner = web.AppRunner(create_app(settings, "worker"), handle_signals=False)
    await runner.setup()  # runs the cleanup contexts' start-up halves: store, dispatcher, workers
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    logging.getLogger("imagegen").info("worker running (%s backend); no HTTP served", settings.storage.backend)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()  # on_shutdown (the workers' grace starts), then the contexts unwind


if __name__ == "__main__":
    sys.exit(main())
