"""Settings: config.toml, overridden by IMAGEGEN_<SECTION>__<KEY> environment variables."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "IMAGEGEN_"


class _Section(BaseModel):
    # Unknown keys are typos: refuse them instead of silently running on a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    public_url: str = ""

    @field_validator("public_url")
    @classmethod
    def _absolute_or_empty(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must be empty or start with http:// or https://")
        return value.rstrip("/")


class StorageSettings(_Section):
    data_dir: Path = Path("./data")


class WorkerSettings(_Section):
    count: Annotated[int, Field(ge=1, le=256)] = 4
    shutdown_grace_s: Annotated[float, Field(ge=0)] = 10.0
    max_pending: Annotated[int, Field(ge=1)] = 1000


class JobSettings(_Section):
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


def _base_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return value.rstrip("/")


# Without a trailing slash, so that API paths can be appended to it.
BaseUrl = Annotated[str, AfterValidator(_base_url)]


class OpenAISettings(_Section):
    base_url: BaseUrl = "https://api.openai.com"
    api_key_env: str = "OPENAI_API_KEY"
    model: str = "dall-e-3"
    response_format: Literal["b64_json", "url", ""] = "b64_json"
    max_n_per_request: Annotated[int, Field(ge=1, le=100)] = 1
    quality: str = ""
    style: str = ""

    @field_validator("base_url")
    @classmethod
    def _without_v1(cls, value: str) -> str:
        if value.endswith("/v1"):
            raise ValueError("leave out /v1: the provider adds /v1/images/generations itself")
        return value


class Automatic1111Settings(_Section):
    base_url: BaseUrl = "http://127.0.0.1:7860"
    steps: Annotated[int, Field(ge=1, le=150)] = 20
    negative_prompt: str = ""
    sampler_name: str = ""
    max_batch_size: Annotated[int, Field(ge=1, le=100)] = 1
    username: str = ""
    password_env: str = ""

    @model_validator(mode="after")
    def _password_with_username(self) -> Automatic1111Settings:
        if self.username and not self.password_env:
            raise ValueError("with a username, password_env must name the variable holding the password")
        return self


class ProviderSettings(_Section):
    name: str = "local"
    delay_s: Annotated[float, Field(ge=0)] = 0.0
    image_size: Annotated[int, Field(ge=64, le=2048)] = 512
    fail_attempts: Annotated[int, Field(ge=0)] = 0
    prompt_template: str = "A cute cartoon {animal}, friendly sticker illustration, soft pastel background"
    # 0: the provider's own limit (1 for automatic1111, none for openai beyond workers.count).
    max_concurrency: Annotated[int, Field(ge=0, le=256)] = 0
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    read_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    openai: OpenAISettings = OpenAISettings()
    automatic1111: Automatic1111Settings = Automatic1111Settings()

    @field_validator("prompt_template")
    @classmethod
    def _names_the_animal(cls, value: str) -> str:
        try:
            value.format(animal="cat")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"must be a template using only {{animal}}: {exc}") from None
        return value

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str) -> str:
        from .providers import REGISTRY  # the registry imports this module

        if value not in REGISTRY:
            raise ValueError(f"unknown provider {value!r}; known: {', '.join(sorted(REGISTRY))}")
        return value


class EventSettings(_Section):
    heartbeat_s: Annotated[float, Field(gt=0)] = 15.0
    subscriber_buffer: Annotated[int, Field(ge=1)] = 1000
    retention: Annotated[int, Field(ge=1)] = 100_000
    prune_interval_s: Annotated[float, Field(gt=0)] = 60.0
    retry_ms: Annotated[int, Field(ge=0)] = 2000


class Settings(_Section):
    """Every setting of the service; see config.toml for what each one means."""

    server: ServerSettings = ServerSettings()
    storage: StorageSettings = StorageSettings()
    workers: WorkerSettings = WorkerSettings()
    jobs: JobSettings = JobSettings()
    provider: ProviderSettings = ProviderSettings()
    events: EventSettings = EventSettings()

    @property
    def database_path(self) -> Path:
        return self.storage.data_dir / "imagegen.sqlite3"


SETTINGS = web.AppKey("settings", Settings)


class ConfigError(Exception):
    """The configuration is invalid; the message names the key and the problem."""


def _env_value(raw: str) -> Any:
    # Read the value as TOML so lists and numbers can be given; fall back to a plain string
    # so IMAGEGEN_STORAGE__DATA_DIR=/srv/x works without quotes.
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
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
