"""Cross-node wake-up latency on PostgreSQL: a job created on node A, claimed by a worker on node B.

    .venv/bin/python bench/wakeup_bench.py [--jobs 200] [--workers 4]

http_bench.py runs this too, at the end of its run, on its own PostgreSQL; run alone, it starts
a private, durable PostgreSQL of its own (tests/pgserver.py with fsync on, see common.py).

Node A is `server.py --role api` (HTTP, no workers), node B `server.py --role worker` (workers,
no HTTP), on one fresh database and one shared data directory. The jobs are created on A one
at a time, with a pause of 50-100 ms between them (random, so the creates cannot fall into step
with the service's 0.5 s and 1 s fallback polls): B's workers are idle whenever a job arrives,
so what is measured is waking up, not queueing.

For each job, the latency is its job.processing event's snapshot `updated_at` (stamped on B as
the claim starts) minus its job.created snapshot's `updated_at` (stamped on A as the create
starts, before its commit). Both are cut to the millisecond by the service and come from one
clock (one machine), so each figure reads up to 1 ms off. It covers A's commit and its fsync,
the NOTIFY, B's feed reading the event back, and B's dispatcher waking an idle worker.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from common import BENCH, ROOT, durable_postgres, fresh_database, headless, http, server, trouble

RESULTS = BENCH / "results" / "wakeup.json"
PAUSE_S = (0.05, 0.10)  # between two creates: uniform in this range
SEED = 13  # the pauses are random but the same every run


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile: the smallest value with at least p% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _epoch_ms(stamp: str) -> int:
    """An updated_at (ISO 8601, milliseconds, Z) as integer milliseconds since the epoch."""
    return round(datetime.fromisoformat(stamp).timestamp() * 1000)


def node_env(database_url: str, data_dir: Path, workers: int) -> dict[str, str]:
    return {
        **os.environ,
        "IMAGEGEN_STORAGE__BACKEND": "postgres",
        "IMAGEGEN_STORAGE__DATABASE_URL": database_url,
        "IMAGEGEN_STORAGE__DATA_DIR": str(data_dir),
        "IMAGEGEN_PROVIDER__IMAGE_SIZE": "64",  # fast jobs: each is done long before the next arrives
        "IMAGEGEN_PROVIDER__DELAY_S": "0",
        "IMAGEGEN_WORKERS__COUNT": str(workers),
    }


def _event_rows(database_url: str) -> list[tuple[str, str, str]]:
    import psycopg

    with psycopg.connect(database_url, connect_timeout=10) as conn:
        rows = conn.execute(
            "SELECT job_id, name, job FROM events"
            " WHERE name IN ('job.created', 'job.processing', 'job.completed') ORDER BY seq"
        ).fetchall()
    return [(row[0], row[1], row[2]) for row in rows]


def measure(
    pg: Any, tmp: Path, jobs: int = 200, workers: int = 4, database: str = "wakeup"
) -> dict[str, Any]:
    """Run nodes A and B on a fresh database `database` of `pg`, create `jobs` jobs on A, and
    return the figures."""
    rng = random.Random(SEED)
    data_dir = Path(tempfile.mkdtemp(prefix="data-wakeup-", dir=tmp))
    try:
        with fresh_database(pg, database) as database_url:
            env = node_env(database_url, data_dir, workers)
            python = sys.executable
            node_a = [python, "server.py", "--role", "api"]
            node_b = [python, "server.py", "--role", "worker"]
            with (
                server("wakeup-node-a", node_a, env, "/generations?limit=1", tmp) as url_a,
                headless("wakeup-node-b", node_b, env, "worker running", tmp) as log_b,
            ):
                ids: list[str] = []
                post_ms: list[float] = []
                started = time.monotonic()
                for _ in range(jobs):
                    t0 = time.perf_counter()
                    status, body = http("POST", url_a + "/generations", {"numImages": 1})
                    post_ms.append((time.perf_counter() - t0) * 1000)
                    assert status == 202, (status, body)
                    ids.append(json.loads(body)["jobId"])
                    time.sleep(rng.uniform(*PAUSE_S))  # the pause between creates; see the docstring
                created_s = time.monotonic() - started
                wanted = set(ids)
                deadline = time.monotonic() + 60
                while True:
                    rows = _event_rows(database_url)
                    if wanted <= {job_id for job_id, name, _ in rows if name == "job.completed"}:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError("node B did not complete every job within 60 s")
                    time.sleep(0.2)  # waiting for B's last jobs; bounded by the deadline
                log_a = tmp / f"wakeup-node-a-{url_a.rsplit(':', 1)[1]}.log"
            trouble_a, trouble_b = trouble(log_a), trouble(log_b)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)

    created: dict[str, int] = {}
    claimed: dict[str, int] = {}
    for job_id, name, snapshot in rows:
        stamp = _epoch_ms(json.loads(snapshot)["updated_at"])
        if name == "job.created":
            created[job_id] = stamp
        elif name == "job.processing":
            claimed.setdefault(job_id, stamp)  # the first claim (there is one per job: nothing fails)
    latencies = [claimed[i] - created[i] for i in ids]  # whole milliseconds
    return {
        "jobs": jobs,
        "workers": workers,
        "pause_s": list(PAUSE_S),
        "seconds_creating": round(created_s, 2),
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies),
        "mean_ms": round(statistics.fmean(latencies), 2),
        "over_100_ms": sum(v > 100 for v in latencies),
        "post_p50_ms": round(percentile(post_ms, 50), 2),
        "post_p99_ms": round(percentile(post_ms, 99), 2),
        "latencies_ms": latencies,
        "server_log_trouble": {
            "node A": {"lines": trouble_a[0], "first": trouble_a[1]},
            "node B": {"lines": trouble_b[0], "first": trouble_b[1]},
        },
    }


def summary_line(result: dict[str, Any]) -> str:
    return (
        f"wake-up, create on A -> claimed on B ({result['jobs']} jobs, {result['workers']} workers on B): "
        f"p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, max {result['max_ms']:.0f} ms"
        f" ({result['over_100_ms']} over 100 ms; the POSTs on A: p50 {result['post_p50_ms']:.1f} ms,"
        f" p99 {result['post_p99_ms']:.1f} ms)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description="imagegen cross-node wake-up latency on PostgreSQL")
    parser.add_argument("--jobs", type=int, default=200, help="jobs created on node A (default 200)")
    parser.add_argument("--workers", type=int, default=4, help="workers.count on node B (default 4)")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the children, delete the cluster
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="imagegen-wakeup-") as tmp, durable_postgres() as pg:
        result = measure(pg, Path(tmp), args.jobs, args.workers)
    print(summary_line(result))
    for node, found in result["server_log_trouble"].items():
        for line in found["first"]:
            print(f"  {node} log: {line}")
    result["loadavg"] = {"start": load_start, "end": os.getloadavg()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
