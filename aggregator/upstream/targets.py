"""Where a webhook may be sent without `--allow-private-webhooks`: public addresses only (the
SSRF guard), checked where the connection is made.

An address is public when it is globally routable and not multicast. An IPv6 address that
stands for an IPv4 one is judged by that IPv4 address: IPv4-mapped (`::ffff:a.b.c.d`),
IPv4-compatible (`::a.b.c.d`), IPv4-translated (`::ffff:0:a.b.c.d`), NAT64 (`64:ff9b::/96`),
6to4 (`2002::/16`) and Teredo (`2001::/32`: its server and its client). The local-use NAT64
prefix (`64:ff9b:1::/48`) is never public.

`PublicTransport` resolves a host once, refuses it if any of its addresses is not public,
and connects to an address it checked (TLS still verifies, and SNI still names, the host):
resolving to check and again to connect would let DNS answer differently the second time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str, int], Awaitable[list[str]]]

_MAPPED_OR_TRANSLATED = (
    ipaddress.IPv6Network("::ffff:0:0/96"),
    ipaddress.IPv6Network("::ffff:0:0:0/96"),
)
_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_HINT = "private or loopback targets need the server's --allow-private-webhooks"


class TargetRefused(httpx.ConnectError):
    """Not sent: the target is not a public address (or does not resolve)."""


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses `ip` stands for (Teredo: its server and its client); none for a
    plain IPv6 address."""
    last = ipaddress.IPv4Address(ip.packed[12:])
    if any(ip in network for network in (*_MAPPED_OR_TRANSLATED, _COMPATIBLE, _NAT64)):
        return [last]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    return []


def is_public(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return False
        inner = embedded_ipv4(ip)
        if inner:
            return all(is_public(v4) for v4 in inner)
    return ip.is_global and not (
        ip.is_multicast
        or ip.is_private
        or ip.is_reserved
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_unspecified
    )


def refusal(host: str, addresses: Iterable[str]) -> str | None:
    """Why `host`, resolved to `addresses`, may not be a target; None: it may."""
    for address in addresses:
        ip = ipaddress.ip_address(address.partition("%")[0])  # without an IPv6 zone
        if not is_public(ip):
            return f"{host} resolves to {address}, which is not a public address ({_HINT})"
    return None


async def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, in the resolver's order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def private_refusal(url: str) -> str | None:
    """Why `url` may not be a webhook target without `--allow-private-webhooks`: it does not
    resolve, or resolves to an address that is not public. None: it may (as of now: the
    sender checks again as it connects)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        return refusal(host, await resolve(host, port))
    except OSError as exc:
        return f"{host} does not resolve: {exc}"


class _PublicOnly(httpcore.AsyncNetworkBackend):
    def __init__(self, resolver: Resolve, network: httpcore.AsyncNetworkBackend) -> None:
        self._resolve = resolver
        self._network = network

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                addresses = await self._resolve(host, port)
        except OSError as exc:
            raise TargetRefused(f"{host} does not resolve: {exc}") from None
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"{host} did not resolve in time") from None
        refused = refusal(host, addresses) if addresses else f"{host} resolves to no address"
        if refused is not None:
            raise TargetRefused(refused)
        failed: Exception | None = None
        for address in addresses:  # the addresses checked, and no others
            try:
                return await self._network.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failed = exc
        assert failed is not None
        raise failed

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise TargetRefused("a Unix socket is not a public address")

    async def sleep(self, seconds: float) -> None:
        await self._network.sleep(seconds)


class PublicTransport(httpx.AsyncHTTPTransport):
    """httpx's transport, connecting to public addresses only (resolved once, by `resolver`;
    `network` makes the connections: tests pass a fake of either)."""

    def __init__(
        self,
        *,
        resolver: Resolve = resolve,
        network: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        tls = httpx.create_ssl_context()  # one for both pools: each costs ~25 ms of CPU
        super().__init__(verify=tls)
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)  # httpx's
        # httpx's own pool, as its constructor builds it, with the guarded network backend
        # (httpx takes none of its own).
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=tls,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_PublicOnly(resolver, network or httpcore.AnyIOBackend()),
        )
