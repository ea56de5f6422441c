"""Does a receiver that never answers slow job processing? Jobs/s with and without it.

The real server.py (SQLite, local provider at 64 px, 4 workers) runs as a child process; this
process submits one-image jobs over HTTP (16 at a time) and waits until none is pending or
processing. Three scenarios, alternating within each round so that they share the machine's
noise, each ratio taken against `no webhook` of the same round:

- no webhook: the jobs alone;
- hanging receiver: every job's webhook is a receiver on 127.0.0.1 that reads the request and
  never answers ([webhooks] timeout_s = 10: each attempt holds its slot for 10 s);
- answering receiver: the same, answering 200 at once.

The receivers run in this process, on a thread with its own event loop (loopback only).

    .venv/bin/python bench/webhook_bench.py [--jobs 600] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from common import server, until_no_job_runs

SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY="  # 32 bytes, bench only


class Receivers:
    """Two receivers on 127.0.0.1 on a thread of their own: one never answers, one answers 200."""

    def __init__(self) -> None:
        self.urls: dict[str, str] = {}
        self.received = {"hang": 0, "ok": 0}
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self._thread.start()
        self._ready.wait(10)

    async def _serve(self) -> None:
        async def hang(request: web.Request) -> web.Response:
            await request.read()
            self.received["hang"] += 1
            await asyncio.sleep(3600)
            return web.Response()

        async def ok(request: web.Request) -> web.Response:
            await request.read()
            self.received["ok"] += 1
            return web.Response(text="ok")

        for name, handler in (("hang", hang), ("ok", ok)):
            app = web.Application()
            app.router.add_post("/hook", handler)
            runner = web.AppRunner(app, shutdown_timeout=0)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.urls[name] = f"http://127.0.0.1:{port}/hook"
        self._ready.set()
        await asyncio.Event().wait()


async def run_jobs(base: str, jobs: int, webhook: str | None) -> float:
    """Submit `jobs` one-image jobs, 16 at a time; jobs/s until the last one ended."""
    body: dict[str, object] = {"numImages": 1}
    if webhook:
        body["webhook"] = webhook
    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        queue = asyncio.Queue[int]()
        for n in range(jobs):
            queue.put_nowait(n)

        async def submitter() -> None:
            while not queue.empty():
                queue.get_nowait()
                async with session.post(f"{base}/generations", json=body) as response:
                    assert response.status == 202, await response.text()

        await asyncio.gather(*(submitter() for _ in range(16)))
        await until_no_job_runs(session, base)
    return jobs / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    receivers = Receivers()
    scenarios = {"no webhook": None, "hanging receiver": receivers.urls["hang"], "answering receiver": receivers.urls["ok"]}
    results: dict[str, list[float]] = {name: [] for name in scenarios}
    ratios: dict[str, list[float]] = {name: [] for name in scenarios}
    with tempfile.TemporaryDirectory(prefix="imagegen-webhook-bench-") as scratch:
        for round_number in range(args.rounds):
            for name, webhook in scenarios.items():
                env = {
                    **os.environ,
                    "IMAGEGEN_STORAGE__DATA_DIR": str(Path(scratch) / f"{round_number}-{len(results[name])}-{name[:4]}"),
                    "IMAGEGEN_PROVIDER__IMAGE_SIZE": "64",
                    "IMAGEGEN_WORKERS__COUNT": "4",
                    "IMAGEGEN_SERVER__REQUEST_LOG": "false",
                    "IMAGEGEN_WEBHOOK_SECRET": SECRET,
                    "IMAGEGEN_WEBHOOKS__ALLOW_NETWORKS": '["127.0.0.1/32"]',
                    "IMAGEGEN_WEBHOOKS__TIMEOUT_S": "10",
                }
                with server("imagegen", [sys.executable, "server.py"], env, "/readyz", Path(scratch)) as base:
                    rate = asyncio.run(run_jobs(base, args.jobs, webhook))
                results[name].append(rate)
                print(f"round {round_number + 1}: {name:<20} {rate:7.1f} jobs/s", flush=True)
            for name in scenarios:
                ratios[name].append(results[name][-1] / results["no webhook"][-1])
    print(f"\n{args.jobs} one-image jobs at 64 px per run, {args.rounds} rounds; medians:")
    for name in scenarios:
        print(f"  {name:<20} {statistics.median(results[name]):7.1f} jobs/s  "
              f"{statistics.median(ratios[name]):.2f}x no webhook")
    print(f"  the hanging receiver got {receivers.received['hang']} requests (at most per_host = 4 open at a time, "
          f"none answered); the answering one {receivers.received['ok']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
