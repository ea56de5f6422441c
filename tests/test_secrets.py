"""No key, token or signature in clear in the logs or the database, after a full run with auth
on, with request lines in both log formats."""

from __future__ import annotations

import json
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from imagegen.auth import key_hash

from .auth_keys import ACME_KEY, GLOBEX_KEY, KEYS, SECRET
from .conftest import TestDatabase
from .serverproc import ServerProcess


def call(url: str, key: str | None = None, method: str = "GET", body: Any = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = None
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_reaches_a_log_line_or_the_database(tmp_path: Path, database: TestDatabase, log_format: str) -> None:
    keys = ", ".join(f'{{name = "{name}", hash = "{key_hash(key)}"}}' for name, key in KEYS.items())
    server = ServerProcess(database.data_dir, env={
        **database.env, "IMAGEGEN_PROVIDER__IMAGE_SIZE": "64", "IMAGEGEN_AUTH__ENABLED": "true",
        "IMAGEGEN_AUTH__KEYS": f"[{keys}]", "IMAGEGEN_SECRET": SECRET,
        "IMAGEGEN_AUTH__TOKEN_TTL_S": "1", "IMAGEGEN_SERVER__LOG_FORMAT": log_format,
    })
    server.start()
    secrets = [ACME_KEY, GLOBEX_KEY, SECRET]
    try:
        status, body = call(f"{server.url}/generations", ACME_KEY, "POST", {"numImages": 1, "prompt": "owl"})
        assert status == 202
        job_id = json.loads(body)["jobId"]
        deadline = time.monotonic() + 20
        while (job := json.loads(call(f"{server.url}/generations/{job_id}", ACME_KEY)[1]))["status"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        image = job["imageUrls"][0]
        signature = re.search(r"sig=([^&]+)", image).group(1)  # type: ignore[union-attr]
        secrets.append(signature)
        assert call(image)[0] == 200
        assert call(image.replace(signature, signature[::-1]))[0] == 404
        token = json.loads(call(f"{server.url}/tokens", ACME_KEY, "POST")[1])["token"]
        secrets.append(token)
        # A token-opened stream, which ends when the token expires; then an expired token.
        with urllib.request.urlopen(f"{server.url}/generations/{job_id}/events?token={token}", timeout=10) as stream:
            assert b"job.completed" in stream.read()
        time.sleep(1.1)
        assert call(f"{server.url}/generations/events?token={token}")[0] == 401
        # Wrong keys, including one that is almost right.
        for wrong in (ACME_KEY[:-1], GLOBEX_KEY + "x", SECRET):
            assert call(f"{server.url}/generations", wrong)[0] == 401
        assert call(f"{server.url}/generations/{job_id}", GLOBEX_KEY)[0] == 404
    finally:
        server.stop(signal.SIGTERM)
    log = server.log_text()
    assert "serving on" in log  # the log is the server's, and it was read
    # Every request was logged, the secret-carrying ones with their query redacted.
    if log_format == "json":
        records = [json.loads(line) for line in log.splitlines()]
        requests = [r for r in records if r["message"] == "request"]
        paths = [r["path"] for r in requests]
        assert {r.get("tenant") for r in requests} == {"acme", "globex", None}
    else:
        requests = [line for line in log.splitlines() if " imagegen.requests: request " in line]
        # A value with a space, quote or = is written as a JSON string.
        shown = [re.search(r' path=("(?:[^"\\]|\\.)*"|\S+)', line).group(1) for line in requests]  # type: ignore[union-attr]
        paths = [json.loads(path) if path.startswith('"') else path for path in shown]
        assert any("tenant=acme" in line for line in requests)
    assert len(requests) >= 10
    assert f"/generations/{job_id}/events?token=***" in paths and "/generations/events?token=***" in paths
    assert sum(bool(re.fullmatch(r"/images/\S+\?exp=\d+&sig=\*\*\*", p)) for p in paths) == 2
    for secret in secrets:
        assert secret not in log
        assert secret[:16] not in log  # nor a recognisable part of one
    if database.backend == "sqlite":
        stored = b"".join(p.read_bytes() for p in database.data_dir.glob("imagegen.sqlite3*"))
    else:
        tables = [r["tablename"] for r in database.rows("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        stored = json.dumps([database.rows(f"SELECT * FROM {table}") for table in tables], default=str).encode()
    assert job_id.encode() in stored and b"acme" in stored  # what is stored was read
    for secret in secrets:
        assert secret.encode() not in stored and secret[:16].encode() not in stored
