"""What http_bench.py and wakeup_bench.py share: child servers on 127.0.0.1, one-off HTTP
requests to them, their logs, and the benchmarks' private, durable PostgreSQL.

Not a benchmark itself; imported from the scripts beside it (their directory is on sys.path).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

# tests/pgserver.py starts and deletes the private PostgreSQL; it is importable from the root.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# tests/pgserver.py tunes its throwaway clusters for speed (fsync, synchronous_commit and
# full_page_writes off). A benchmark must pay what a real deployment pays for each commit, so
# these are put back to PostgreSQL's defaults; the rest of its settings (max_connections 200,
# shared_buffers 64MB, loopback only) stay.
DURABLE_PG_SETTINGS: dict[str, str | int] = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
}

# Log lines worth reporting: the service logs with "%(asctime)s %(levelname)s %(name)s: ...".
TROUBLE = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback \(most recent call last\)")
# And in PostgreSQL's own log, whose lines read "... ERROR:  ...".
PG_TROUBLE = re.compile(r"\b(WARNING|ERROR|FATAL|PANIC):")


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


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)  # graceful stop: the real service finishes its current job first
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def server(name: str, argv: list[str], env: dict[str, str], ready_path: str, logs: Path) -> Iterator[str]:
    """Run a server child on a free port; yield its base URL once `ready_path` answers; stop it.

    Its output goes to `logs`/<name>-<port>.log, which is kept (see trouble()).
    """
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
        _stop(proc)


@contextlib.contextmanager
def headless(name: str, argv: list[str], env: dict[str, str], ready_line: str, logs: Path) -> Iterator[Path]:
    """Run a child that serves no HTTP (server.py --role worker); yield its log's path once
    `ready_line` is in it; stop it."""
    log_path = logs / f"{name}-{len(list(logs.glob(f'{name}-*.log')))}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while ready_line not in log_path.read_text(errors="replace"):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not start:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.05)  # waiting for its start-up line; bounded by the deadline
        yield log_path
    finally:
        _stop(proc)


def trouble(log_path: Path, limit: int = 5, pattern: re.Pattern[str] = TROUBLE) -> tuple[int, list[str]]:
    """How many WARNING/ERROR/CRITICAL lines and tracebacks a child's log holds, and the first few."""
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if pattern.search(ln)]
    return len(lines), lines[:limit]


@contextlib.contextmanager
def durable_postgres() -> Iterator[Any]:
    """A private PostgreSQL (tests/pgserver.py) with fsync, synchronous_commit and
    full_page_writes on; stopped and deleted on exit."""
    from tests.pgserver import PrivatePostgres, find_pg_bin

    if find_pg_bin() is None:
        raise RuntimeError(
            "PostgreSQL's initdb/pg_ctl/postgres are not installed (apt-get install -y postgresql), "
            "or pass --no-postgres"
        )
    with PrivatePostgres(settings=DURABLE_PG_SETTINGS) as pg:
        yield pg


@contextlib.contextmanager
def fresh_database(pg: Any, name: str) -> Iterator[str]:
    """An empty database `name` on `pg`; yields its URL, drops it afterwards."""
    url = pg.create_database(name)
    try:
        yield url
    finally:
        pg.drop_database(name)


def pg_setting(url: str, name: str) -> str:
    """The value of one PostgreSQL setting, as the server reports it (checks the durable settings)."""
    import psycopg

    with psycopg.connect(url, connect_timeout=10) as conn:
        row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
    assert row is not None
    return str(row[0])


async def until_no_job_runs(session: Any, base: str, interval: float = 0.02) -> None:
    """Return once the server at `base` has no pending or processing job (an aiohttp session)."""
    while True:
        busy = 0
        for status in ("pending", "processing"):
            async with session.get(f"{base}/generations", params={"status": status, "limit": "1"}) as response:
                busy += len((await response.json())["jobs"])
        if not busy:
            return
        await asyncio.sleep(interval)
