"""Credentials, without HTTP: API keys (configured hashed), stream tokens and signed image URLs.

- A key is random text of 32 bytes or more, so its SHA-256 is as good as a slow hash (nothing to
  guess from it): the configuration holds only `sha256:<hex>`. A presented key is hashed and
  compared with every configured hash in constant time (hmac.compare_digest, no early exit).
- Tokens and image-URL signatures are HMAC-SHA256 under one secret from the environment, each
  kind with its own label, so a signature made for one purpose is never valid for another.
- Nothing here logs, and nothing a client sends is put in an error message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from .config import SETTINGS, AuthSettings
from .errors import StartupError

# The shortest secret accepted: 32 characters of token_urlsafe carry 192 bits.
MIN_SECRET_LENGTH = 32


@dataclass(frozen=True)
class Tenant:
    """A client application: the name of its key owns its jobs; its own backlog limit."""

    name: str
    max_pending: int | None = None


def new_key() -> str:
    """A new random API key (43 URL-safe characters: 32 random bytes)."""
    return "ig_" + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    """The configured form of a key: "sha256:" and its hex SHA-256."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Credentials:
    """The configured keys and the signing secret: who a request is, and what it may open."""

    def __init__(self, settings: AuthSettings, secret: str) -> None:
        self._keys = [
            (bytes.fromhex(key.hash.removeprefix("sha256:")), Tenant(key.name, key.max_pending))
            for key in settings.keys
        ]
        self._tenants = {tenant.name: tenant for _, tenant in self._keys}
        self._secret = secret.encode()
        self.token_ttl_s = settings.token_ttl_s
        self.image_url_ttl_s = settings.image_url_ttl_s
        # Image URLs are signed to an expiry rounded up to this step, so one job's URLs stay the
        # same for a while: browsers cache the image, and rendered job JSON can be shared.
        self.image_url_step_s = max(1, math.ceil(settings.image_url_ttl_s / 12))

    @classmethod
    def from_environment(cls, settings: AuthSettings) -> Credentials:
        secret = os.environ.get(settings.secret_env, "")
        if len(secret) < MIN_SECRET_LENGTH:
            state = "is not set" if not secret else f"is shorter than {MIN_SECRET_LENGTH} characters"
            raise StartupError(
                f"auth is enabled but the environment variable {settings.secret_env} ([auth] secret_env) {state}: "
                "it signs stream tokens and image URLs (python3 tasks.py new-secret prints one)"
            )
        return cls(settings, secret)

    # --- API keys --------------------------------------------------------------------------

    def tenant_for_key(self, key: str) -> Tenant | None:
        """The tenant whose key this is, or None. Every configured hash is compared, in constant
        time, whatever matches: how long this takes says nothing about which key came close."""
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for expected, tenant in self._keys:
            if hmac.compare_digest(digest, expected):
                found = tenant
        return found

    def tenant(self, name: str) -> Tenant | None:
        return self._tenants.get(name)

    # --- stream tokens ---------------------------------------------------------------------

    def issue_token(self, tenant: Tenant, now: float | None = None) -> tuple[str, float]:
        """A token for `tenant`'s event streams, and when it expires (Unix time)."""
        expires = math.floor((time.time() if now is None else now) + self.token_ttl_s)
        payload = _b64(json.dumps({"sub": tenant.name, "exp": expires}, separators=(",", ":")).encode())
        return f"{payload}.{self._sign('token', payload)}", float(expires)

    def token_tenant(self, token: str, now: float | None = None) -> tuple[Tenant, float] | None:
        """The tenant a valid, unexpired token was issued to, and its expiry; None otherwise
        (tampered, expired, malformed, or its key no longer configured)."""
        payload, _, signature = token.partition(".")
        if not payload or not hmac.compare_digest(signature.encode(), self._sign("token", payload).encode()):
            return None
        try:
            claims = json.loads(_unb64(payload))
            name, expires = claims["sub"], claims["exp"]
        except (ValueError, KeyError, TypeError, binascii.Error):
            return None
        if not isinstance(expires, int) or expires <= (time.time() if now is None else now):
            return None
        tenant = self._tenants.get(name) if isinstance(name, str) else None
        return None if tenant is None else (tenant, float(expires))

    # --- signed image URLs -----------------------------------------------------------------

    def image_url_expiry(self, now: float | None = None) -> int:
        """The expiry image URLs signed now carry: at least image_url_ttl_s away, rounded up."""
        step = self.image_url_step_s
        return math.ceil(((time.time() if now is None else now) + self.image_url_ttl_s) / step) * step

    def image_query(self, path: str, expires: int) -> str:
        """The query string that makes `path` (e.g. /images/<job>/0.png) openable until `expires`."""
        signature = self._sign("image", f"{path}\n{expires}")
        return f"?exp={expires}&sig={signature}"

    def image_signature_valid(self, path: str, exp: str, sig: str, now: float | None = None) -> bool:
        if not (exp.isascii() and exp.isdigit() and len(exp) <= 12):
            return False
        expected = self._sign("image", f"{path}\n{exp}")
        return hmac.compare_digest(sig.encode(), expected.encode()) and int(exp) > (time.time() if now is None else now)

    def _sign(self, label: str, message: str) -> str:
        return _b64(hmac.new(self._secret, f"imagegen {label}\n{message}".encode(), hashlib.sha256).digest())


CREDENTIALS = web.AppKey("credentials", Credentials)


async def credentials_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context (with auth enabled): the keys and the secret, read once at start-up."""
    app[CREDENTIALS] = Credentials.from_environment(app[SETTINGS].auth)
    yield
