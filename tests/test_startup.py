"""A server that cannot start says why in one line, exits with status 2, and never shows a password."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .serverproc import ServerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cret-Pa55word"


def start(
    tmp_path: Path, env: dict[str, str], *args: str, port: int | None = None
) -> subprocess.CompletedProcess[str]:
    # The timeout is the "never hangs" check: a process left alive without listening fails it.
    return subprocess.run(
        [sys.executable, "server.py", "--port", str(port or free_port()), *args],
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


# --- issue 11: each way a start-up can fail is one line, exit status 2, and no process left ---


def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert_one_line_exit_2(
            start(tmp_path, {}, port=port), f"cannot listen on 127.0.0.1:{port}: address already in use"
        )
    # The store was opened, and closed again on the way out: the next start gets its lock.
    server = ServerProcess(tmp_path / "data")
    server.start()
    server.stop()


@pytest.mark.parametrize(
    ("port", "expected"), [("70000", "less than or equal to 65535"), ("-1", "greater than or equal to 0")],
)
def test_a_port_out_of_range_is_one_line(tmp_path: Path, port: str, expected: str) -> None:
    result = start(tmp_path, {}, "--port", port)
    assert_one_line_exit_2(result, "configuration error", f"--port: Input should be {expected}")
    assert not (tmp_path / "data").exists()


def test_a_port_that_is_not_a_number_is_one_line(tmp_path: Path) -> None:
    assert_one_line_exit_2(start(tmp_path, {}, "--port", "eighty"), "--port", "invalid int value")


def test_a_port_out_of_range_in_the_environment_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "IMAGEGEN_STORAGE__DATA_DIR": str(tmp_path / "data")}
    env["IMAGEGEN_SERVER__PORT"] = "70000"
    result = subprocess.run(
        [sys.executable, "server.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert_one_line_exit_2(result, "configuration error", "server.port")


def test_help_names_the_environment_overrides() -> None:
    result = subprocess.run(
        [sys.executable, "server.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "IMAGEGEN_<SECTION>__<KEY>" in result.stdout and "IMAGEGEN_SERVER__PORT" in result.stdout


def test_a_data_directory_under_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    data_dir = tmp_path / "file" / "data"
    assert_one_line_exit_2(
        start(tmp_path, {"IMAGEGEN_STORAGE__DATA_DIR": str(data_dir)}),
        f"cannot create the data directory {data_dir}", "Not a directory",
    )


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Read-only bind mounts the test made (chmod stops nobody when the tests run as root),
    unmounted after it."""
    made: list[Path] = []
    yield made
    for target in reversed(made):
        subprocess.run(["umount", str(target)], capture_output=True)


def mount_read_only(source: Path, target: Path, mounts: list[Path]) -> None:
    """Show `source` (a directory or a file) read-only at `target`, or skip the test."""
    if subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a bind mount here (needs root with CAP_SYS_ADMIN)")
    mounts.append(target)
    if subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a bind mount read-only here")


def test_a_read_only_data_directory_is_one_line(tmp_path: Path, mounts: list[Path]) -> None:
    (tmp_path / "source").mkdir()
    (tmp_path / "ro").mkdir()
    mount_read_only(tmp_path / "source", tmp_path / "ro", mounts)
    data_dir = tmp_path / "ro" / "data"  # cannot be created
    assert_one_line_exit_2(
        start(tmp_path, {"IMAGEGEN_STORAGE__DATA_DIR": str(data_dir)}),
        f"cannot create the data directory {data_dir}", "Read-only file system",
    )


def test_a_read_only_existing_data_directory_is_one_line(tmp_path: Path, mounts: list[Path]) -> None:
    make_database(tmp_path / "source" / "data")
    (tmp_path / "ro").mkdir()
    mount_read_only(tmp_path / "source", tmp_path / "ro", mounts)
    data_dir = tmp_path / "ro" / "data"
    assert_one_line_exit_2(
        start(tmp_path, {"IMAGEGEN_STORAGE__DATA_DIR": str(data_dir)}),
        f"cannot write in the data directory {data_dir}", "Read-only file system",
    )


def make_database(data_dir: Path, jobs: int = 0) -> Path:
    """A real database, made by the service's own store, with `jobs` pending jobs in it."""
    code = (
        "import asyncio, sys; from pathlib import Path\n"
        "from imagegen.feed import Feed; from imagegen.jobs import uuid7\n"
        "from imagegen.models import now_text\n"
        "from imagegen.store import NewJob; from imagegen.store.sqlite import SQLiteStore\n"
        "async def main():\n"
        "    db = await SQLiteStore.open(Path(sys.argv[1]), Feed())\n"
        "    for _ in range(int(sys.argv[2])):\n"
        "        await db.create(NewJob(uuid7(), 1, 'cat', 'x' * 400, now_text()), None, None)\n"
        "    await db.close()\n"
        "asyncio.run(main())\n"
    )
    path = data_dir / "imagegen.sqlite3"
    subprocess.run([sys.executable, "-c", code, str(path), str(jobs)], cwd=ROOT, check=True, timeout=60)
    return path


def test_a_corrupt_database_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "data" / "imagegen.sqlite3"
    path.parent.mkdir()
    path.write_bytes(os.urandom(16384))
    line = assert_one_line_exit_2(start(tmp_path, {}), str(path), "corrupt", "file is not a database")
    assert "Traceback" not in line
    assert path.stat().st_size == 16384  # left as it was, for whoever restores it


def test_a_truncated_database_is_one_line(tmp_path: Path) -> None:
    path = make_database(tmp_path / "data", jobs=300)
    size = path.stat().st_size
    assert size > 100_000
    with open(path, "r+b") as file:
        file.truncate(size // 2)
    assert_one_line_exit_2(start(tmp_path, {}), str(path), "corrupt")


def test_a_garbled_database_header_is_one_line(tmp_path: Path) -> None:
    path = make_database(tmp_path / "data", jobs=5)
    with open(path, "r+b") as file:
        file.write(b"not SQLite at all")  # over the "SQLite format 3" magic
    assert_one_line_exit_2(start(tmp_path, {}), str(path), "corrupt")


def test_an_empty_database_file_is_refused_not_taken_for_a_new_one(tmp_path: Path) -> None:
    path = tmp_path / "data" / "imagegen.sqlite3"
    path.parent.mkdir()
    path.touch()
    assert_one_line_exit_2(start(tmp_path, {}), str(path), "empty file")
    assert path.stat().st_size == 0


def test_a_read_only_database_file_is_one_line(tmp_path: Path, mounts: list[Path]) -> None:
    # Only the file is read-only (a bind mount of the file itself): its directory is writable.
    path = make_database(tmp_path / "data", jobs=1)
    copy = tmp_path / "copy.sqlite3"
    copy.write_bytes(path.read_bytes())
    mount_read_only(copy, path, mounts)
    assert_one_line_exit_2(start(tmp_path, {}), f"cannot write the database {path}", "readonly")


def test_a_newer_schema_is_one_line(tmp_path: Path) -> None:
    path = make_database(tmp_path / "data")
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    assert_one_line_exit_2(start(tmp_path, {}), "schema version 99, newer than this release")


def test_a_second_server_on_the_same_data_directory_is_refused(tmp_path: Path) -> None:
    first = ServerProcess(tmp_path / "data")
    first.start()
    try:
        line = assert_one_line_exit_2(
            start(tmp_path, {}), f"data directory {tmp_path / 'data'} is in use", f"(pid {first.pid})"
        )
        assert "storage.data_dir" in line
        assert first.running
    finally:
        first.stop()
    # Once the first is gone, the directory is free again.
    second = ServerProcess(tmp_path / "data")
    second.start()
    second.stop()


def test_a_killed_servers_lock_does_not_block_the_next_start(tmp_path: Path) -> None:
    first = ServerProcess(tmp_path / "data")
    first.start()
    first.kill9()
    second = ServerProcess(tmp_path / "data")
    second.start()
    second.stop()


def test_animals_the_local_provider_cannot_draw_are_refused_at_start_up(tmp_path: Path) -> None:
    line = assert_one_line_exit_2(
        start(tmp_path, {"IMAGEGEN_JOBS__ANIMALS": '["cat", "unicorn"]'}),
        "configuration error", "local provider cannot draw", "'unicorn'",
    )
    assert "'cat'" not in line
    assert not (tmp_path / "data").exists()


def test_auth_with_a_malformed_key_hash_or_no_secret_is_one_line(tmp_path: Path) -> None:
    from imagegen.auth import key_hash

    on = {"IMAGEGEN_AUTH__ENABLED": "true"}
    bad_hash = {**on, "IMAGEGEN_AUTH__KEYS": f'[{{name = "acme", hash = "{SECRET}"}}]'}
    # The malformed value is not echoed: it may be a key pasted in clear.
    assert_one_line_exit_2(start(tmp_path, bad_hash), "configuration error", "auth.keys.0.hash", "sha256:")
    keys = {**on, "IMAGEGEN_AUTH__KEYS": f'[{{name = "acme", hash = "{key_hash("ig_" + "k" * 43)}"}}]'}
    env = {name: value for name, value in os.environ.items() if name != "IMAGEGEN_SECRET"}
    result = subprocess.run(
        [sys.executable, "server.py", "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True,
        timeout=60, env={**env, "IMAGEGEN_STORAGE__DATA_DIR": str(tmp_path / "data"), **keys},
    )
    assert_one_line_exit_2(result, "cannot start", "IMAGEGEN_SECRET", "is not set")
    assert_one_line_exit_2(start(tmp_path, {**keys, "IMAGEGEN_SECRET": "short"}), "shorter than 32 characters")


def test_a_malformed_webhook_secret_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    for value in ("not-a-secret", "whsec_" + "A" * 8, "whsec_!!!!"):
        result = start(tmp_path, {"IMAGEGEN_WEBHOOK_SECRET": value})
        assert_one_line_exit_2(result, "cannot start", "IMAGEGEN_WEBHOOK_SECRET", "whsec_")
        assert value not in result.stderr  # never echoed: it is a secret
