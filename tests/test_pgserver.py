"""tests/pgserver.py: the suite's private PostgreSQL server starts, serves databases, listens on
loopback only, and leaves nothing behind."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from . import pgserver


@pytest.fixture(scope="module")
def private() -> Iterator[pgserver.PrivatePostgres]:
    with pgserver.PrivatePostgres() as server:
        yield server


def test_database_round_trip(private: pgserver.PrivatePostgres) -> None:
    url = private.create_database("roundtrip")
    assert url == f"postgresql://imagegen@127.0.0.1:{private.port}/roundtrip"
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE jobs (id integer PRIMARY KEY, animal text NOT NULL)")
        conn.execute("INSERT INTO jobs VALUES (%s, %s), (%s, %s)", (1, "owl", 2, "frog"))
        conn.commit()
        assert conn.execute("SELECT id, animal FROM jobs ORDER BY id").fetchall() == [(1, "owl"), (2, "frog")]
        assert conn.execute("SELECT current_user, current_database()").fetchone() == ("imagegen", "roundtrip")

    idle = psycopg.connect(url)  # drop_database must end connections still open to the database
    try:
        private.drop_database("roundtrip")
        with pytest.raises(psycopg.OperationalError):
            idle.execute("SELECT 1")
    finally:
        idle.close()
    with psycopg.connect(private.url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = 'roundtrip'").fetchone() == (0,)
    private.drop_database("roundtrip")  # dropping what is gone is not an error


def test_listens_on_loopback_only(private: pgserver.PrivatePostgres) -> None:
    with psycopg.connect(private.url) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        assert conn.execute("SHOW fsync").fetchone() == ("off",)
    # The kernel's own list of listening TCP sockets: our port, on 127.0.0.1 and nowhere else.
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.split(":")
            if state == "0A" and int(port, 16) == private.port:  # 0A: LISTEN
                listening.add(address)
    if os.path.exists("/proc/net/tcp"):
        assert listening == {"0100007F"}  # 127.0.0.1, little-endian hex
    # And the unix socket in the server's own directory, not the system-wide /var/run/postgresql.
    assert (private.socket_dir / f".s.PGSQL.{private.port}").exists()


def test_test_server_uses_the_configured_url(
    private: pgserver.PrivatePostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(pgserver.URL_ENV, private.url)
    with pgserver.test_server() as server:
        assert isinstance(server, pgserver.ExternalPostgres)
        url = server.create_database("external")
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("external",)
        server.drop_database("external")


def test_stop_deletes_everything() -> None:
    server = pgserver.PrivatePostgres().start()
    base, url = server.base_dir, server.url
    assert base is not None and base.exists()
    if os.geteuid() == 0:  # the cluster belongs to the unprivileged user that runs it
        assert base.parent == Path("/tmp") and base.stat().st_uid != 0
    server.stop()
    server.stop()  # a second stop is harmless
    assert not base.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)


def test_find_pg_bin_finds_the_server_programs() -> None:
    bin_dir = pgserver.find_pg_bin()
    assert bin_dir is not None
    assert all((bin_dir / name).exists() for name in ("initdb", "pg_ctl", "postgres"))


def test_missing_programs_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pgserver, "find_pg_bin", lambda: None)
    with pytest.raises(RuntimeError, match="Debian's `postgresql` package"):
        pgserver.PrivatePostgres().start()
