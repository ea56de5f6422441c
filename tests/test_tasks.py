"""tasks.py, the one command: its help, and that a signal stops `tasks.py run` exactly as it stops server.py.

`tasks.py run` sets up .venv (quick here: it is already installed, and a stamp says so) and then
execs server.py, so the process the user started is the server: a terminal's Ctrl-C (SIGINT to the
whole foreground process group) and a SIGTERM to its pid each reach one process, which gives its
running job the grace period and hands it back, and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from imagegen.webhooks import parse_secret

from .serverproc import ROOT, free_port

PYTHON3 = shutil.which("python3") or sys.executable  # what the README tells users to run
GRACE_S = 0.5
# Set-up may reinstall into .venv when pyproject.toml changed since the last install.
READY_TIMEOUT_S = 300


def run_tasks(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON3, "tasks.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage_and_exits_0(flag: str) -> None:
    done = run_tasks(flag)
    assert done.returncode == 0, done.stderr
    assert "python3 tasks.py run" in done.stdout and "python3 tasks.py test" in done.stdout
    assert done.stderr == ""


def test_an_unknown_command_prints_the_usage_and_exits_2() -> None:
    done = run_tasks("serve")
    assert done.returncode == 2
    assert "python3 tasks.py run" in done.stderr


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return json.load(answer)


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        return json.load(answer)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.timeout(READY_TIMEOUT_S + 60)
@pytest.mark.parametrize(
    "sig, to_group",
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["Ctrl-C to the process group", "SIGTERM to the pid"],
)
def test_a_signal_stops_tasks_run_like_server_py(tmp_path: Path, sig: int, to_group: bool) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    env = {
        **os.environ,
        "IMAGEGEN_STORAGE__DATA_DIR": str(data_dir),
        "IMAGEGEN_PROVIDER__DELAY_S": "5",  # each image takes 5 s: the job is mid-draw when stopped
        "IMAGEGEN_WORKERS__SHUTDOWN_GRACE_S": str(GRACE_S),
    }
    log = tmp_path / "tasks.log"
    with open(log, "wb") as out:
        # A session of its own, as a terminal gives a foreground job: its own process group.
        proc = subprocess.Popen(
            [PYTHON3, "tasks.py", "run", "--port", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"tasks.py exited with {proc.returncode}: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not serving: {log.read_text()[-3000:]}"
            try:
                get_json(f"{url}/generations?limit=1")
                break
            except OSError:
                time.sleep(0.1)  # set-up, then start-up; bounded by the deadline

        job_id = post_json(f"{url}/generations", {"numImages": 2})["jobId"]
        deadline = time.monotonic() + 20
        while get_json(f"{url}/generations/{job_id}")["status"] != "processing":
            assert time.monotonic() < deadline, "the job was never taken up"
            time.sleep(0.05)

        if to_group:
            os.killpg(proc.pid, sig)  # what a terminal's Ctrl-C does: every process of the group
        else:
            os.kill(proc.pid, sig)  # a service manager's stop: the pid it started, alone
        started = time.monotonic()
        returncode = proc.wait(timeout=GRACE_S + 15)
        took = time.monotonic() - started

        assert returncode == 0, log.read_text()[-3000:]
        assert took < GRACE_S + 10
        assert not group_alive(proc.pid), "a process of tasks.py's group outlived it (an orphaned server)"
        assert not port_open(port), f"something still listens on {port}"
        with sqlite3.connect(data_dir / "imagegen.sqlite3") as db:
            (status,) = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        assert status == "pending"  # handed back after the grace, for the next start
        assert log.read_text().count("serving on") == 1
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_new_key_prints_a_key_and_the_config_line_that_accepts_it() -> None:
    from imagegen.auth import Credentials
    from imagegen.config import load_settings

    done = run_tasks("new-key", "acme", "25")
    assert done.returncode == 0, done.stderr
    key_line, entry_line = done.stdout.strip().splitlines()
    key = key_line.rsplit(" ", 1)[1]
    entry = entry_line.split("config.toml:", 1)[1].strip()
    assert len(key) >= 43 and key not in entry  # the entry holds only the key's hash
    settings = load_settings(None, {"IMAGEGEN_AUTH__ENABLED": "true", "IMAGEGEN_AUTH__KEYS": f"[{entry}]"})
    assert settings.auth.keys[0].max_pending == 25
    tenant = Credentials(settings.auth, "s" * 32).tenant_for_key(key)
    assert tenant is not None and tenant.name == "acme"
    assert run_tasks("new-key", "acme").stdout != done.stdout  # a new random key every time
    assert run_tasks("new-key", "not a name").returncode == 2
    secret = run_tasks("new-secret").stdout.strip()
    assert len(secret) >= 32 and secret != run_tasks("new-secret").stdout.strip()
    webhook_secret = run_tasks("new-webhook-secret").stdout.strip()
    assert parse_secret(webhook_secret, "X") and webhook_secret != run_tasks("new-webhook-secret").stdout.strip()
    Webhook(webhook_secret)  # the form the standardwebhooks package reads
