"""End to end: one-image jobs completed per second, and what the service itself costs per image.

The server runs as a child process on SQLite (bench/predrawn_server.py: server.py plus a
"predrawn" provider whose every image is one PNG drawn at start-up, so a job costs only the
service's work: admission, claim, storing the file, progress, completion and their events), and,
for comparison, with the local provider drawing at 64 and 512 px. This process submits the jobs
(64 at a time) and waits until none is pending or processing. The service's cost per image is
the server process's CPU time (user + system, from /proc) over the run, divided by the images.

    .venv/bin/python bench/e2e_bench.py [--jobs 3000] [--workers 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from common import server, until_no_job_runs

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def server_pid(port: int) -> int:
    """The pid of the process listening on `port` (the child server)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[1].endswith(f":{port:04X}") and parts[3] == "0A":
            inode = parts[9]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]" for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
        except OSError:
            continue
    raise RuntimeError(f"no process listens on {port}")


async def run_jobs(base: str, jobs: int) -> float:
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        remaining = iter(range(jobs))

        async def submitter() -> None:
            for _ in remaining:
                async with session.post(f"{base}/generations", json={"numImages": 1}) as response:
                    assert response.status == 202, await response.text()

        await asyncio.gather(*(submitter() for _ in range(64)))
        await until_no_job_runs(session, base, interval=0.01)
    return jobs / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    scenarios = [("predrawn, 64 px", "predrawn", 64, args.jobs), ("local, 64 px", "local", 64, args.jobs),
                 ("local, 512 px", "local", 512, max(200, args.jobs // 10))]
    rows = []
    with tempfile.TemporaryDirectory(prefix="imagegen-e2e-bench-") as scratch:
        for name, provider, size, jobs in scenarios:
            env = {**os.environ, "IMAGEGEN_STORAGE__DATA_DIR": str(Path(scratch) / provider / str(size)),
                   "IMAGEGEN_PROVIDER__NAME": provider, "IMAGEGEN_PROVIDER__IMAGE_SIZE": str(size),
                   "IMAGEGEN_WORKERS__COUNT": str(args.workers), "IMAGEGEN_WORKERS__MAX_PENDING": str(jobs + 10),
                   "IMAGEGEN_SERVER__REQUEST_LOG": "false"}
            argv = [sys.executable, "bench/predrawn_server.py"]
            with server("imagegen", argv, env, "/readyz", Path(scratch)) as base:
                pid = server_pid(int(base.rsplit(":", 1)[1]))
                cpu_before = cpu_seconds(pid)
                rate = asyncio.run(run_jobs(base, jobs))
                cpu_per_image_us = (cpu_seconds(pid) - cpu_before) / jobs * 1e6
            rows.append((name, jobs, rate, cpu_per_image_us))
            print(f"{name:<16} {jobs:>5} jobs  {rate:8.1f} jobs/s  {cpu_per_image_us:8.0f} us of server CPU per image", flush=True)
    base_rate = rows[0][2]
    print(f"\none process on SQLite, {args.workers} workers, one-image jobs; ratios against predrawn:")
    for name, _, rate, cpu in rows:
        print(f"  {name:<16} {rate:8.1f} jobs/s  {rate / base_rate:5.2f}x  {cpu:8.0f} us/image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
