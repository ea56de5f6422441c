"""Behind a reverse proxy ([server] trusted_proxies): what a trusted proxy says about a request
(Forwarded, RFC 7239, or X-Forwarded-For / -Proto / -Host) becomes that request's scheme, host
and client address; from any other address those headers are ignored.

Written here rather than taken from aiohttp-remotes 1.4.0, whose code and behaviour were read
and tried: its ForwardedStrict and XForwardedStrict answer 400 to every request from an address
that is not a listed proxy and to one without their header (so direct clients and health checks
are refused, not ignored), each refuses the other's header style, and its XForwardedFiltered
believes X-Forwarded-Host and -Proto from any client at all. aiohttp itself parses Forwarded
(`request.forwarded`) and changes a request's facts (`request.clone`); the rest is below.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import hdrs, web

from ..logs import facts_of

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# A host as base_url may put in a URL: a name or an address, and a port. Anything else (a path,
# a space, user info) is not believed, even from a trusted proxy.
_HOST = re.compile(
    r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::(?P<port>[0-9]{1,5}))?"
)
_SCHEMES = ("http", "https")


def parse_address(text: str | None) -> Address | None:
    """The address in a peer's name, a Forwarded `for=` or an X-Forwarded-For entry ("192.0.2.1",
    "192.0.2.1:4711", "[2001:db8::1]:4711", "2001:db8::1"); None for "unknown", "_hidden" and
    the like. An IPv4 address mapped into IPv6 (a dual-stack socket's peer) is the IPv4 one."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def _trusted(address: Address | None, trusted: Iterable[Network]) -> bool:
    return address is not None and any(address in network for network in trusted)


def _values(request: web.Request, name: str) -> list[str]:
    # A list header may come as several lines: they are one list, in order (RFC 9110).
    return [part.strip() for value in request.headers.getall(name, []) for part in value.split(",")]


def _hops(request: web.Request) -> list[dict[str, str]]:
    """One entry per proxy the request passed, the nearest last: who it came from (`for`), and
    the scheme and host that proxy was asked for."""
    if hdrs.FORWARDED in request.headers:  # RFC 7239 wins: X-Forwarded-* are then not read
        return [{key: value for key, value in element.items() if value} for element in request.forwarded]
    senders = _values(request, hdrs.X_FORWARDED_FOR)
    protos = _values(request, hdrs.X_FORWARDED_PROTO)
    hosts = _values(request, hdrs.X_FORWARDED_HOST)
    hops = []
    # -Proto or -Host without -For is one hop: the peer's own, from no one it names.
    for back in range(len(senders) or int(bool(protos or hosts))):
        hop = {"for": senders[-1 - back]} if senders else {}
        # Lists line up from the right. Many proxies set -Proto and -Host once, the outermost
        # one's view, while each appends to -For: a hop past their end takes their first value.
        for key, values in (("proto", protos), ("host", hosts)):
            if values:
                hop[key] = values[-1 - back] if back < len(values) else values[0]
        hops.append(hop)
    hops.reverse()
    return hops


def _host(text: str) -> str | None:
    found = _HOST.fullmatch(text)
    if found is None or (found["port"] is not None and int(found["port"]) > 65535):
        return None
    return text


def forwarded_facts(request: web.Request, trusted: tuple[Network, ...]) -> dict[str, Any]:
    """What to change in `request` (scheme, host, remote) as its trusted proxies tell it; empty
    when its peer is not one of them."""
    if not _trusted(parse_address(request.remote), trusted):
        return {}
    chosen: dict[str, str] = {}
    # From the nearest proxy outwards, past every hop that came from another trusted proxy: the
    # first hop from anyone else was written by the outermost trusted proxy, and only it knows
    # what the client asked for. What lies to its left the client may have written itself.
    for hop in reversed(_hops(request)):
        chosen = hop
        if not _trusted(parse_address(hop.get("for")), trusted):
            break
    facts: dict[str, Any] = {}
    if (proto := chosen.get("proto", "").lower()) in _SCHEMES:
        facts["scheme"] = proto
    if (host := _host(chosen.get("host", ""))) is not None:
        facts["host"] = host
    if (address := parse_address(chosen.get("for"))) is not None:
        facts["remote"] = str(address)
    return facts


def forwarded_middleware(trusted: tuple[Network, ...]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """A middleware that gives each request from `trusted` the facts its proxies forward. Only
    installed when there are trusted proxies: any middleware costs every request (api/problems.py)."""

    @web.middleware
    async def believe_trusted_proxies(request: web.Request, handler: Handler) -> web.StreamResponse:
        facts = forwarded_facts(request, trusted)
        if not facts:
            return await handler(request)
        # Before the clone, so that the clone shares the original's log facts: the access log
        # is handed the original request, the handler (and the auth middleware) the clone.
        facts_of(request)
        return await handler(request.clone(**facts))

    return believe_trusted_proxies
