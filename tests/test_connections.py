"""Under connection pressure: a slow body is cut off with 408, a client that leaves or sends
garbage is one WARNING line at most, the open-files limit is raised, and accept errors are
counted, not logged as a torrent of tracebacks. Against the real server.py process."""

from __future__ import annotations

import json
import resource
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .serverproc import ServerProcess


@pytest.fixture
def backend() -> str:
    """Connections are the HTTP server's business: one backend is enough."""
    return "sqlite"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path / "data", {"IMAGEGEN_SERVER__BODY_TIMEOUT_S": "1"})
    process.start()
    yield process
    if process.running:
        process.stop(signal.SIGTERM)


def raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(data)
        sock.settimeout(timeout)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return received + b"<timed out>"
            if not chunk:
                return received
            received += chunk


def no_errors(log: str) -> None:
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


SLOW_POST = (b"POST /generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
             b"Content-Length: 4000\r\n\r\n")


def test_a_body_that_trickles_in_is_cut_off_with_408(server: ServerProcess) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(SLOW_POST)
        sock.settimeout(0.4)
        answer = b""
        for byte in b'{"numImages": 1' * 10:  # one byte every 0.4 s at most, never all 4,000
            try:
                sock.send(bytes([byte]))
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
            if b"\r\n\r\n" in answer and answer.endswith(b"}"):
                break
    elapsed = time.monotonic() - started
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert b"application/problem+json" in head and b"Connection: close" in head
    assert "did not arrive within 1 s" in json.loads(body)["detail"]
    assert elapsed < 5
    no_errors(server.log_text())


def test_a_client_leaving_mid_body_or_sending_garbage_is_one_warning_at_most(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(SLOW_POST + b'{"num')
    assert raw(server.port, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.0 400")
    assert raw(server.port, b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n").startswith(b"HTTP/1.0 400")
    time.sleep(0.5)
    log = server.log_text()
    no_errors(log)
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert any("client disconnected during POST '/generations'" in line for line in warnings), log
    assert any("malformed request from 127.0.0.1 answered 400" in line for line in warnings), log
    assert len(warnings) <= 3
    # And it still serves.
    assert raw(server.port, b"GET /generations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200")


def soft_limit(limit: int, hard: int | None = None):  # type: ignore[no-untyped-def]
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard if hard is not None else resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    return set_limit


def open_files_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files line")


def test_the_open_files_soft_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    process = ServerProcess(tmp_path / "data", preexec=soft_limit(256))
    process.start()
    try:
        assert open_files_limits(process.pid) == (hard, hard)
        assert f"open files limit raised from 256 to {hard}" in process.log_text()
    finally:
        process.stop(signal.SIGTERM)


def test_accept_errors_are_counted_not_logged_each_time(tmp_path: Path) -> None:
    # Soft and hard limit both low: nothing to raise, and accept() runs out of descriptors.
    process = ServerProcess(tmp_path / "data", preexec=soft_limit(96, 96))
    process.start()
    held: list[socket.socket] = []
    try:
        for _ in range(300):
            try:
                held.append(socket.create_connection(("127.0.0.1", process.port), timeout=1))
            except OSError:
                break
        time.sleep(7)  # long enough for more than one report window
        log = process.log_text()
        reports = [line for line in log.splitlines() if "cannot accept new connections" in line]
        assert 1 <= len(reports) <= 3, log[-3000:]
        assert "Too many open files" in reports[0] and "open files are limited to 96" in reports[0]
        no_errors(log)
    finally:
        for sock in held:
            sock.close()
    time.sleep(1.5)  # asyncio accepts again a second after the last failure
    assert raw(process.port, b"GET /generations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200")
    process.stop(signal.SIGTERM)
