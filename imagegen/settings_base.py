"""What every settings section shares, apart from config.py so that a provider's settings can
live beside the provider without importing config (which imports the providers)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

from .errors import StartupError


class Section(BaseModel):
    # Unknown keys are typos: refuse them instead of silently running on a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _base_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return value.rstrip("/")


# Without a trailing slash, so that API paths can be appended to it.
BaseUrl = Annotated[str, AfterValidator(_base_url)]


class ConfigError(StartupError):
    """The configuration is invalid; the message names the key and the problem."""
