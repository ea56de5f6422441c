"""Shared fixtures: the real app on a real database (a SQLite file under tmp_path, or a fresh
database on the suite's own PostgreSQL server), served over a real socket.

Tests that take `client` or `make_client` run once per backend: the `backend` fixture is
parametrised. A module that is about one backend only overrides `backend` with a plain fixture.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import os
import re
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from imagegen.app import create_app
from imagegen.config import Settings, load_settings
from imagegen.logs import RequestLog, requests_log
from imagegen.webhooks.deliver import RESOLVER

from . import pgserver

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("sqlite", "postgres")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pgserver.PostgresServer]:
    """The suite's PostgreSQL server, started on first use (or IMAGEGEN_TEST_DATABASE_URL's)."""
    with pgserver.test_server() as server:
        yield server


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


_database_numbers = itertools.count(1)


class TestDatabase:
    """The database a test's app uses, and a second, plain connection to read what it committed."""

    __test__ = False  # not a test class, despite its name

    def __init__(self, backend: str, data_dir: Path, url: str = "") -> None:
        self.backend = backend
        self.data_dir = data_dir
        self.url = url

    @property
    def storage(self) -> dict[str, Any]:
        """The [storage] settings that point an app at this database."""
        if self.backend == "sqlite":
            return {"backend": "sqlite", "data_dir": str(self.data_dir)}
        return {"backend": "postgres", "data_dir": str(self.data_dir), "database_url": self.url}

    @property
    def env(self) -> dict[str, str]:
        """The same, as IMAGEGEN_STORAGE__* variables for a server.py process."""
        return {f"IMAGEGEN_STORAGE__{key.upper()}": str(value) for key, value in self.storage.items()}

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Run `sql` (with ? placeholders) on a plain connection of its own; rows as dicts."""
        if self.backend == "sqlite":
            return [dict(row) for row in db_rows(self.data_dir, sql, params)]
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(self.url, autocommit=True, row_factory=dict_row) as conn:
            cursor = conn.execute(re.sub(r"\?", "%s", sql), params)
            return cursor.fetchall() if cursor.description is not None else []


@pytest.fixture
def database(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[TestDatabase]:
    """This test's database, on its backend: empty, and dropped afterwards."""
    if backend == "sqlite":
        yield TestDatabase("sqlite", tmp_path / "data")
        return
    server: pgserver.PostgresServer = request.getfixturevalue("pg_server")
    name = f"imagegen_test_{os.getpid()}_{next(_database_numbers)}"
    url = server.create_database(name)
    try:
        yield TestDatabase("postgres", tmp_path / "data", url)
    finally:
        server.drop_database(name)


def make_settings(data_dir: Path, **sections: dict[str, Any]) -> Settings:
    """Settings from the shipped config.toml, with data under `data_dir` and `sections` overriding
    (a dict value is a sub-section: provider={"openai": {"model": "dall-e-2"}})."""
    env = {"IMAGEGEN_STORAGE__DATA_DIR": str(data_dir)}
    for section, values in sections.items():
        env.update(_env(f"IMAGEGEN_{section.upper()}", values))
    return load_settings(ROOT / "config.toml", environ=env)


def _env(prefix: str, values: dict[str, Any]) -> dict[str, str]:
    env = {}
    for key, value in values.items():
        name = f"{prefix}__{key.upper()}"
        env.update(_env(name, value) if isinstance(value, dict) else {name: _toml(value)})
    return env


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):  # inside a list: an inline table, e.g. [auth] keys
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return str(value)


ClientFactory = Callable[..., Awaitable[TestClient]]


async def literal_only_resolve(host: str, port: int) -> list[Any]:
    """A webhook host that is an address is itself; any name is refused, never looked up."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        raise OSError(f"the tests resolve no names ({host})") from None

REQUEST_LOG = {"access_log_class": RequestLog, "access_log": requests_log}


@pytest.fixture
def make_client(database: TestDatabase, aiohttp_client: Any) -> ClientFactory:
    """Start the real app on the test's database (set up first, so it is dropped last; small images and no shutdown grace by
    default, for speed) and return a client for it."""

    async def factory(
        data_dir: Path | None = None, configure: Callable[[web.Application], None] | None = None,
        **sections: dict[str, Any],
    ) -> TestClient:
        sections.setdefault("provider", {}).setdefault("image_size", 64)
        # Tests that stop an app mid-job should not sit out the production grace period.
        sections.setdefault("workers", {}).setdefault("shutdown_grace_s", 0)
        storage = {**database.storage, **({"data_dir": str(data_dir)} if data_dir else {})}
        sections["storage"] = {**storage, **sections.get("storage", {})}
        settings = make_settings(Path(sections["storage"]["data_dir"]), **sections)
        # Request lines as server.py logs them, by aiohttp's access logger. Started here: the
        # server_kwargs of aiohttp_client reach TestServer's constructor, which drops them.
        app = create_app(settings)
        # Webhooks resolve through a resolver that answers only for address literals: no test
        # may send a DNS query (a packet to a non-loopback server). A test may replace it.
        app[RESOLVER] = literal_only_resolve
        if configure is not None:  # e.g. a stub resolver for the webhooks' SSRF tests
            configure(app)
        server = TestServer(app)
        await server.start_server(**REQUEST_LOG)
        return await aiohttp_client(server)

    return factory


@pytest.fixture
async def client(make_client: ClientFactory) -> TestClient:
    return await make_client()


async def wait_for_status(
    client: TestClient, job_id: str, statuses: set[str], timeout: float = 20.0
) -> dict[str, Any]:
    """Poll GET /generations/{jobId} until the job is in one of `statuses`."""

    async def poll() -> dict[str, Any]:
        while True:
            response = await client.get(f"/generations/{job_id}")
            assert response.status == 200
            body = await response.json()
            if body["status"] in statuses:
                return body
            await asyncio.sleep(0.02)  # polling interval, bounded by wait_for below

    return await asyncio.wait_for(poll(), timeout)


async def create_job(client: TestClient, **body: Any) -> str:
    response = await client.post("/generations", json={"numImages": 1, **body})
    assert response.status == 202, await response.text()
    return (await response.json())["jobId"]


@pytest.fixture
def cluster(database: TestDatabase) -> Iterator[Any]:
    """Server processes on the test's database (tests/nodes.py), stopped afterwards."""
    from .nodes import Cluster

    nodes = Cluster(database)
    try:
        yield nodes
    finally:
        nodes.close()


async def prune(client: TestClient, keys_older_than_s: float | None = None) -> int:
    """Run one retention pass now, as the background upkeep does (keys: jobs.idempotency_ttl_s)."""
    from imagegen.config import SETTINGS
    from imagegen.jobs import timestamp_in
    from imagegen.store import STORE

    settings = client.app[SETTINGS]
    age = settings.jobs.idempotency_ttl_s if keys_older_than_s is None else keys_older_than_s
    store = client.app[STORE]
    pruned = await store.prune(settings.events.retention, timestamp_in(-age))
    # On PostgreSQL one pass at a time holds the pruning lock: if the app's own upkeep was
    # pruning at that moment, this pass returned at once. Once more, after it.
    for _ in range(3):
        await asyncio.sleep(0.05)
        pruned = max(pruned, await store.prune(settings.events.retention, timestamp_in(-age)))
    return pruned


def db_rows(data_dir: Path, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    """Read what was committed, through a second, plain sqlite3 connection."""
    conn = sqlite3.connect(data_dir / "imagegen.sqlite3")
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute(sql, params).fetchall()
        conn.commit()  # a write (a test setting a row up) is kept, as on PostgreSQL's autocommit
        return rows
    finally:
        conn.close()
