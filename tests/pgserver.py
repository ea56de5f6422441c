"""A private, throwaway PostgreSQL server for the tests and benchmarks.

A fresh machine has no PostgreSQL running, and a developer's own server is not ours to fill with
test databases, so the suite starts its own: `initdb` into a temporary directory under /tmp, `pg_ctl
start` on a free port on 127.0.0.1 (plus a unix socket in that directory), tuned for speed over
durability, and everything is stopped and deleted on exit. Set IMAGEGEN_TEST_DATABASE_URL to a
`postgresql://` URL (a superuser's, on a maintenance database such as `postgres`) to use an existing
server instead; `test_server()` picks one or the other.

Plain functions and context managers, no pytest fixtures, so fixtures, subprocess-based tests and
benchmarks can all use it. psycopg is imported only when a database is created or dropped.

    with test_server() as server:
        url = server.create_database("jobs_1")   # postgresql://imagegen@127.0.0.1:PORT/jobs_1
        ...
        server.drop_database("jobs_1")

`python -m tests.pgserver` starts a private server, prints its URL and keeps it until Ctrl-C.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

URL_ENV = "IMAGEGEN_TEST_DATABASE_URL"
SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")
INSTALL_HINT = (
    "install Debian's `postgresql` package (apt-get install postgresql; `python3 tasks.py test` does it "
    f"when run as root), or set {URL_ENV} to the URL of a PostgreSQL server to use"
)

# A throwaway cluster: losing it in a crash costs nothing, so trade every durability guarantee for speed.
FAST_SETTINGS: dict[str, str | int] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": 200,  # pools from several apps in one test, plus the subscribers of the load tests
    "shared_buffers": "64MB",
}

# initdb and postgres refuse to run as root; as root, they run as the first of these that exists.
UNPRIVILEGED_USERS = ("postgres", "nobody")


def find_pg_bin() -> Path | None:
    """The directory holding `initdb`, `pg_ctl` and `postgres`: from PATH first, then Debian's
    /usr/lib/postgresql/<version>/bin, newest version first; None if there is none."""
    candidates = []
    found = shutil.which("pg_ctl")
    if found:
        # Resolved, because PATH often holds symlinks to the real bin directory, and initdb finds
        # `postgres` beside its own resolved path anyway.
        candidates.append(Path(found).resolve().parent)
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in SERVER_PROGRAMS):
            return directory
    return None


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    """/usr/lib/postgresql/9.6/bin -> (9, 6): numeric, so 15 sorts after 9.6."""
    try:
        return tuple(int(part) for part in bin_dir.parent.name.split("."))
    except ValueError:
        return (-1,)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """What both kinds of server offer: `url` (a superuser's, on the `postgres` database) and
    creating and dropping databases through it."""

    url: str

    def database_url(self, name: str) -> str:
        """The URL of database `name` on this server (whether or not it exists)."""
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(path="/" + quote(name, safe="")))

    def create_database(self, name: str) -> str:
        """Create an empty database `name` and return its URL."""
        from psycopg import sql

        with self._connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.database_url(name)

    def drop_database(self, name: str) -> None:
        """Drop database `name` if it exists, closing any connections still open to it."""
        from psycopg import sql

        with self._connect() as conn:
            # WITH (FORCE) is PostgreSQL 13+; older servers need the connections ended by hand.
            if conn.info.server_version >= 130000:
                statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            else:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                statement = sql.SQL("DROP DATABASE IF EXISTS {}")
            conn.execute(statement.format(sql.Identifier(name)))

    def _connect(self) -> Any:
        import psycopg

        # CREATE/DROP DATABASE cannot run inside a transaction block.
        return psycopg.connect(self.url, autocommit=True, connect_timeout=10)


class ExternalPostgres(PostgresServer):
    """An existing server, given by a `postgresql://` URL whose role may create databases."""

    def __init__(self, url: str) -> None:
        if not url.startswith(("postgresql://", "postgres://")):
            raise RuntimeError(f"{URL_ENV} must be a postgresql:// URL, not {url!r}")
        self.url = url


class PrivatePostgres(PostgresServer):
    """A PostgreSQL cluster of our own in a temporary directory, listening on 127.0.0.1:`port` and
    on a unix socket in that directory, with trust authentication for superuser `user`.

        with PrivatePostgres() as server:
            server.url          # postgresql://imagegen@127.0.0.1:PORT/postgres

    `settings` are added to (or override) FAST_SETTINGS in postgresql.conf.
    """

    def __init__(
        self,
        *,
        user: str = "imagegen",
        settings: Mapping[str, str | int] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.user = user
        self.settings = {**FAST_SETTINGS, **(settings or {})}
        self.start_timeout = start_timeout
        self.host = "127.0.0.1"
        self.port = 0
        self.base_dir: Path | None = None  # holds data/, the log and the unix socket
        self._bin: Path | None = None
        self._run_as: dict[str, Any] = {}
        # The (uid, gid) the server runs as when started by root, else None: a directory it
        # must write outside its own (a tablespace's) is given to it.
        self.os_owner: tuple[int, int] | None = None

    @property
    def url(self) -> str:  # type: ignore[override]
        if not self.port:
            raise RuntimeError("the private PostgreSQL server is not running")
        return f"postgresql://{quote(self.user, safe='')}@{self.host}:{self.port}/postgres"

    @property
    def data_dir(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir

    @property
    def log_path(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "postgres.log"

    def __enter__(self) -> PrivatePostgres:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> PrivatePostgres:
        """initdb and start the server; return once it accepts connections."""
        if self.base_dir is not None:
            raise RuntimeError("this PrivatePostgres was already started")
        self._bin = find_pg_bin()
        if self._bin is None:
            raise RuntimeError(f"PostgreSQL's initdb, pg_ctl and postgres are not installed: {INSTALL_HINT}")
        self._run_as, owner = _unprivileged()
        self.os_owner = owner
        # Under /tmp, not pytest's tmp_path: that is mode 700 under root's /tmp/pytest-of-root, which
        # the unprivileged user could not enter.
        self.base_dir = Path(tempfile.mkdtemp(prefix="imagegen-pg-", dir="/tmp" if owner else None))
        try:
            if owner:
                os.chown(self.base_dir, *owner)
            self._initdb()
            self._start()
        except BaseException:
            self.stop()
            raise
        # A caller that never reaches stop() (an uncaught error in a benchmark) still leaves no server behind.
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Stop the server without a shutdown checkpoint (its data is deleted anyway) and delete its
        directory. Safe to call more than once."""
        if self.base_dir is None:
            return
        atexit.unregister(self.stop)
        if (self.data_dir / "postmaster.pid").exists():  # running, or pg_ctl start gave up waiting
            assert self._bin is not None
            stop = [self._bin / "pg_ctl", "stop", "-D", self.data_dir, "-m", "immediate", "-w", "-s"]
            if self._run(stop).returncode != 0:
                _kill_postmaster(self.data_dir)
        shutil.rmtree(self.base_dir, ignore_errors=True)
        self.base_dir = None
        self.port = 0

    def halt(self) -> None:
        """Stop the server at once, as a crash or an operator would, keeping its data: `resume()`
        starts it again on the same port."""
        assert self._bin is not None
        result = self._run([self._bin / "pg_ctl", "stop", "-D", self.data_dir, "-m", "immediate", "-w", "-s"])
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed ({result.returncode}):\n{result.stdout}")

    def resume(self) -> None:
        """Start a halted server again, on its old port (crash recovery runs first)."""
        assert self._bin is not None
        result = self._run([
            self._bin / "pg_ctl", "start", "-D", self.data_dir, "-l", self.log_path,
            "-w", "-t", str(int(self.start_timeout)), "-s", "-o", f"-p {self.port}",
        ])
        if result.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start again ({result.returncode}):\n{result.stdout}")

    def _initdb(self) -> None:
        assert self._bin is not None
        # --no-sync: a throwaway cluster need not wait for the disk.
        result = self._run([
            self._bin / "initdb", "-D", self.data_dir, "-U", self.user, "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync",
        ])
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}):\n{result.stdout}")
        settings = {
            **self.settings,
            "listen_addresses": "127.0.0.1",  # never reachable from other machines
            "unix_socket_directories": str(self.socket_dir),  # not /var/run/postgresql: that may not exist
        }
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n# added by tests/pgserver.py\n")
            for name, value in settings.items():
                quoted = str(value).replace("'", "''")  # every setting may be a quoted string
                conf.write(f"{name} = '{quoted}'\n")
        # Only our own socket and loopback, with no password: nothing else can reach the server.
        (self.data_dir / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")

    def _start(self) -> None:
        assert self._bin is not None
        for attempt in range(5):
            # The port is free when chosen but may be taken before postgres binds it: then try another.
            self.port = free_port()
            result = self._run([
                self._bin / "pg_ctl", "start", "-D", self.data_dir, "-l", self.log_path,
                "-w", "-t", str(int(self.start_timeout)), "-s", "-o", f"-p {self.port}",
            ])
            if result.returncode == 0:
                return
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            if "could not bind" not in log or attempt == 4:
                raise RuntimeError(
                    f"PostgreSQL did not start ({result.returncode}):\n{result.stdout}\n{log[-3000:]}"
                )
            self.log_path.unlink()

    def _run(self, args: list[Any]) -> subprocess.CompletedProcess[str]:
        # PG* variables (PGPORT, PGDATA, PGHOST...) from the caller's environment would point these
        # programs at some other server; the C locale keeps messages and sorting predictable.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return subprocess.run(
            [str(arg) for arg in args],
            cwd=self.base_dir,  # the unprivileged user must be able to enter its working directory
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=self.start_timeout + 30,
            **self._run_as,
        )


def _unprivileged() -> tuple[dict[str, Any], tuple[int, int] | None]:
    """As root: subprocess.run arguments that run a program as an unprivileged user, and that
    user's (uid, gid) to own the cluster's directory. Otherwise: nothing to change."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return {}, None
    for name in UNPRIVILEGED_USERS:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        # extra_groups=[] drops root's supplementary groups too.
        run_as = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        return run_as, (entry.pw_uid, entry.pw_gid)
    raise RuntimeError(
        f"PostgreSQL refuses to run as root and none of the users {', '.join(UNPRIVILEGED_USERS)} exists"
    )


def _kill_postmaster(data_dir: Path) -> None:
    """pg_ctl could not stop the server: SIGKILL the postmaster whose pid its data directory records."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)  # waiting for the killed postmaster to go; bounded by the deadline


@contextmanager
def test_server() -> Iterator[PostgresServer]:
    """The server to test against: IMAGEGEN_TEST_DATABASE_URL's if set, else a PrivatePostgres
    started now and deleted on exit."""
    url = os.environ.get(URL_ENV)
    if url:
        yield ExternalPostgres(url)
        return
    with PrivatePostgres() as server:
        yield server


test_server.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test, wherever it is imported


if __name__ == "__main__":
    # SIGTERM (kill, timeout) as well as Ctrl-C must unwind through the `with`, which deletes the cluster.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    with PrivatePostgres() as server:
        print(server.url, flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
