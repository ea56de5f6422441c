"""Webhooks: each chosen event of a job POSTed to the URL its creator gave, signed the Standard
Webhooks way (https://www.standardwebhooks.com), durably (an outbox written with the event),
retried with backoff, and never to an address the SSRF guard refuses.

- addresses.py: which URLs may be given, and which addresses may be connected to;
- this module: the event names, the signing secret and the signature;
- deliver.py: the deliverer that claims due deliveries and attempts them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import typing
from collections.abc import AsyncIterator

from aiohttp import web

from ..config import SETTINGS
from ..models import WebhookEvent
from ..errors import StartupError

# The events a webhook may ask for: those the SSE streams carry.
EVENT_NAMES: tuple[str, ...] = typing.get_args(WebhookEvent)
# What a webhook gets when it names no events: how the job ended.
DEFAULT_WEBHOOK_EVENTS = ("job.completed", "job.failed", "job.canceled")

SECRET_PREFIX = "whsec_"
# Standard Webhooks asks for 24 to 64 random bytes.
SECRET_MIN_BYTES = 24


class Signer:
    """Signs a webhook body: webhook-signature is "v1," and the base64 HMAC-SHA256, under the
    secret, of "<webhook-id>.<webhook-timestamp>.<body>"."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def headers(self, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        signed = b"%s.%d.%s" % (message_id.encode(), timestamp, body)
        signature = base64.b64encode(hmac.new(self._secret, signed, hashlib.sha256).digest()).decode()
        return {"webhook-id": message_id, "webhook-timestamp": str(timestamp), "webhook-signature": f"v1,{signature}"}


def parse_secret(value: str, variable: str) -> bytes:
    """The key of a whsec_<base64> secret; StartupError naming `variable` (never the value) if malformed."""
    encoded = value.strip().removeprefix(SECRET_PREFIX)
    try:
        secret = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        secret = b""
    if not value.strip().startswith(SECRET_PREFIX) or len(secret) < SECRET_MIN_BYTES:
        raise StartupError(
            f"{variable} is not a webhook secret: expected {SECRET_PREFIX} and the base64 of at least "
            f"{SECRET_MIN_BYTES} random bytes (python3 tasks.py new-webhook-secret prints one)"
        )
    return secret


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode()


SIGNER = web.AppKey("webhook_signer", Signer)


async def signer_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the signing secret, read once at start-up. Unset: webhooks are off (a
    create asking for one gets 422); malformed: start-up stops with one line."""
    variable = app[SETTINGS].webhooks.secret_env
    value = os.environ.get(variable)
    if value:
        app[SIGNER] = Signer(parse_secret(value, variable))
    yield
