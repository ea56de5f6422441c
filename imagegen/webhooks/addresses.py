"""Where a webhook may go: the URL check at submission and the address check before each attempt.

The address check is the SSRF guard. A receiver's host is resolved once per attempt; if any of its
addresses is not a public unicast one (loopback, private, link-local with the cloud metadata
address, CGNAT, multicast, unspecified, reserved, documentation, benchmarking...), or embeds such
an IPv4 address (IPv4-mapped, IPv4-compatible, 6to4, NAT64), the attempt is refused as
`blocked_address`. The connection then goes to exactly the addresses that were checked
(deliver.py pins them), so a DNS answer that changes between check and connect cannot steer it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_LENGTH = 2048

# IPv6 prefixes that carry an IPv4 address in their low 32 bits (besides IPv4-mapped ::ffff:0:0/96,
# which ipaddress unwraps itself): IPv4-compatible ::/96 (deprecated), NAT64's well-known and
# local-use prefixes. 6to4 (2002::/16) carries it in bits 16-48 instead.
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_COMPATIBLE = ipaddress.ip_network("::/96")

# Named for the refusal's message; checked in this order.
_BLOCKED_IPV4 = [
    ("unspecified", ipaddress.ip_network("0.0.0.0/8")),
    ("loopback", ipaddress.ip_network("127.0.0.0/8")),
    ("private", ipaddress.ip_network("10.0.0.0/8")),
    ("shared (CGNAT)", ipaddress.ip_network("100.64.0.0/10")),
    ("link-local", ipaddress.ip_network("169.254.0.0/16")),
    ("private", ipaddress.ip_network("172.16.0.0/12")),
    ("reserved", ipaddress.ip_network("192.0.0.0/24")),
    ("documentation", ipaddress.ip_network("192.0.2.0/24")),
    ("reserved (6to4 relay)", ipaddress.ip_network("192.88.99.0/24")),
    ("private", ipaddress.ip_network("192.168.0.0/16")),
    ("benchmarking", ipaddress.ip_network("198.18.0.0/15")),
    ("documentation", ipaddress.ip_network("198.51.100.0/24")),
    ("documentation", ipaddress.ip_network("203.0.113.0/24")),
    ("multicast", ipaddress.ip_network("224.0.0.0/4")),
    ("reserved", ipaddress.ip_network("240.0.0.0/4")),  # 255.255.255.255 (broadcast) included
]
_BLOCKED_IPV6 = [
    ("unspecified", ipaddress.ip_network("::/128")),
    ("loopback", ipaddress.ip_network("::1/128")),
    ("reserved (IPv4-translated)", ipaddress.ip_network("::ffff:0:0:0/96")),
    ("reserved (local-use NAT64)", ipaddress.ip_network("64:ff9b:1::/48")),
    ("reserved (discard)", ipaddress.ip_network("100::/64")),
    ("reserved (IETF protocols)", ipaddress.ip_network("2001::/23")),
    ("documentation", ipaddress.ip_network("2001:db8::/32")),
    ("documentation", ipaddress.ip_network("3fff::/20")),
    ("private (unique local)", ipaddress.ip_network("fc00::/7")),
    ("link-local", ipaddress.ip_network("fe80::/10")),
    ("reserved (site-local)", ipaddress.ip_network("fec0::/10")),
    ("multicast", ipaddress.ip_network("ff00::/8")),
]


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for, if it is of a form that carries one."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in prefix for prefix in _NAT64) or (address in _COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def blocked_reason(address: IPAddress, allow: Sequence[Network] = ()) -> str | None:
    """Why a webhook may not connect to `address` ("private", "loopback"...), or None if it may.

    An address inside one of `allow` ([webhooks] allow_networks) may, whatever its class.
    """
    if any(address.version == network.version and address in network for network in allow):
        return None
    inner = None
    if isinstance(address, ipaddress.IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None and (reason := blocked_reason(inner, allow)) is not None:
            return f"{reason}, embedded in {address}"
        table: list[tuple[str, Network]] = _BLOCKED_IPV6  # type: ignore[assignment]
    else:
        table = _BLOCKED_IPV4  # type: ignore[assignment]
    for reason, network in table:  # the outer address too: a prefix that is itself not public
        if address in network:
            return reason
    if inner is not None:
        return None  # a public IPv4 address, in an IPv6 form that carries it
    # Whatever else IANA does not list as globally reachable (new special-purpose blocks).
    return None if address.is_global else "not globally reachable"


def check_url(url: str, allowed_ports: Sequence[tuple[int, int]]) -> SplitResult:
    """The URL split, if a webhook may name it; ValueError saying why not (for a 422)."""
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials (user:password@)")
    if parts.fragment:
        raise ValueError("must not have a #fragment")
    if any(ord(char) < 33 or ord(char) > 126 for char in url):
        raise ValueError("must be ASCII without spaces or control characters (percent-encode the rest)")
    port = port if port is not None else (443 if parts.scheme == "https" else 80)
    if not any(low <= port <= high for low, high in allowed_ports):
        raise ValueError(f"names port {port}, which webhooks may not use")
    return parts
