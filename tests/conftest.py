"""Shared fixtures: the real app on a real SQLite file under tmp_path, served over a real socket."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from imagegen.app import create_app
from imagegen.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


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
    return str(value)


ClientFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def make_client(aiohttp_client: Any, tmp_path: Path) -> ClientFactory:
    """Start the real app (small images and no shutdown grace by default, for speed) and
    return a client for it."""

    async def factory(data_dir: Path | None = None, **sections: dict[str, Any]) -> TestClient:
        sections.setdefault("provider", {}).setdefault("image_size", 64)
        # Tests that stop an app mid-job should not sit out the production grace period.
        sections.setdefault("workers", {}).setdefault("shutdown_grace_s", 0)
        settings = make_settings(data_dir or tmp_path / "data", **sections)
        return await aiohttp_client(create_app(settings))

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


async def prune(client: TestClient, keys_older_than_s: float | None = None) -> int:
    """Run one retention pass now, as the background upkeep does (keys: jobs.idempotency_ttl_s)."""
    from imagegen.config import SETTINGS
    from imagegen.jobs import timestamp_in
    from imagegen.store import STORE

    settings = client.app[SETTINGS]
    age = settings.jobs.idempotency_ttl_s if keys_older_than_s is None else keys_older_than_s
    return await client.app[STORE].prune(settings.events.retention, timestamp_in(-age))


def db_rows(data_dir: Path, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    """Read what was committed, through a second, plain sqlite3 connection."""
    conn = sqlite3.connect(data_dir / "imagegen.sqlite3")
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()
