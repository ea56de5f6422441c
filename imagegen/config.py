"""Settings: config.toml, overridden by IMAGEGEN_<SECTION>__<KEY> environment variables."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .providers import ProviderSettings
from .providers.local_art import ANIMALS as LOCAL_ANIMALS
from .settings_base import ConfigError, Section  # ConfigError: callers catch it from here

ENV_PREFIX = "IMAGEGEN_"
# IMAGEGEN_* variables that are not settings: the default name of [auth] secret_env's variable,
# and the test suite's database. Any other IMAGEGEN_ name without a __ is a typo, refused.
NOT_SETTINGS = frozenset({"IMAGEGEN_SECRET", "IMAGEGEN_WEBHOOK_SECRET", "IMAGEGEN_TEST_DATABASE_URL"})


# An origin as a browser sends it in the Origin header: scheme://host[:port], nothing after.
_ORIGIN = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<host>\[[0-9a-f:.]+\]|[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?)"
    r"(?::(?P<port>[0-9]{1,5}))?"
)
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _origin(value: str) -> str:
    found = _ORIGIN.fullmatch(value.lower())
    if found is None or (found["port"] is not None and int(found["port"]) > 65535):
        raise ValueError(
            f"{value!r} is not an origin: scheme://host[:port], no path, e.g. https://app.example.com"
        )
    # Origins are compared as strings, and browsers send them lowercased without a default port.
    if found["port"] is not None and found["port"] == _DEFAULT_PORTS.get(found["scheme"]):
        return f"{found['scheme']}://{found['host']}"
    return found.group(0)


def _network(value: object) -> object:
    if not isinstance(value, str):
        return value  # an ip_network already (a re-validated dump), or wrong: pydantic says so
    try:
        return ipaddress.ip_network(value)  # strict: 10.0.0.1/8 (host bits set) is a typo, refused
    except ValueError as exc:
        raise ValueError(f"not an address or a network such as 10.0.0.0/8 or ::1: {exc}") from None


Origin = Annotated[str, AfterValidator(_origin)]
Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_network)]


class ServerSettings(Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    public_url: str = ""
    # A request body still incomplete after this many seconds is cut off with 408.
    body_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    cors_origins: tuple[Origin, ...] = ()
    trusted_proxies: tuple[Network, ...] = ()
    log_format: Literal["text", "json"] = "text"
    # One line per request; off where a proxy in front already logs each one (it costs a GET
    # a measured share of its throughput: see README, Benchmarks).
    request_log: bool = True

    @field_validator("public_url")
    @classmethod
    def _absolute_or_empty(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must be empty or start with http:// or https://")
        return value.rstrip("/")


class StorageSettings(Section):
    backend: Literal["sqlite", "postgres"] = "sqlite"
    data_dir: Path = Path("./data")
    database_url: str = ""
    pool_size: Annotated[int, Field(ge=1, le=1000)] = 10
    # Terminal jobs older than this (by completedAt) are deleted with their images; 0: kept forever.
    retention_days: Annotated[float, Field(ge=0)] = 0.0

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str) -> str:
        if value and not value.startswith(("postgresql://", "postgres://")):
            # The value is not echoed: it may hold a password.
            raise ValueError("must be a postgresql:// URL, e.g. postgresql://user@host:5432/imagegen")
        return value

    @model_validator(mode="after")
    def _url_with_postgres(self) -> StorageSettings:
        if self.backend == "postgres" and not self.database_url:
            raise ValueError("backend postgres needs database_url (or IMAGEGEN_STORAGE__DATABASE_URL)")
        return self


class WorkerSettings(Section):
    count: Annotated[int, Field(ge=1, le=256)] = 4
    shutdown_grace_s: Annotated[float, Field(ge=0)] = 10.0
    max_pending: Annotated[int, Field(ge=1)] = 1000
    # At least a second: a heartbeat goes out every third of it.
    lease_s: Annotated[float, Field(ge=1)] = 30.0


class JobSettings(Section):
    max_images_per_job: Annotated[int, Field(ge=1, le=100)] = 10
    animals: Annotated[tuple[str, ...], Field(min_length=1)] = (
        "cat", "dog", "fox", "owl", "panda", "penguin", "rabbit", "bear", "frog", "lion",
        "pig", "mouse", "koala", "tiger", "chick",
    )
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    timeout_s: Annotated[float, Field(gt=0)] = 300.0
    retry_base_s: Annotated[float, Field(ge=0)] = 1.0
    retry_max_s: Annotated[float, Field(ge=0)] = 60.0
    max_recoveries: Annotated[int, Field(ge=1)] = 5
    prefer_wait_max_s: Annotated[float, Field(ge=0)] = 30.0
    # A promise to clients (keys are honoured for at least a day), so it cannot be set lower.
    idempotency_ttl_s: Annotated[float, Field(ge=86_400)] = 86_400.0


class EventSettings(Section):
    heartbeat_s: Annotated[float, Field(gt=0)] = 15.0
    subscriber_buffer: Annotated[int, Field(ge=1)] = 1000
    retention: Annotated[int, Field(ge=1)] = 100_000
    prune_interval_s: Annotated[float, Field(gt=0)] = 60.0
    retry_ms: Annotated[int, Field(ge=0)] = 2000


class ApiKeySettings(Section):
    """One client application's API key: its tenant name, and the SHA-256 of the key's text."""

    # The name is the tenant: it owns the jobs made with this key, and appears in logs.
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    # Never the key itself: "sha256:" and the hex SHA-256 of it (python3 tasks.py new-key prints both).
    hash: str
    # This tenant's own backlog limit (429 beyond it); None: only workers.max_pending applies.
    max_pending: Annotated[int, Field(ge=1)] | None = None

    @field_validator("hash")
    @classmethod
    def _sha256(cls, value: str) -> str:
        # The value is not echoed: a key pasted here by mistake must not reach a log.
        if not re.fullmatch(r"sha256:[0-9a-fA-F]{64}", value):
            raise ValueError('must be "sha256:" and the 64 hex digits of the key\'s SHA-256 (python3 tasks.py new-key NAME)')
        return value.lower()


class AuthSettings(Section):
    enabled: bool = False
    keys: tuple[ApiKeySettings, ...] = ()
    # The NAME of the environment variable holding the secret that signs stream tokens and
    # image URLs (at least 32 characters; every node of a cluster needs the same one).
    secret_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = "IMAGEGEN_SECRET"
    token_ttl_s: Annotated[float, Field(ge=1, le=86_400)] = 300.0
    image_url_ttl_s: Annotated[float, Field(ge=1, le=7 * 86_400)] = 3600.0

    @model_validator(mode="after")
    def _keys(self) -> AuthSettings:
        if self.enabled and not self.keys:
            raise ValueError("auth is enabled but no keys are configured (python3 tasks.py new-key NAME makes one)")
        for what in ("name", "hash"):
            values = [getattr(key, what) for key in self.keys]
            repeated = sorted({value for value in values if values.count(value) > 1})
            if repeated:
                shown = ", ".join(repeated) if what == "name" else "two keys have the same hash"
                raise ValueError(f"keys: every key needs its own {what} ({shown})")
        return self


class HealthSettings(Section):
    # GET /readyz's bound on its database write: a stuck database is a 503 within this, not a hang.
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0


class MetricsSettings(Section):
    enabled: bool = True


def _port_range(value: object) -> object:
    """80, or "1024-65535": a port or an inclusive range, as (low, high)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, str) and (found := re.fullmatch(r"([0-9]{1,5})-([0-9]{1,5})", value.strip())):
        return (int(found[1]), int(found[2]))
    if isinstance(value, (tuple, list)):
        return value
    raise ValueError(f"{value!r} is not a port (443) or a range of ports (\"1024-65535\")")


def _valid_range(value: tuple[int, int]) -> tuple[int, int]:
    low, high = value
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"{low}-{high} is not a range of ports within 1-65535")
    return value


PortRange = Annotated[tuple[int, int], BeforeValidator(_port_range), AfterValidator(_valid_range)]


class WebhookSettings(Section):
    # The NAME of the environment variable holding the signing secret, in Standard Webhooks'
    # whsec_<base64> form (python3 tasks.py new-webhook-secret prints one). Unset: POSTs that
    # ask for a webhook are refused (422), since a receiver could not verify them.
    secret_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = "IMAGEGEN_WEBHOOK_SECRET"
    retry_base_s: Annotated[float, Field(ge=0)] = 5.0
    retry_for_s: Annotated[float, Field(ge=0)] = 86_400.0
    timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    allowed_ports: Annotated[tuple[PortRange, ...], Field(min_length=1)] = ((80, 80), (443, 443), (1024, 65535))
    # Networks a webhook may reach although they are private (loopback, RFC 1918...), e.g. 10.0.0.0/8.
    allow_networks: tuple[Network, ...] = ()
    # Attempts in flight at once, on this node and to one receiver host.
    concurrency: Annotated[int, Field(ge=1, le=1000)] = 32
    per_host: Annotated[int, Field(ge=1, le=1000)] = 4


class Settings(Section):
    """Every setting of the service; see config.toml for what each one means."""

    # Validate the default sections too, so the checks across sections below run without them.
    model_config = Section.model_config | {"validate_default": True}

    server: ServerSettings = ServerSettings()
    storage: StorageSettings = StorageSettings()
    workers: WorkerSettings = WorkerSettings()
    jobs: JobSettings = JobSettings()
    provider: ProviderSettings = ProviderSettings()
    events: EventSettings = EventSettings()
    auth: AuthSettings = AuthSettings()
    health: HealthSettings = HealthSettings()
    metrics: MetricsSettings = MetricsSettings()
    webhooks: WebhookSettings = WebhookSettings()

    @field_validator("provider")
    @classmethod
    def _animals_drawable(cls, provider: ProviderSettings, info: ValidationInfo) -> ProviderSettings:
        # jobs is validated before provider (field order); absent if it was itself invalid.
        jobs = info.data.get("jobs")
        if provider.name == "local" and jobs is not None:
            unknown = [animal for animal in jobs.animals if animal not in LOCAL_ANIMALS]
            if unknown:
                raise ValueError(
                    f"the local provider cannot draw jobs.animals {', '.join(map(repr, unknown))}; "
                    f"it draws {', '.join(LOCAL_ANIMALS)}"
                )
        return provider

    @property
    def database_path(self) -> Path:
        return self.storage.data_dir / "imagegen.sqlite3"


SETTINGS = web.AppKey("settings", Settings)


def _env_value(raw: str) -> Any:
    # Read the value as TOML so lists and numbers can be given; fall back to a plain string
    # so IMAGEGEN_STORAGE__DATA_DIR=/srv/x works without quotes.
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS:
            continue
        # IMAGEGEN_PROVIDER__OPENAI__BASE_URL names [provider.openai] base_url.
        *sections, key = name[len(ENV_PREFIX):].lower().split("__")
        if not sections or not all(sections) or not key:
            raise ConfigError(
                f"{name}: expected {ENV_PREFIX}<SECTION>__<KEY> or {ENV_PREFIX}<SECTION>__<SUBSECTION>__<KEY>"
            )
        target = data
        for depth in range(len(sections)):
            target = target.setdefault(sections[depth], {})
            if not isinstance(target, dict):
                raise ConfigError(f"{name}: [{'.'.join(sections[: depth + 1])}] is not a section")
        target[key] = _env_value(raw)


def load_settings(
    path: Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read `path` (TOML; None means defaults only), apply the environment, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    _apply_env(data, os.environ if environ is None else environ)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{key}: {first['msg']}{more}") from None
