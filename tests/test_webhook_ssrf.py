"""The webhooks' SSRF guard. No test here sends a packet to a non-loopback address: every refused
class goes through the address check itself, and through a stub resolver whose answers the
service must refuse without connecting (the event loop's connect calls are watched); end to end,
loopback addresses outside the allow-list (127.0.0.2, ::1, ::ffff:127.0.0.2) show the refusal."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

import pytest

from imagegen.webhooks.addresses import blocked_reason, check_url
from imagegen.webhooks.deliver import RESOLVER

from .conftest import create_job
from .receiver import receiver
from .test_webhooks import secret, settled  # noqa: F401  (secret: a fixture)


@pytest.fixture
def backend() -> str:
    return "sqlite"  # the guard is the deliverer's, the same on both backends


REFUSED = [
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("172.31.255.255", "private"), ("192.168.1.1", "private"),
    ("fd12:3456::1", "private (unique local)"), ("fc00::1", "private (unique local)"),
    ("169.254.169.254", "link-local"), ("169.254.0.1", "link-local"), ("fe80::1", "link-local"),
    ("100.64.0.1", "shared (CGNAT)"), ("100.127.255.254", "shared (CGNAT)"),
    ("224.0.0.251", "multicast"), ("239.255.255.250", "multicast"), ("ff02::1", "multicast"), ("ff0e::1", "multicast"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("192.0.0.8", "reserved"),
    ("192.0.2.1", "documentation"), ("198.51.100.7", "documentation"), ("203.0.113.9", "documentation"),
    ("2001:db8::1", "documentation"), ("198.18.0.1", "benchmarking"), ("100::1", "reserved (discard)"),
    # IPv4 forms inside IPv6: mapped, compatible, 6to4, NAT64 (well-known and local-use).
    ("::ffff:127.0.0.1", "loopback, embedded"), ("::ffff:10.0.0.1", "private, embedded"),
    ("::ffff:169.254.169.254", "link-local, embedded"), ("::10.0.0.1", "private, embedded"),
    ("2002:a9fe:a9fe::1", "link-local, embedded"), ("2002:7f00:1::", "loopback, embedded"),
    ("64:ff9b::a9fe:a9fe", "link-local, embedded"), ("64:ff9b::10.0.0.1", "private, embedded"),
    ("64:ff9b:1::a00:1", "private, embedded"),
    # Prefixes that are not public themselves, whatever IPv4 address they carry.
    ("64:ff9b:1::808:808", "reserved (local-use NAT64)"), ("::ffff:0:808:808", "reserved (IPv4-translated)"),
    ("::ffff:0:7f00:1", "reserved (IPv4-translated)"),
]
ALLOWED = ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e",
           "::ffff:93.184.216.34", "2002:5db8:d822::1", "64:ff9b::808:808"]


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_every_refused_class_is_refused_by_the_address_check(address: str, reason: str) -> None:
    found = blocked_reason(ipaddress.ip_address(address))
    assert found is not None and found.startswith(reason), (address, found)


@pytest.mark.parametrize("address", ALLOWED)
def test_public_unicast_addresses_pass(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is None


def test_allow_networks_admit_exactly_what_they_name() -> None:
    allow = [ipaddress.ip_network("10.20.0.0/16"), ipaddress.ip_network("127.0.0.1/32")]
    assert blocked_reason(ipaddress.ip_address("10.20.3.4"), allow) is None
    assert blocked_reason(ipaddress.ip_address("127.0.0.1"), allow) is None
    assert blocked_reason(ipaddress.ip_address("10.21.0.1"), allow) == "private"
    assert blocked_reason(ipaddress.ip_address("127.0.0.2"), allow) == "loopback"
    # A mapped form of an admitted address is admitted; of another, not.
    assert blocked_reason(ipaddress.ip_address("::ffff:10.20.0.1"), allow) is None
    assert blocked_reason(ipaddress.ip_address("::ffff:127.0.0.2"), allow) == "loopback, embedded in ::ffff:7f00:2"


@pytest.mark.parametrize(
    "url",
    ["http://user@example.com/", "https://u:p@example.com/", "http://example.com:22/", "http://example.com:1023/",
     "gopher://example.com/", "http://example.com/#frag", "http:///nohost", "http://example.com:99999/"],
)
def test_urls_refused_at_submission(url: str) -> None:
    with pytest.raises(ValueError):
        check_url(url, [(80, 80), (443, 443), (1024, 65535)])


def test_allowed_urls_pass() -> None:
    for url in ["https://example.com/hook", "http://example.com:8080/a?b=c", "https://[2606:4700::1]/x"]:
        assert check_url(url, [(80, 80), (443, 443), (1024, 65535)]).hostname


class ConnectWatch:
    """Records every connection the event loop is asked to make, and refuses (never makes) those
    not to one of the `allowed` loopback (host, port) pairs (the test's own server, a receiver)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, allowed: set[tuple[str, int]], monkeypatch: pytest.MonkeyPatch) -> None:
        self.refused: list[Any] = []
        self.made: list[tuple[str, int]] = []
        self._allowed = allowed
        real_sock_connect, real_create_connection = loop.sock_connect, loop.create_connection

        async def sock_connect(sock: socket.socket, address: Any) -> None:
            self._check(address)
            return await real_sock_connect(sock, address)

        async def create_connection(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("sock") is None:  # with a socket given, sock_connect was checked already
                self._check((kwargs.get("host", args[1] if len(args) > 1 else None), kwargs.get("port")))
            return await real_create_connection(*args, **kwargs)

        monkeypatch.setattr(loop, "sock_connect", sock_connect)
        monkeypatch.setattr(loop, "create_connection", create_connection)

    def _check(self, address: Any) -> None:
        pair = (address[0], address[1])
        if pair in self._allowed:
            self.made.append(pair)
            return
        self.refused.append(address)
        raise OSError(f"the test refused a connection to {address}")


async def test_a_stub_resolvers_refused_answers_are_never_connected_to(
    secret: str, make_client: Any, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    answers = {
        "metadata.example": ["169.254.169.254"], "intranet.example": ["10.1.2.3"],
        "mixed.example": ["93.184.216.34", "192.168.1.1"],  # one bad address is enough
        "ula.example": ["fd00::1"], "mapped.example": ["::ffff:10.0.0.1"], "sixtofour.example": ["2002:a9fe:a9fe::1"],
        "nat64.example": ["64:ff9b::a9fe:a9fe"], "cgnat.example": ["100.64.0.1"], "docs.example": ["192.0.2.10"],
        "loop.example": ["127.0.0.1"],  # loopback, but not in this test's allow-list
    }
    lookups: list[str] = []

    async def stub(host: str, port: int) -> list[Any]:
        lookups.append(host)
        return [ipaddress.ip_address(a) for a in answers[host]]

    client = await make_client(configure=lambda app: app.__setitem__(RESOLVER, stub), webhooks={"retry_base_s": 0.1})
    watch = ConnectWatch(asyncio.get_running_loop(), {("127.0.0.1", client.port)}, monkeypatch)
    jobs = {host: await create_job(client, webhook=f"http://{host}:8080/hook") for host in answers}
    for host, job_id in jobs.items():
        (delivery,) = await settled(client, job_id)
        (attempt,) = delivery["attempts"]
        assert delivery["status"] == "failed" and attempt["error"] == "blocked_address", delivery
        assert host in attempt["detail"] and attempt["status"] is None
    assert watch.refused == []  # not one connection was tried
    assert sorted(lookups) == sorted(answers)  # one lookup per attempt, and no retry


async def test_the_connection_goes_to_the_address_that_was_checked(
    secret: str, make_client: Any, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    # A rebinding name: checked as 127.0.0.1 (admitted here), then it would answer 10.0.0.1. The
    # attempt connects to what was checked, without asking again.
    lookups: list[str] = []

    async def rebinding(host: str, port: int) -> list[Any]:
        lookups.append(host)
        return [ipaddress.ip_address("127.0.0.1" if len(lookups) == 1 else "10.0.0.1")]

    async with receiver() as hook:
        client = await make_client(configure=lambda app: app.__setitem__(RESOLVER, rebinding),
                                   webhooks={"allow_networks": ["127.0.0.1/32"]})
        port = int(hook.url.rsplit(":", 1)[1].split("/")[0])
        watch = ConnectWatch(asyncio.get_running_loop(), {("127.0.0.1", client.port), ("127.0.0.1", port)}, monkeypatch)
        job_id = await create_job(client, webhook=f"http://rebind.example:{port}/hook")
        (delivery,) = await settled(client, job_id)
        assert delivery["status"] == "delivered"
        (received,) = hook.received
        assert received.headers["Host"] == f"rebind.example:{port}"
        assert lookups == ["rebind.example"] and watch.refused == []
        assert ("127.0.0.1", port) in watch.made


async def test_loopback_addresses_outside_the_allow_list_are_refused_end_to_end(
    secret: str, make_client: Any  # noqa: F811
) -> None:
    async with receiver("127.0.0.2") as second:
        targets = [second.url, second.url.replace("127.0.0.2", "[::ffff:127.0.0.2]")]
        try:
            async with receiver("::1") as v6:
                targets.append(v6.url)
                await _refused(make_client, targets, [second, v6])
        except OSError:  # no IPv6 loopback on this machine: the IPv4 forms still show it
            await _refused(make_client, targets, [second])


async def _refused(make_client: Any, targets: list[str], receivers: list[Any]) -> None:
    client = await make_client(webhooks={"allow_networks": ["127.0.0.1/32"]})
    jobs = [await create_job(client, webhook=url) for url in targets]
    for job_id in jobs:
        (delivery,) = await settled(client, job_id)
        assert delivery["status"] == "failed" and delivery["attempts"][0]["error"] == "blocked_address"
    await asyncio.sleep(0.2)
    assert all(not r.received for r in receivers)
