"""HTTP benchmark: imagegen's create and get routes against a bare aiohttp ceiling, loaded by wrk.

    .venv/bin/python bench/http_bench.py [--duration 10] [--warmup 3] [--rounds 2] [--no-postgres]

Each scenario runs wrk (64 connections, 2 threads) against child servers on 127.0.0.1, once per
round, in the order of SCENARIOS: the bare ceiling first, then the service on SQLite (one
process), on PostgreSQL (one process) and on PostgreSQL (two processes, one wrk thread on each);
the summary is the median over rounds, and each ratio to the bare ceiling is taken within one
round. The real service gets a fresh data directory per scenario, and on PostgreSQL a fresh
database too, so the backlog of jobs that one create run leaves behind cannot steal CPU from
the next scenario. The PostgreSQL is private (tests/pgserver.py) and durable (fsync on).
After the rounds, wakeup_bench.py measures the cross-node wake-up latency on the same
PostgreSQL. Results are printed as a table and written to bench/results/http.json.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import (
    BENCH, DURABLE_PG_SETTINGS, PG_TROUBLE, ROOT,
    durable_postgres, fresh_database, http, pg_setting, server, trouble,
)

RESULTS = BENCH / "results" / "http.json"
LOGS = BENCH / "results" / "logs"  # with --keep-logs

CONNECTIONS = 64
# Seconds per image for the create scenario's provider (the seed's IMAGE_PROVIDER_DELAY).
CREATE_DELAY_S = 2.0
THREADS = 2
GET_JOBS = 200  # distinct rows the GET scenarios cycle through
WRK_TIMEOUT = "10s"  # wrk's default of 2 s would drop slow responses instead of counting them in p99

# name -> (server, route); the order is the run order. Servers: "baseline" is
# bench/baseline_app.py; "sqlite" one server.py on SQLite; "pg1" one server.py on PostgreSQL;
# "pg2" two server.py processes on one PostgreSQL database and one data directory;
# "sqlite-nometrics" the SQLite one with [metrics] enabled = false, what the metrics cost.
SCENARIOS = {
    "bare POST": ("baseline", "create"),
    "create (no metrics)": ("sqlite-nometrics", "create"),
    "create": ("sqlite", "create"),
    "create (pg, 1 proc)": ("pg1", "create"),
    "create (pg, 2 procs)": ("pg2", "create"),
    "bare GET": ("baseline", "get"),
    "get": ("sqlite", "get"),
    # The same as "get" with [server] request_log off: what one log line per request costs.
    "get (no request log)": ("sqlite-quiet", "get"),
    "get (pg, 1 proc)": ("pg1", "get"),
    "get (pg, 2 procs)": ("pg2", "get"),
}
PROCESSES = {"sqlite": 1, "sqlite-nometrics": 1, "sqlite-quiet": 1, "pg1": 1, "pg2": 2}
TARGETS = {
    "create": {"baseline": "bare POST", "min_ratio": 0.6, "max_p99_ms": 25.0},
    "get": {"baseline": "bare GET", "min_ratio": 0.8, "max_p99_ms": None},
}
# No targets on PostgreSQL yet: their ratios are reported, not judged.
REPORTED = {
    "get (no request log)": "bare GET",
    "create (pg, 1 proc)": "bare POST",
    "create (pg, 2 procs)": "bare POST",
    "get (pg, 1 proc)": "bare GET",
    "get (pg, 2 procs)": "bare GET",
}
# What the metrics cost: creates with them (the default) over creates without, in one round.
# The target is that they cost less than 5% of create throughput.
METRICS_COST = {"create": "create (no metrics)"}
METRICS_MIN_RATIO = 0.95

# wrk calls done() once, after the run: print the numbers as one JSON line, so no parsing of
# wrk's human-readable units is needed. Latencies are in microseconds, over every thread.
LUA_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d,'
      .. ' "max_us": %d, "errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""

LUA_POST = """
wrk.method = "POST"
wrk.body = '{"numImages": 1}'
wrk.headers["Content-Type"] = "application/json"
""" + LUA_DONE

# Each wrk thread walks the paths round-robin, so every read hits a different row in turn.
LUA_GET = """
local paths = {PATHS}
local i = 0
request = function()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
""" + LUA_DONE

# Two processes: wrk connects each thread to one address (setup() runs once per thread before
# it starts), so thread 1's connections go to the first port and thread 2's to the second, half
# of the connections each. One wrk, so its requests/s and latency percentiles are over both.
# Every request carries the first server's Host header, which neither server cares about.
LUA_SPREAD = """
local ports = {PORTS}
local threads = 0
setup = function(thread)
  threads = threads + 1
  thread.addr = wrk.lookup("127.0.0.1", ports[(threads - 1) % #ports + 1])[1]
end
"""


# --- child processes -----------------------------------------------------------------------


@contextlib.contextmanager
def real_service(
    tmp: Path,
    workers: int,
    delay_s: float = 0.0,
    *,
    name: str = "real",
    extra_env: dict[str, str] | None = None,
    data_dir: Path | None = None,
) -> Iterator[str]:
    """`python server.py` with a fresh data directory (or `data_dir`, left to its owner)."""
    own = data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="data-", dir=tmp)) if data_dir is None else data_dir
    env = {
        **os.environ,
        "IMAGEGEN_STORAGE__DATA_DIR": str(data_dir),
        # Small images: the jobs the benchmark creates must not be what it measures.
        "IMAGEGEN_PROVIDER__IMAGE_SIZE": "64",
        "IMAGEGEN_PROVIDER__DELAY_S": str(delay_s),
        "IMAGEGEN_WORKERS__COUNT": str(workers),
        # A create run queues tens of thousands of jobs: backpressure would answer most of
        # them 429, and the benchmark would measure refusals instead of creates.
        "IMAGEGEN_WORKERS__MAX_PENDING": "100000000",
        **(extra_env or {}),
    }
    try:
        with server(name, [sys.executable, "server.py"], env, "/generations?limit=1", tmp) as url:
            yield url
    finally:
        if own:
            shutil.rmtree(data_dir, ignore_errors=True)


def create_completed_jobs(url: str, count: int, timeout: float = 120.0) -> list[str]:
    """Create `count` (at most 200) jobs and wait until the workers have completed them all."""
    ids = []
    for _ in range(count):
        status, body = http("POST", url + "/generations", {"numImages": 1})
        assert status == 202, (status, body)
        ids.append(json.loads(body)["jobId"])
    deadline = time.monotonic() + timeout
    # The data directory (and database) is fresh, so one page of completed jobs holds them all.
    while not set(ids) <= {job["jobId"] for job in _completed(url)}:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} jobs did not complete within {timeout} s")
        time.sleep(0.1)  # polling the workers' progress; bounded by the deadline
    return ids


def _completed(url: str) -> list[dict[str, Any]]:
    return json.loads(http("GET", f"{url}/generations?status=completed&limit=200")[1])["jobs"]


# --- wrk -----------------------------------------------------------------------------------


def run_wrk(wrk: str, url: str, script: Path, seconds: int) -> dict[str, Any]:
    """One wrk run; returns its stats with req/s and p99 in ms added."""
    cmd = [wrk, f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", f"--timeout={WRK_TIMEOUT}"]
    cmd += ["-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    stats = json.loads(line.removeprefix("BENCH_JSON "))
    stats["rps"] = stats["requests"] / (stats["duration_us"] / 1e6)
    stats["p99_ms"] = stats["p99_us"] / 1000
    stats["error_count"] = sum(stats["errors"].values())
    return stats


def write_script(tmp: Path, name: str, route: str, ids: list[str], ports: list[int]) -> Path:
    """The wrk script of one scenario: POST, or GET /generations/{id} for each of `ids` in
    turn; spread over `ports` when there is more than one."""
    paths = ", ".join(f'"/generations/{i}"' for i in ids)
    lua = LUA_POST if route == "create" else LUA_GET.replace("PATHS", paths)
    if len(ports) > 1:
        lua = LUA_SPREAD.replace("PORTS", ", ".join(f'"{port}"' for port in ports)) + lua
    path = tmp / f"{slug(name)}.lua"
    path.write_text(lua)
    return path


# --- the run -------------------------------------------------------------------------------


class Targets:
    """Starts the servers of each scenario; PostgreSQL scenarios each get a fresh database."""

    def __init__(self, tmp: Path, workers: int, baseline_url: str, pg: Any | None) -> None:
        self.tmp = tmp
        self.workers = workers
        self.baseline_url = baseline_url
        self.pg = pg
        self._databases = itertools.count(1)

    @contextlib.contextmanager
    def scenario(self, name: str, which: str, route: str, prefix: str) -> Iterator[tuple[str, Path]]:
        """The URL and wrk script of one scenario, its servers running (their logs `prefix`.N-PORT.log)."""
        with contextlib.ExitStack() as stack:
            if which == "baseline":
                urls = [self.baseline_url]
                # Any id answers: the ceiling reads nothing.
                ids = [str(uuid.uuid4()) for _ in range(GET_JOBS)]
            else:
                # While creating, the provider takes the seed's 2 s per image, as a remote image
                # API would: the workers wait on it and the measured work is accepting jobs.
                delay = CREATE_DELAY_S if route == "create" else 0.0
                extra: dict[str, str] = {}
                if which == "sqlite-nometrics":
                    extra = {"IMAGEGEN_METRICS__ENABLED": "false"}
                if which == "sqlite-quiet":
                    extra["IMAGEGEN_SERVER__REQUEST_LOG"] = "false"
                shared: Path | None = None
                if which.startswith("pg"):
                    assert self.pg is not None
                    database = stack.enter_context(fresh_database(self.pg, f"bench_{next(self._databases)}"))
                    extra = {
                        "IMAGEGEN_STORAGE__BACKEND": "postgres",
                        "IMAGEGEN_STORAGE__DATABASE_URL": database,
                    }
                    # Every node of one service mounts the same data directory (README).
                    shared = Path(tempfile.mkdtemp(prefix="data-", dir=self.tmp))
                    stack.callback(shutil.rmtree, shared, ignore_errors=True)
                urls = [
                    stack.enter_context(real_service(
                        self.tmp, self.workers, delay, name=f"{prefix}.{n}", extra_env=extra, data_dir=shared
                    ))
                    for n in range(1, PROCESSES[which] + 1)
                ]
                ids = create_completed_jobs(urls[0], GET_JOBS) if route == "get" else []
            ports = [int(url.rsplit(":", 1)[1]) for url in urls]
            script = write_script(self.tmp, name, route, ids, ports)
            # The GET script names its own paths.
            yield (urls[0] + "/generations" if route == "create" else urls[0]), script


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run(args: argparse.Namespace, wrk: str, tmp: Path, pg: Any | None) -> dict[str, Any]:
    """Every round of every scenario; returns the raw wrk stats and the size of the job body."""
    # The ceiling's GET must send what the real GET sends: take one real completed job's body.
    with real_service(tmp, args.workers, name="body") as url:
        (job_id,) = create_completed_jobs(url, 1)
        real_body = http("GET", f"{url}/generations/{job_id}")[1]
    body_file = tmp / "job.json"
    body_file.write_bytes(real_body)
    scenarios = {
        name: spec for name, spec in SCENARIOS.items()
        if (pg is not None or not spec[0].startswith("pg")) and not (args.get_only and spec[1] != "get")
    }

    rounds: list[dict[str, dict[str, Any]]] = []
    baseline = [sys.executable, str(BENCH / "baseline_app.py"), "--job-body", str(body_file)]
    with server("baseline", baseline, dict(os.environ), f"/generations/{uuid.uuid4()}", tmp) as baseline_url:
        targets = Targets(tmp, args.workers, baseline_url, pg)
        for number in range(1, args.rounds + 1):
            results: dict[str, dict[str, Any]] = {}
            for name, (which, route) in scenarios.items():
                print(f"round {number}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
                prefix = f"r{number}-{slug(name)}"
                with targets.scenario(name, which, route, prefix) as (url, script):
                    if args.warmup:
                        run_wrk(wrk, url, script, args.warmup)
                    results[name] = stats = run_wrk(wrk, url, script, args.duration)
                if stats["error_count"]:
                    print(f"  warning: {name}: wrk counted errors {stats['errors']}", file=sys.stderr)
                # What the servers logged at WARNING or above (read once they have stopped).
                stats["server_log_trouble"] = found = {}
                for log in sorted(tmp.glob(f"{prefix}.*.log")):
                    count, first = trouble(log)
                    found[log.stem] = {"lines": count, "first": first}
                    if count:
                        print(f"  warning: {log.name}: {count} WARNING/ERROR lines, e.g. {first[0]}",
                              file=sys.stderr)
            rounds.append(results)
    return {"rounds": rounds, "job_body_bytes": len(real_body)}


def summarise(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Median req/s and p99 per scenario; each real/bare ratio is taken within its own round."""
    summary: dict[str, dict[str, Any]] = {}
    for name in rounds[0]:
        summary[name] = {
            "rps": statistics.median(r[name]["rps"] for r in rounds),
            "p99_ms": statistics.median(r[name]["p99_ms"] for r in rounds),
            "errors": sum(r[name]["error_count"] for r in rounds),
        }
    for name, target in TARGETS.items():
        if name not in summary:
            continue
        ratio = statistics.median(r[name]["rps"] / r[target["baseline"]]["rps"] for r in rounds)
        p99_ok = target["max_p99_ms"] is None or summary[name]["p99_ms"] <= target["max_p99_ms"]
        # Error responses are cheap and fast: a run that had any cannot count as meeting a target.
        met = ratio >= target["min_ratio"] and p99_ok and not summary[name]["errors"]
        summary[name].update(ratio=ratio, target=target, met=met)
    for name, baseline in REPORTED.items():
        if name in summary:
            ratio = statistics.median(r[name]["rps"] / r[baseline]["rps"] for r in rounds)
            summary[name].update(ratio=ratio, baseline=baseline, target=None)
    for name, without in METRICS_COST.items():
        if name in summary and without in summary:
            ratio = statistics.median(r[name]["rps"] / r[without]["rps"] for r in rounds)
            summary[name]["vs_no_metrics"] = ratio
    if "get" in summary and "get (no request log)" in summary:
        # Within each round, like every ratio here: the machine drifts between rounds.
        cost = statistics.median(r["get"]["rps"] / r["get (no request log)"]["rps"] for r in rounds)
        summary["get"]["vs_no_request_log"] = cost
    return summary


def table(summary: dict[str, dict[str, Any]]) -> str:
    """The summary as the text table the benchmark prints."""
    rows = [f"{'scenario':<20} {'req/s':>9} {'p99 ms':>8} {'vs bare':>8}  {'target':<26} result"]
    for name, s in summary.items():
        ratio, goal, result = "", "", ""
        if "ratio" in s:
            ratio = f"{s['ratio']:.2f}x"
        if s.get("target"):
            t = s["target"]
            goal = f">= {t['min_ratio']:.1f}x {t['baseline']}"
            if t["max_p99_ms"] is not None:
                goal += f", p99 <= {t['max_p99_ms']:.0f}"
            result = "met" if s["met"] else "NOT MET"
        elif "baseline" in s:
            goal = "report"
        if s["errors"]:
            result += f" ({s['errors']} wrk errors)"
        row = f"{name:<20} {s['rps']:>9.0f} {s['p99_ms']:>8.1f} {ratio:>8}  {goal:<26} {result}"
        rows.append(row.rstrip())
    for name, without in METRICS_COST.items():
        if "vs_no_metrics" in summary.get(name, {}):
            ratio = summary[name]["vs_no_metrics"]
            met = "met" if ratio >= METRICS_MIN_RATIO else "NOT MET"
            rows.append(f"metrics cost: {name} / {without} = {ratio:.3f}x "
                        f"(target >= {METRICS_MIN_RATIO:.2f}x: less than 5% of create throughput) {met}")
    return "\n".join(rows)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> int:
    parser = argparse.ArgumentParser(description="imagegen HTTP benchmark against a bare aiohttp ceiling")
    parser.add_argument("--duration", type=int, default=10, help="measured seconds per scenario (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured seconds before each (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of all scenarios, medians (default 2)")
    parser.add_argument("--workers", type=int, default=4, help="imagegen workers.count (default 4)")
    parser.add_argument("--no-postgres", action="store_true", help="only the bare and SQLite scenarios")
    parser.add_argument("--get-only", action="store_true", help="only the GET scenarios")
    parser.add_argument(
        "--wakeup-jobs", type=int, default=200,
        help="jobs of the wake-up measurement (default 200; 0 skips it)",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help=f"copy the servers' logs to {LOGS.relative_to(ROOT)}"
    )
    args = parser.parse_args()
    if args.duration < 1 or args.warmup < 0 or args.rounds < 1 or args.wakeup_jobs < 0:
        parser.error("--duration and --rounds must be at least 1, --warmup and --wakeup-jobs at least 0")
    wrk = shutil.which("wrk")
    if wrk is None:
        print("http_bench needs wrk (https://github.com/wg/wrk): apt-get install -y wrk", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop every child and remove the temp dir.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    wrk_version = subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    load_start, started = loadavg(), time.monotonic()
    postgres: dict[str, Any] | None = None
    wakeup: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="imagegen-bench-") as tmp, contextlib.ExitStack() as stack:
        pg = None if args.no_postgres else stack.enter_context(durable_postgres())
        if pg is not None:
            postgres = {name: pg_setting(pg.url, name) for name in ("server_version", *DURABLE_PG_SETTINGS)}
            print("postgres: " + ", ".join(f"{k} = {v}" for k, v in postgres.items()), file=sys.stderr)
        measured = run(args, wrk, Path(tmp), pg)
        if pg is not None and args.wakeup_jobs:
            import wakeup_bench

            print(f"wake-up: {args.wakeup_jobs} jobs, node A (api) -> node B (worker) ...",
                  file=sys.stderr, flush=True)
            wakeup = wakeup_bench.measure(pg, Path(tmp), args.wakeup_jobs, args.workers)
        if pg is not None:
            # PostgreSQL's own log: errors such as deadlocks or serialization failures show there.
            count, first = trouble(pg.log_path, pattern=PG_TROUBLE)
            assert postgres is not None
            postgres["log_trouble"] = {"lines": count, "first": first}
        if args.keep_logs:
            shutil.rmtree(LOGS, ignore_errors=True)
            LOGS.mkdir(parents=True)
            for log in [*Path(tmp).glob("*.log"), *([pg.log_path] if pg is not None else [])]:
                shutil.copy(log, LOGS / log.name)
    load_end = loadavg()
    summary = summarise(measured["rounds"])
    print(table(summary))
    if "vs_no_request_log" in summary.get("get", {}):
        print(f"request log on GET: {summary['get']['vs_no_request_log']:.3f}x the throughput without it")
    if wakeup is not None:
        import wakeup_bench

        print("\n" + wakeup_bench.summary_line(wakeup))
        for node, found in wakeup["server_log_trouble"].items():
            for line in found["first"]:
                print(f"  {node} log: {line}")
    if postgres is not None:
        durability = ", ".join(f"{k} = {postgres[k]}" for k in DURABLE_PG_SETTINGS)
        print(f"\npostgres {postgres['server_version']}: {durability};"
              f" {postgres['log_trouble']['lines']} WARNING/ERROR/FATAL lines in its log")
        for line in postgres["log_trouble"]["first"]:
            print(f"  postgres log: {line}")
    print(f"load average (1, 5, 15 min): {load_start} at the start, {load_end} at the end;"
          f" {os.cpu_count()} CPUs; {time.monotonic() - started:.0f} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "settings": {**vars(args), "connections": CONNECTIONS, "threads": THREADS, "get_jobs": GET_JOBS,
                     "image_size": 64, "wrk": wrk_version},
        "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_start": load_start, "loadavg_end": load_end,
        },
        "postgres": postgres,
        "job_body_bytes": measured["job_body_bytes"],
        "summary": summary,
        "wakeup": wakeup,
        "rounds": measured["rounds"],
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")
    return 0  # a missed target is a finding, not a failure of the benchmark


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
