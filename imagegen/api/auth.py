"""API keys at the edge: who a request is (its tenant), and POST /tokens.

With [auth] enabled, a middleware reads `Authorization: Bearer <key>` on every request and puts
the caller's tenant on it (`tenant_of`); a missing or wrong key is 401 problem+json with
`WWW-Authenticate: Bearer`. What a route accepts instead of the header is declared beside its
handler with `@access`:

- "key" (the default): the header only;
- "stream": the header, or `?token=` from POST /tokens (EventSource cannot send headers); a
  stream opened with a token ends when the token expires;
- "image": the header, or the `?exp=...&sig=...` that signed image URLs carry (an <img> cannot
  send headers either); the handler checks the signature;
- "public": nothing (the page's shell, the API documentation, health and metrics).

With auth off there is no middleware at all (it would cost every request two coroutine
layers), and `tenant_of` is None: every job is visible, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field

from ..auth import CREDENTIALS, Tenant
from ..logs import facts_of
from ..models import time_text
from .access import access_of
from .openapi import Reply, operation
from .problems import problem_response

TENANT = web.RequestKey("tenant", Tenant)
# The Unix time the stream token a request came with expires; absent without one.
TOKEN_EXPIRES = web.RequestKey("token_expires", float)
# Set when an image request came with a signature instead of a key: the handler must verify it.
SIGNED = web.RequestKey("signed", bool)

CHALLENGE = 'Bearer realm="imagegen"'


def tenant_of(request: web.Request) -> Tenant | None:
    """The caller's tenant; None with auth off (or on a public route, or a signed image URL)."""
    return request.get(TENANT)


def _unauthorized(detail: str, error: str | None = None) -> web.Response:
    # RFC 6750: a request with no credentials gets the bare challenge; a bad one says so.
    challenge = CHALLENGE if error is None else f'{CHALLENGE}, error="{error}"'
    return problem_response(401, "Unauthorized", detail, headers={"WWW-Authenticate": challenge})


def _bearer(header: str) -> str | None:
    scheme, _, key = header.strip().partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def _identified(request: web.Request, tenant: Tenant) -> None:
    request[TENANT] = tenant
    facts_of(request).tenant = tenant.name  # for the request's log line


@web.middleware
async def authenticate(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """With auth enabled: the tenant from the key (or, where the route allows, a token or a
    signature) before the handler runs; 401 without one. Nothing presented is logged or echoed."""
    if request.method == "OPTIONS":  # CORS preflights carry no credentials, by the Fetch standard
        return await handler(request)
    kind = access_of(request.match_info.handler)
    if kind == "public":
        return await handler(request)
    credentials = request.app[CREDENTIALS]
    header = request.headers.get("Authorization")
    if header is not None:
        key = _bearer(header)
        tenant = credentials.tenant_for_key(key) if key is not None else None
        if tenant is None:
            return _unauthorized("The API key in the Authorization header is not valid.", "invalid_token")
        _identified(request, tenant)
        return await handler(request)
    if kind == "stream" and "token" in request.query:
        found = credentials.token_tenant(request.query["token"])
        if found is None:
            return _unauthorized("The token is not valid or has expired: get a new one from POST /tokens.", "invalid_token")
        _identified(request, found[0])
        request[TOKEN_EXPIRES] = found[1]
        return await handler(request)
    if kind == "image" and "sig" in request.query:
        request[SIGNED] = True
        return await handler(request)
    return _unauthorized("This needs an API key: send Authorization: Bearer <key>.")


class TokenCreated(BaseModel):
    """Body of the 201 answer to POST /tokens."""

    token: str = Field(description="Pass as ?token= to the event streams (they cannot send headers).")
    expires_at: str = Field(alias="expiresAt", description="When the token stops opening streams; get a new "
                            "one before then (a stream opened with it ends then too, and resumes by id).")


@operation(
    "Get a short-lived token for the event streams",
    description="EventSource cannot send an Authorization header: open the streams with ?token= instead. "
    "The token opens only your own streams, and only until expiresAt ([auth] token_ttl_s).",
    tags=("auth",),
    replies={201: Reply(TokenCreated, "A new token.")},
)
async def create_token(request: web.Request) -> web.Response:
    """POST /tokens: a signed token for the caller's tenant, for ?token= on the streams."""
    tenant = request[TENANT]  # the middleware let only a valid key through ("key" access)
    token, expires = request.app[CREDENTIALS].issue_token(tenant)
    expires_at = time_text(int(expires * 1000))
    return web.json_response({"token": token, "expiresAt": expires_at}, status=201)
