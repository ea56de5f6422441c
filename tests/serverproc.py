"""Run the real server.py as a child process, for restart, signal, crash and multi-node tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import urllib.error
import urllib.request

ROOT = Path(__file__).resolve().parent.parent

# What `server.py --role worker` logs once it is drawing jobs (it serves no HTTP to poll).
WORKER_READY = b"worker running"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python server.py` on 127.0.0.1 with its data under `data_dir` and extra IMAGEGEN_* settings.

    `args` are extra command-line arguments, e.g. ["--role", "worker"]. A worker serves no HTTP:
    start() then waits for its "worker running" log line instead of an answer.
    """

    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str] | None = None,
        port: int | None = None,
        args: list[str] | None = None,
        log: Path | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        # Not a webhook secret from the caller's environment: with one, a server fuzzed or driven
        # here would deliver webhooks to whatever hosts a test's jobs name. A test passes its own.
        inherited = {name: value for name, value in os.environ.items() if name != "IMAGEGEN_WEBHOOK_SECRET"}
        self.env = {**inherited, "IMAGEGEN_STORAGE__DATA_DIR": str(data_dir), **(env or {})}
        self.args = list(args or [])
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = log or data_dir.parent / f"server-{self.port}.log"
        self.preexec = preexec  # run in the child before server.py starts, e.g. to set an rlimit

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def role(self) -> str:
        if "--role" in self.args:
            return self.args[self.args.index("--role") + 1]
        return "all"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def spawn(self) -> int:
        """Start the process without waiting for it; return the log's size before it started
        (where this run's lines begin), for wait_ready()."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "server.py", "--port", str(self.port), *self.args],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=self.preexec,
            )
        return offset

    def wait_ready(self, offset: int = 0, timeout: float = 20.0) -> None:
        """Return once the process serves HTTP (or, as a worker, has logged that it runs)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            if self.role == "worker":
                with open(self.log, "rb") as log:
                    log.seek(offset)
                    if WORKER_READY in log.read():
                        return
                time.sleep(0.05)  # waiting for the log line; bounded by the deadline
                continue
            try:
                urllib.request.urlopen(f"{self.url}/generations?limit=1", timeout=1).read()
                return
            except urllib.error.HTTPError:
                return  # an answer all the same (401 with auth on): it serves
            except OSError:
                time.sleep(0.05)  # waiting for the port to open; bounded by the deadline
        raise TimeoutError(f"server did not start: {self.log_text()[-2000:]}")

    def start(self, timeout: float = 20.0) -> None:
        self.wait_ready(self.spawn(), timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the process stops dead (no heartbeat, no I/O) until resume()."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> float:
        """Send `sig` and wait for exit; return how long the exit took."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(sig)
        self.proc.wait(timeout)
        return time.monotonic() - started
