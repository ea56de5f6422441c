"""HTTP benchmark: imagegen's create and get routes against a bare aiohttp ceiling, loaded by wrk.

    .venv/bin/python bench/http_bench.py [--duration 10] [--warmup 3] [--rounds 2]

Each scenario runs wrk (64 connections, 2 threads) against a child server on 127.0.0.1, in the
order bare POST, real POST, bare GET, real GET, once per round; the summary is the median over
rounds. The real service gets a fresh data directory per scenario, so the backlog of jobs that
one create run leaves behind cannot steal CPU from the next scenario. Results are printed as a
table and written to bench/results/http.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results" / "http.json"

CONNECTIONS = 64
# Seconds per image for the create scenario's provider (the seed's IMAGE_PROVIDER_DELAY).
CREATE_DELAY_S = 2.0
THREADS = 2
GET_JOBS = 200  # distinct rows the GET scenarios cycle through
WRK_TIMEOUT = "10s"  # wrk's default of 2 s would drop slow responses instead of counting them in p99

# name -> (server, route); the order is the run order, so bare and real alternate.
SCENARIOS = {
    "bare POST": ("baseline", "create"),
    "create": ("real", "create"),
    "bare GET": ("baseline", "get"),
    "get": ("real", "get"),
}
TARGETS = {
    "create": {"baseline": "bare POST", "min_ratio": 0.6, "max_p99_ms": 25.0},
    "get": {"baseline": "bare GET", "min_ratio": 0.8, "max_p99_ms": None},
}

# wrk calls done() once, after the run: print the numbers as one JSON line, so no parsing of
# wrk's human-readable units is needed. Latencies are in microseconds.
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


# --- child processes -----------------------------------------------------------------------


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
    """One request to a local child server; returns (status, body)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


@contextlib.contextmanager
def server(name: str, argv: list[str], env: dict[str, str], ready_path: str, logs: Path) -> Iterator[str]:
    """Run a server child on a free port; yield its base URL once `ready_path` answers; stop it."""
    port = free_port()
    log_path = logs / f"{name}-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*argv, "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
            try:
                http("GET", url + ready_path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} did not start:\n{log_path.read_text()[-2000:]}") from None
                time.sleep(0.05)  # the port is not open yet; bounded by the deadline
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)  # graceful stop: the real service finishes its current job first
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def real_service(tmp: Path, workers: int, delay_s: float = 0.0) -> Iterator[str]:
    """`python server.py` with a fresh data directory, removed afterwards."""
    data_dir = Path(tempfile.mkdtemp(prefix="data-", dir=tmp))
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
    }
    try:
        with server("real", [sys.executable, "server.py"], env, "/generations?limit=1", tmp) as url:
            yield url
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def create_completed_jobs(url: str, count: int, timeout: float = 120.0) -> list[str]:
    """Create `count` (at most 200) jobs and wait until the workers have completed them all."""
    ids = []
    for _ in range(count):
        status, body = http("POST", url + "/generations", {"numImages": 1})
        assert status == 202, (status, body)
        ids.append(json.loads(body)["jobId"])
    deadline = time.monotonic() + timeout
    # The data directory is fresh, so one page of completed jobs holds them all.
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


def get_script(tmp: Path, name: str, ids: list[str]) -> Path:
    """A wrk script that GETs /generations/{id} for each of `ids` in turn."""
    path = tmp / f"get-{name}.lua"
    path.write_text(LUA_GET.replace("PATHS", ", ".join(f'"/generations/{i}"' for i in ids)))
    return path


# --- the run -------------------------------------------------------------------------------


@contextlib.contextmanager
def scenario_target(
    which: str, route: str, baseline_url: str, tmp: Path, workers: int
) -> Iterator[tuple[str, Path]]:
    """The URL and wrk script of one scenario; a real-service scenario gets a fresh server."""
    post_lua = tmp / "post.lua"
    post_lua.write_text(LUA_POST)
    with contextlib.ExitStack() as stack:
        if which == "baseline":
            url = baseline_url
            ids = [str(uuid.uuid4()) for _ in range(GET_JOBS)]  # any id answers: the ceiling reads nothing
        else:
            # While creating, the provider takes the seed's 2 s per image, as a remote image API
            # would: the workers wait on it and the measured work is accepting jobs.
            url = stack.enter_context(real_service(tmp, workers, CREATE_DELAY_S if route == "create" else 0.0))
            ids = create_completed_jobs(url, GET_JOBS) if route == "get" else []
        if route == "create":
            yield url + "/generations", post_lua
        else:
            yield url, get_script(tmp, which, ids)  # the GET script names its own paths


def run(args: argparse.Namespace, wrk: str, tmp: Path) -> dict[str, Any]:
    """Every round of every scenario; returns the raw wrk stats and the size of the job body."""
    # The ceiling's GET must send what the real GET sends: take one real completed job's body.
    with real_service(tmp, args.workers) as url:
        (job_id,) = create_completed_jobs(url, 1)
        real_body = http("GET", f"{url}/generations/{job_id}")[1]
    body_file = tmp / "job.json"
    body_file.write_bytes(real_body)

    rounds: list[dict[str, dict[str, Any]]] = []
    baseline = [sys.executable, str(BENCH / "baseline_app.py"), "--job-body", str(body_file)]
    with server("baseline", baseline, dict(os.environ), f"/generations/{uuid.uuid4()}", tmp) as baseline_url:
        for number in range(1, args.rounds + 1):
            results: dict[str, dict[str, Any]] = {}
            for name, (which, route) in SCENARIOS.items():
                print(f"round {number}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
                with scenario_target(which, route, baseline_url, tmp, args.workers) as (url, script):
                    if args.warmup:
                        run_wrk(wrk, url, script, args.warmup)
                    results[name] = stats = run_wrk(wrk, url, script, args.duration)
                if stats["error_count"]:
                    print(f"  warning: {name}: wrk counted errors {stats['errors']}", file=sys.stderr)
            rounds.append(results)
    return {"rounds": rounds, "job_body_bytes": len(real_body)}


def summarise(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Median req/s and p99 per scenario; each real/bare ratio is taken within its own round."""
    summary: dict[str, dict[str, Any]] = {}
    for name in SCENARIOS:
        summary[name] = {
            "rps": statistics.median(r[name]["rps"] for r in rounds),
            "p99_ms": statistics.median(r[name]["p99_ms"] for r in rounds),
            "errors": sum(r[name]["error_count"] for r in rounds),
        }
    for name, target in TARGETS.items():
        ratio = statistics.median(r[name]["rps"] / r[target["baseline"]]["rps"] for r in rounds)
        p99_ok = target["max_p99_ms"] is None or summary[name]["p99_ms"] <= target["max_p99_ms"]
        # Error responses are cheap and fast: a run that had any cannot count as meeting a target.
        met = ratio >= target["min_ratio"] and p99_ok and not summary[name]["errors"]
        summary[name].update(ratio=ratio, target=target, met=met)
    return summary


def table(summary: dict[str, dict[str, Any]]) -> str:
    """The summary as the text table the benchmark prints."""
    rows = [f"{'scenario':<10} {'req/s':>9} {'p99 ms':>8} {'vs bare':>8}  {'target':<26} result"]
    for name, s in summary.items():
        ratio, goal, result = "", "", ""
        if "target" in s:
            t = s["target"]
            ratio = f"{s['ratio']:.2f}x"
            goal = f">= {t['min_ratio']:.1f}x {t['baseline']}"
            if t["max_p99_ms"] is not None:
                goal += f", p99 <= {t['max_p99_ms']:.0f}"
            result = "met" if s["met"] else "NOT MET"
        if s["errors"]:
            result += f" ({s['errors']} wrk errors)"
        row = f"{name:<10} {s['rps']:>9.0f} {s['p99_ms']:>8.1f} {ratio:>8}  {goal:<26} {result}"
        rows.append(row.rstrip())
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description="imagegen HTTP benchmark against a bare aiohttp ceiling")
    parser.add_argument("--duration", type=int, default=10, help="measured seconds per scenario (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured seconds before each (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of all scenarios, medians (default 2)")
    parser.add_argument("--workers", type=int, default=4, help="imagegen workers.count (default 4)")
    args = parser.parse_args()
    if args.duration < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--duration and --rounds must be at least 1, --warmup at least 0")
    wrk = shutil.which("wrk")
    if wrk is None:
        print("http_bench needs wrk (https://github.com/wg/wrk): apt-get install -y wrk", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop every child and remove the temp dir.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    wrk_version = subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    with tempfile.TemporaryDirectory(prefix="imagegen-bench-") as tmp:
        measured = run(args, wrk, Path(tmp))
    summary = summarise(measured["rounds"])
    print(table(summary))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "settings": {**vars(args), "connections": CONNECTIONS, "threads": THREADS, "get_jobs": GET_JOBS,
                     "image_size": 64, "wrk": wrk_version},
        "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()
        },
        "job_body_bytes": measured["job_body_bytes"],
        "summary": summary,
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
