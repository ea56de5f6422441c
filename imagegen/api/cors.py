"""Cross-origin access ([server] cors_origins): the browser pages of the listed origins may call
every route, with aiohttp-cors answering their preflights and adding the headers.

aiohttp-cors gives each resource an OPTIONS route that answers preflights before any of this
app's handlers (a middleware that lets OPTIONS through, such as an authentication check, does
not stand in its way), and adds Access-Control-Allow-Origin as each response is prepared. So
streams, whose headers go out before their handler returns, and every error answer carry it,
whichever handler or middleware made them. Two gaps are filled here: the catch-all route
(method *, which aiohttp-cors refuses) gets the headers on its 404 and 405 answers too, and
every response says `Vary: Origin` (aiohttp-cors issue #351).
"""

from __future__ import annotations

from typing import Any

import aiohttp_cors
from aiohttp import hdrs, web
from aiohttp_cors.urldispatcher_router_adapter import ResourcesUrlDispatcherRouterAdapter

from .problems import problem_errors

# The request headers a page may send beyond the ones browsers allow by themselves.
# Last-Event-ID: sent by fetch-based event-stream clients (EventSource sends it without asking).
ALLOW_HEADERS = ("Content-Type", "Authorization", "Idempotency-Key", "Prefer", "Last-Event-ID")
# The response headers a page may read beyond the ones browsers show by themselves.
EXPOSE_HEADERS = (
    "Location", "Retry-After", "Idempotent-Replayed", "Preference-Applied", "X-Request-ID", "WWW-Authenticate",
)
# How long a browser may reuse a preflight's answer, in seconds (Chromium keeps it at most 2 h).
# An origin taken off the list loses access at once anyway: its answers lose their header.
MAX_AGE_S = 3600


class _RouterAdapter(ResourcesUrlDispatcherRouterAdapter):
    """aiohttp-cors's own adapter, except that a resource with a catch-all route gets no
    preflight route (it could never be reached), and that a refused preflight is answered as
    problem+json like every other error."""

    def add_preflight_handler(self, routing_entity: Any, handler: Any) -> None:
        resource = routing_entity
        if isinstance(routing_entity, web.ResourceRoute):
            resource = routing_entity.resource
        if resource in self._resources_with_preflight_handlers:
            return
        if any(route.method == hdrs.METH_ANY for route in resource):
            return  # the fallback route: a preflight there is its 404 or 405, which a browser refuses
        super().add_preflight_handler(resource, problem_errors(handler))


async def _vary_on_origin(request: web.Request, response: web.StreamResponse) -> None:
    # Whether an answer carries Access-Control-Allow-Origin, and which, depends on the request's
    # Origin: a shared cache must not hand one origin's answer (or a no-Origin one) to another.
    vary = response.headers.get(hdrs.VARY)
    if vary is None:
        response.headers[hdrs.VARY] = "Origin"
    elif "origin" not in (part.strip().lower() for part in vary.split(",")):
        response.headers[hdrs.VARY] = f"{vary}, Origin"


def add_cors(app: web.Application, origins: tuple[str, ...]) -> None:
    """Open every route of `app` to pages of `origins`; call it once every route is added."""
    options = aiohttp_cors.ResourceOptions(
        allow_headers=ALLOW_HEADERS, expose_headers=EXPOSE_HEADERS, max_age=MAX_AGE_S
    )
    defaults = {origin: options for origin in origins}
    adapter = _RouterAdapter(app.router, defaults)
    cors = aiohttp_cors.CorsConfig(app, defaults=defaults, router_adapter=adapter)
    # Route by route: a preflight is granted only for a method the path really has.
    for route in list(app.router.routes()):
        cors.add(route)
    app.on_response_prepare.append(_vary_on_origin)
