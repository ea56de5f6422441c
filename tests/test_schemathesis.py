"""Schemathesis against the real server.py: every check, a fixed seed, a bounded number of cases.

No server error, no response outside the document, no schema-valid request refused and no
invalid one accepted.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .serverproc import ServerProcess

SCHEMATHESIS = Path(sys.executable).parent / "st"


@pytest.mark.timeout(300)
def test_the_live_server_keeps_to_its_document(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", env={"IMAGEGEN_PROVIDER__IMAGE_SIZE": "64"})
    server.start()
    try:
        run = subprocess.run(
            [
                str(SCHEMATHESIS), "run", f"{server.url}/openapi.json",
                "--checks", "all",
                "--seed", "20261130",
                "--max-examples", "100",
                "--workers", "2",
                "--request-timeout", "10",
            ],
            cwd=tmp_path,  # its reports and caches stay out of the repository
            capture_output=True,
            text=True,
            timeout=240,
            check=False,  # the assertion below shows its report
        )
    finally:
        server.stop()
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-4000:]
