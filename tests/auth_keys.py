"""Two tenants' keys and the signing secret, as the auth tests configure them."""

from __future__ import annotations

from typing import Any

from imagegen.auth import key_hash

SECRET = "test-secret-0123456789-abcdefghijklmnop"
ACME_KEY = "ig_acme-test-key-0123456789abcdefghijklmnopqrstu"
GLOBEX_KEY = "ig_globex-test-key-0123456789abcdefghijklmnopqrs"
KEYS = {"acme": ACME_KEY, "globex": GLOBEX_KEY}


def auth_section(limits: dict[str, int] | None = None, **extra: Any) -> dict[str, Any]:
    """[auth] with both keys (given as TOML inline tables, as an operator would), each with its
    max_pending from `limits` if named there."""
    limits = limits or {}
    keys = [
        {"name": name, "hash": key_hash(key), **({"max_pending": limits[name]} if name in limits else {})}
        for name, key in KEYS.items()
    ]
    return {"enabled": True, "keys": keys, **extra}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}
