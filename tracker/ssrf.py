"""SSRF guard for webhook URLs: refuse non-public addresses at registration and at connect time."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import TypeAlias

import httpcore
import httpx

IPAddress: TypeAlias = IPv4Address | IPv6Address
IPNetwork: TypeAlias = IPv4Network | IPv6Network
Resolver: TypeAlias = Callable[[str, int], Awaitable[list[str]]]
SocketOption: TypeAlias = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)

# httpx turns httpcore.ConnectError into httpx.ConnectError keeping only the message,
# so callers recognise a refused destination by this prefix (see is_blocked_error)
BLOCKED_PREFIX = "blocked: "
#: the highest TCP port: httpx parses any number as a port
MAX_PORT = 65535

# httpx's own default (httpx._config.DEFAULT_LIMITS), which httpx does not export
_DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)

_METADATA_V4 = IPv4Address("169.254.169.254")
_METADATA_V6 = IPv6Address("fd00:ec2::254")

# Named so the refusal says why; anything not listed but not global is caught by is_global.
_BLOCKED_V4: tuple[tuple[IPv4Network, str], ...] = tuple(
    (IPv4Network(cidr), why)
    for cidr, why in (
        ("0.0.0.0/8", "unspecified / 'this network'"),
        ("10.0.0.0/8", "private (RFC 1918)"),
        ("100.64.0.0/10", "shared address space (CGNAT, RFC 6598)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private (RFC 1918)"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation (TEST-NET-1)"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private (RFC 1918)"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation (TEST-NET-2)"),
        ("203.0.113.0/24", "documentation (TEST-NET-3)"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
    )
)
_BLOCKED_V6: tuple[tuple[IPv6Network, str], ...] = tuple(
    (IPv6Network(cidr), why)
    for cidr, why in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible (deprecated)"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard-only"),
        ("2001::/23", "IETF protocol assignments (Teredo, benchmarking, ORCHID)"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("5f00::/16", "segment routing (SRv6)"),
        ("fc00::/7", "unique local (ULA)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
        ("ff00::/8", "multicast"),
    )
)
_LEGACY_V4 = re.compile(r"[0-9a-fA-FxX.]+")
_GLOBAL_UNICAST_V6 = IPv6Network("2000::/3")
_NAT64_V6 = IPv6Network("64:ff9b::/96")


class UnsafeURL(ValueError):  # noqa: N818 - `except UnsafeURL` reads as what was refused
    """A webhook URL that must not be called; the message names the host and the reason."""

    def __init__(self, reason: str, *, host: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.host = host


def parse_allow(cidrs: Sequence[str]) -> tuple[IPNetwork, ...]:
    """Parse the operator's allow-list of CIDRs (e.g. ``127.0.0.0/8``), naming any bad entry."""
    networks: list[IPNetwork] = []
    for cidr in cidrs:
        try:
            networks.append(ip_network(cidr.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"invalid CIDR {cidr!r} in the SSRF allow-list: {exc}") from None
    return tuple(networks)


def _allowed(ip: IPAddress, allow: Sequence[IPNetwork]) -> bool:
    return any(ip.version == net.version and ip in net for net in allow)


def blocked_reason(ip: IPAddress, allow: Sequence[IPNetwork]) -> str | None:
    """Return why ``ip`` must not be contacted, or None when it is public or allow-listed."""
    if _allowed(ip, allow):
        return None
    if isinstance(ip, IPv6Address):
        return _blocked_v6_reason(ip, allow)
    for net, why in _BLOCKED_V4:
        if ip in net:
            if ip == _METADATA_V4:
                return f"{why}, in {net} (the cloud metadata endpoint)"
            return f"{why}, in {net}"
    if not ip.is_global or ip.is_multicast or ip.is_reserved:
        return "not globally routable"
    return None


def _embedded_v4(ip: IPv6Address) -> tuple[str, IPv4Address] | None:
    """Return the IPv4 address that an IPv4-mapped, NAT64 or 6to4 address carries."""
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    if ip in _NAT64_V6:
        return "NAT64", IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return "6to4", ip.sixtofour
    return None


def _blocked_v6_reason(ip: IPv6Address, allow: Sequence[IPNetwork]) -> str | None:
    embedded = _embedded_v4(ip)
    if embedded is not None:
        # judge by the IPv4 address the packet finally reaches
        form, v4 = embedded
        why = blocked_reason(v4, allow)
        return None if why is None else f"the {form} form of {v4}: {why}"
    for net, why in _BLOCKED_V6:
        if ip in net:
            if ip == _METADATA_V6:
                return f"{why}, in {net} (the cloud metadata endpoint)"
            return f"{why}, in {net}"
    if ip not in _GLOBAL_UNICAST_V6:
        return "not global unicast (outside 2000::/3)"
    if not ip.is_global or ip.is_multicast or ip.is_reserved:
        return "not globally routable"
    return None


async def default_resolver(host: str, port: int) -> list[str]:
    """Resolve ``host`` to its A and AAAA addresses through the event loop's getaddrinfo."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(sockaddr[0]) for *_, sockaddr in infos))


def _parse_ip(address: str) -> IPAddress | None:
    try:
        return ip_address(address)
    except ValueError:
        return None


def _host_literal(host: str) -> IPAddress | None:
    """Return the address an IP-literal host denotes, including legacy IPv4 spellings."""
    ip = _parse_ip(host.strip("[]"))
    if ip is not None or not _LEGACY_V4.fullmatch(host):
        return ip
    # getaddrinfo (inet_aton) reads 2130706433, 0x7f.1 and 127.1 as 127.0.0.1, and httpx passes
    # such hosts through unchanged, so judge them as the address they will dial
    try:
        return IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


async def _resolve(host: str, port: int, resolver: Resolver | None) -> list[str]:
    literal = _host_literal(host)
    if literal is not None:
        return [str(literal)]
    return await (resolver or default_resolver)(host, port)


def _judge(addresses: Iterable[str], allow: Sequence[IPNetwork]) -> list[tuple[str, str | None]]:
    """Pair each resolved address with its block reason (None when it may be contacted)."""
    judged: list[tuple[str, str | None]] = []
    for address in addresses:
        ip = _parse_ip(address)
        why = "not an IP address" if ip is None else blocked_reason(ip, allow)
        judged.append((address, why))
    return judged


def _refusal(host: str, address: str, why: str) -> str:
    if _host_literal(host) is None:
        return f"host {host!r} resolves to {address}, which is {why}"
    if host.strip("[]") == address:
        return f"host {host} is {why}"
    return f"host {host} (= {address}) is {why}"


async def check_url(
    url: str, allow: Sequence[IPNetwork], *, resolver: Resolver | None = None
) -> None:
    """Raise UnsafeURL unless ``url`` is http(s) and every address its host resolves to is public.

    Used when a webhook URL is registered; GuardedBackend repeats the check on the address
    actually connected to, so a later DNS change cannot slip through.
    """
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise UnsafeURL(f"not a valid URL: {exc}") from None
    # parse like httpx does, so the host judged here is the host the delivery will dial
    host = parsed.raw_host.decode("ascii")
    if parsed.scheme not in ("http", "https"):
        raise UnsafeURL(
            f"only http and https URLs are allowed, not {parsed.scheme!r} (host {host!r})",
            host=host,
        )
    if not host:
        raise UnsafeURL("the URL has no host")
    if parsed.port is not None and not 1 <= parsed.port <= MAX_PORT:
        # httpx reads any number there; no delivery could ever connect to it
        raise UnsafeURL(f"port {parsed.port} is not a TCP port (1 to {MAX_PORT})", host=host)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        addresses = await _resolve(host, port, resolver)
    except OSError as exc:
        raise UnsafeURL(f"host {host!r} does not resolve: {exc}", host=host) from None
    if not addresses:
        raise UnsafeURL(f"host {host!r} does not resolve", host=host)
    for address, why in _judge(addresses, allow):
        if why is not None:
            raise UnsafeURL(_refusal(host, address, why), host=host)


def is_blocked_error(exc: BaseException) -> bool:
    """Tell whether an httpx/httpcore error is GuardedBackend refusing the destination."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (httpcore.ConnectError, httpx.ConnectError)) and str(seen).startswith(
            BLOCKED_PREFIX
        ):
            return True
        seen = seen.__cause__
    return False


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """A network backend that resolves hosts itself and connects only to allowed addresses.

    The check runs on the address actually dialled, which defeats DNS rebinding between URL
    registration and delivery. TLS is unaffected: httpcore passes the URL's hostname to
    ``start_tls`` as ``server_hostname`` (httpcore/_async/connection.py, ``_connect``), so SNI
    and certificate checks still use the name while the socket goes to the vetted IP.
    """

    def __init__(
        self,
        allow: Sequence[IPNetwork],
        *,
        resolver: Resolver | None = None,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._allow = tuple(allow)
        self._resolver = resolver
        # AnyIOBackend is what httpcore's (private) AutoBackend picks under asyncio
        self._inner = inner if inner is not None else httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Connect to the first allowed address of ``host``; raise ConnectError if none is."""
        try:
            async with asyncio.timeout(timeout):
                addresses = await _resolve(host, port, self._resolver)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host!r} timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"host {host!r} does not resolve: {exc}") from exc
        if not addresses:
            raise httpcore.ConnectError(f"host {host!r} does not resolve")
        judged = _judge(addresses, self._allow)
        allowed = [address for address, why in judged if why is None]
        if not allowed:
            address, why = judged[0]
            raise httpcore.ConnectError(BLOCKED_PREFIX + _refusal(host, address, why or ""))

        # a refused or unreachable address falls through to the next; a timeout does not,
        # so one request never waits longer than a few connect timeouts
        last_error: httpcore.ConnectError | None = None
        for address in allowed:
            try:
                return await self._inner.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore.ConnectError as exc:
                last_error = exc
        assert last_error is not None
        raise last_error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Refuse: a webhook never goes to a local socket."""
        raise httpcore.ConnectError(BLOCKED_PREFIX + "unix sockets are not allowed for webhooks")

    async def sleep(self, seconds: float) -> None:
        """Sleep between httpcore's connect retries."""
        await self._inner.sleep(seconds)


def guarded_transport(
    allow: Sequence[IPNetwork],
    *,
    resolver: Resolver | None = None,
    verify: ssl.SSLContext | bool = True,
    trust_env: bool = True,
    http1: bool = True,
    http2: bool = False,
    limits: httpx.Limits | None = None,
    retries: int = 0,
    local_address: str | None = None,
    socket_options: Iterable[SocketOption] | None = None,
) -> httpx.AsyncHTTPTransport:
    """Return an httpx transport whose every connection goes through GuardedBackend.

    httpx has no public way to give AsyncHTTPTransport a network backend, so the transport is
    built normally (it keeps its request/response and exception mapping) and its private
    ``_pool`` is swapped for an identically configured AsyncConnectionPool that carries the
    backend. ``_pool`` has been the attribute's name since httpx 0.18; the isinstance check
    below fails loudly should that change. Proxies and unix sockets are not offered: both
    would make the pool dial something other than the webhook's host.
    """
    if limits is None:
        limits = _DEFAULT_LIMITS
    ssl_context = httpx.create_ssl_context(verify=verify, trust_env=trust_env)
    transport = httpx.AsyncHTTPTransport(
        verify=ssl_context,
        http1=http1,
        http2=http2,
        limits=limits,
        retries=retries,
        local_address=local_address,
        socket_options=socket_options,
    )
    if not isinstance(getattr(transport, "_pool", None), httpcore.AsyncConnectionPool):
        raise TypeError("httpx.AsyncHTTPTransport no longer keeps its pool in _pool")
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=ssl_context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        http1=http1,
        http2=http2,
        retries=retries,
        local_address=local_address,
        network_backend=GuardedBackend(allow, resolver=resolver),
        socket_options=socket_options,
    )
    return transport
