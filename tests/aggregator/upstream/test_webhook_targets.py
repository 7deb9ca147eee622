"""The webhook SSRF guard (`aggregator.upstream.targets`): an IPv6 address standing for an IPv4
one is judged by that IPv4 address, in every family that embeds one; multicast is refused; and
the sender's transport resolves once and connects only to an address it checked (no window for
DNS to answer differently)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from typing import Any

import httpcore
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.upstream.targets import PublicTransport, TargetRefused, is_public
from aggregator.upstream.webhook_sender import private_refusal

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
IPV4 = st.one_of(
    st.ip_addresses(v=4),
    st.sampled_from(
        [V4(a) for a in ("127.0.0.1", "10.1.2.3", "169.254.169.254", "224.0.0.1", "8.8.8.8")]
    ),
)


def _v6(prefix: str, v4: V4, at: int = 12) -> V6:
    """`prefix` with `v4`'s four bytes written at byte `at`."""
    packed = bytearray(V6(prefix).packed)
    packed[at : at + 4] = v4.packed
    return V6(bytes(packed))


def _teredo(server: V4, client: V4) -> V6:
    obfuscated = bytes(b ^ 0xFF for b in client.packed)
    return V6(b"\x20\x01\x00\x00" + server.packed + b"\x00\x00\x00\x00" + obfuscated)


FAMILIES: dict[str, Callable[[V4], V6]] = {
    "mapped": lambda v4: _v6("::ffff:0:0", v4),
    "compatible": lambda v4: _v6("::", v4),
    "translated": lambda v4: _v6("::ffff:0:0:0", v4),
    "nat64": lambda v4: _v6("64:ff9b::", v4),
    "6to4": lambda v4: _v6("2002::", v4, at=2),
    "teredo client": lambda v4: _teredo(V4("8.8.4.4"), v4),
    "teredo server": lambda v4: _teredo(v4, V4("8.8.4.4")),
}


@given(v4=IPV4, family=st.sampled_from(sorted(FAMILIES)))
def test_an_embedded_ipv4_address_decides(v4: V4, family: str) -> None:
    assert is_public(FAMILIES[family](v4)) == is_public(v4), (family, v4)


@given(v4=IPV4)
def test_local_use_nat64_is_never_public(v4: V4) -> None:
    assert not is_public(_v6("64:ff9b:1::", v4))


@given(
    ip=st.one_of(
        st.ip_addresses(v=4, network="224.0.0.0/4"), st.ip_addresses(v=6, network="ff00::/8")
    )
)
def test_multicast_is_never_public(ip: V4 | V6) -> None:
    assert not is_public(ip)


def test_public_addresses_stay_public() -> None:
    for address in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "64:ff9b::808:808"):
        assert is_public(ipaddress.ip_address(address)), address


@pytest.mark.parametrize(
    "url",
    [
        "http://[::127.0.0.1]/hook",
        "http://[64:ff9b::7f00:1]/hook",
        "http://[2002:7f00:1::]/hook",
        "http://224.0.0.1/hook",
        "http://[::ffff:169.254.169.254]/hook",
    ],
)
def test_the_reported_bypasses_are_refused(url: str) -> None:
    assert asyncio.run(private_refusal(url)) is not None


class Network(httpcore.AsyncNetworkBackend):
    """Connections as a real network would make them, to a receiver answering 204: which
    hosts were connected to."""

    def __init__(self) -> None:
        self.connected: list[str] = []

    async def connect_tcp(self, host: str, port: int, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        self.connected.append(host)
        return httpcore.AsyncMockStream([b"HTTP/1.1 204 No Content\r\n\r\n"])

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def _post(answers: list[list[str]]) -> tuple[httpx.Response | Exception, Network, int]:
    """POST through the guarded transport to a name whose DNS gives `answers` in turn."""
    network = Network()
    asked = 0

    async def resolver(host: str, port: int) -> list[str]:
        nonlocal asked
        asked += 1
        return answers[min(asked, len(answers)) - 1]

    async def run() -> httpx.Response | Exception:
        transport = PublicTransport(resolver=resolver, network=network)
        async with httpx.AsyncClient(transport=transport) as client:
            try:
                return await client.post("http://rebind.test/hook", content=b"{}")
            except TargetRefused as exc:
                return exc

    return asyncio.run(run()), network, asked


def test_the_transport_connects_to_the_address_it_checked() -> None:
    # DNS rebinding: public when asked first, loopback after. Asked once, so never loopback.
    answer, network, asked = _post([["93.184.216.34"], ["127.0.0.1"]])
    assert isinstance(answer, httpx.Response) and answer.status_code == 204
    assert (network.connected, asked) == (["93.184.216.34"], 1)


def test_the_transport_refuses_a_name_with_any_private_address() -> None:
    answer, network, _ = _post([["93.184.216.34", "::ffff:10.0.0.1"]])
    assert isinstance(answer, TargetRefused) and "10.0.0.1" in str(answer)
    assert network.connected == []
