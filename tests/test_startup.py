"""A server that cannot start says why in one line, exits with status 2, and never shows a password."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .serverproc import free_port

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cret-Pa55word"


def start(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "server.py", "--port", str(free_port()), *args],
        cwd=ROOT,
        env={**os.environ, "IMAGEGEN_STORAGE__DATA_DIR": str(tmp_path / "data"), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_exit_2(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    for text in expected:
        assert text in lines[0]
    assert SECRET not in result.stdout + result.stderr
    return lines[0]


@pytest.mark.parametrize("role", ["api", "worker"])
def test_sqlite_refuses_split_roles(tmp_path: Path, role: str) -> None:
    assert_one_line_exit_2(start(tmp_path, {}, "--role", role), f"--role {role}", 'backend = "postgres"')
    assert not (tmp_path / "data" / "imagegen.sqlite3").exists()


def test_an_unreachable_postgres_is_one_line_without_the_password(tmp_path: Path) -> None:
    url = f"postgresql://imagegen:{SECRET}@127.0.0.1:{free_port()}/imagegen"
    line = assert_one_line_exit_2(
        start(tmp_path, {"IMAGEGEN_STORAGE__BACKEND": "postgres", "IMAGEGEN_STORAGE__DATABASE_URL": url}),
        "cannot connect to PostgreSQL",
        "imagegen:***@127.0.0.1",
    )
    assert "refused" in line.lower()


def test_a_missing_database_is_one_line(tmp_path: Path, pg_server) -> None:
    url = pg_server.database_url("no_such_database")
    env = {"IMAGEGEN_STORAGE__BACKEND": "postgres", "IMAGEGEN_STORAGE__DATABASE_URL": url}
    assert_one_line_exit_2(start(tmp_path, env), "cannot connect to PostgreSQL", "no_such_database")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"IMAGEGEN_STORAGE__BACKEND": "postgres"}, "needs database_url"),
        ({"IMAGEGEN_STORAGE__BACKEND": "postgres", "IMAGEGEN_STORAGE__DATABASE_URL": f"mysql://u:{SECRET}@h/db"},
         "must be a postgresql:// URL"),
        ({"IMAGEGEN_STORAGE__BACKEND": "oracle"}, "storage.backend"),
    ],
)
def test_bad_storage_settings_are_one_line(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    assert_one_line_exit_2(start(tmp_path, env), "configuration error", expected)
