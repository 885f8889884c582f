"""Tests for the SSRF guard: address judgement, URL checks and guarded real connections."""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any

import httpcore
import httpx
import pytest

from tracker.ssrf import (
    GuardedBackend,
    UnsafeURL,
    blocked_reason,
    check_url,
    guarded_transport,
    is_blocked_error,
    parse_allow,
)

LOOPBACK = parse_allow(["127.0.0.0/8"])


@dataclass
class LoopbackServer:
    port: int
    hosts: list[str] = field(default_factory=list)  # Host header of every request served


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    """A tiny HTTP server on 127.0.0.1 that answers 200 and records Host headers."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Host", ""))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield LoopbackServer(port=httpd.server_address[1], hosts=seen)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


class FakeResolver:
    """A resolver that hands out prepared answers in order and counts its calls."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("100.64.0.1", "CGNAT"),
        ("100.127.255.255", "CGNAT"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.10", "documentation"),
        ("198.51.100.10", "documentation"),
        ("203.0.113.10", "documentation"),
        ("198.18.0.1", "benchmarking"),
        ("192.0.0.8", "IETF"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "unique local"),
        ("fd12:3456::1", "unique local"),
        ("fd00:ec2::254", "cloud metadata"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "documentation"),
        ("2001::1", "Teredo"),
        ("100::1", "discard"),
        ("::ffff:127.0.0.1", "IPv4-mapped form of 127.0.0.1: loopback"),
        ("::ffff:169.254.169.254", "cloud metadata"),
        ("::ffff:10.0.0.1", "private"),
        ("::127.0.0.1", "IPv4-compatible"),
        ("64:ff9b::7f00:1", "NAT64 form of 127.0.0.1"),
        ("64:ff9b::a9fe:a9fe", "NAT64 form of 169.254.169.254"),
        ("64:ff9b:1::1", "local-use NAT64"),
        ("2002:7f00:1::1", "6to4 form of 127.0.0.1"),
        ("2002:a00:1::1", "6to4 form of 10.0.0.1"),
        ("4000::1", "outside 2000::/3"),
    ],
)
def test_non_public_addresses_are_blocked(address: str, fragment: str) -> None:
    """Every non-global address is refused with a reason naming what it is."""
    reason = blocked_reason(ip_address(address), ())
    assert reason is not None
    assert fragment in reason


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.215.14",
        "2606:4700::1111",
        "2001:4860:4860::8888",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
    ],
)
def test_public_addresses_are_allowed(address: str) -> None:
    """Public v4/v6 addresses (and v6 forms embedding a public v4) are judged safe."""
    assert blocked_reason(ip_address(address), ()) is None


@pytest.mark.parametrize(
    ("address", "allow", "allowed"),
    [
        ("127.0.0.1", ["127.0.0.0/8"], True),
        ("::ffff:127.0.0.1", ["127.0.0.0/8"], True),
        ("::1", ["127.0.0.0/8"], False),
        ("::1", ["::1/128"], True),
        ("10.0.0.7", ["10.0.0.0/24"], True),
        ("10.0.1.7", ["10.0.0.0/24"], False),
        ("169.254.169.254", ["10.0.0.0/8"], False),
        ("fd00::5", ["fd00::/8"], True),
    ],
)
def test_allow_list_opts_in(address: str, allow: list[str], allowed: bool) -> None:
    """An address inside an allow-listed network is allowed; nothing else is."""
    reason = blocked_reason(ip_address(address), parse_allow(allow))
    assert (reason is None) is allowed


def test_parse_allow_accepts_v4_v6_and_host_bits() -> None:
    """parse_allow returns networks, tolerating host bits and whitespace."""
    assert parse_allow([" 127.0.0.1/8", "::1"]) == (
        IPv4Network("127.0.0.0/8"),
        IPv6Network("::1/128"),
    )


def test_parse_allow_names_the_bad_entry() -> None:
    """A malformed CIDR raises ValueError that quotes it."""
    with pytest.raises(ValueError, match=re.escape("'10.0.0.0/33'")):
        parse_allow(["127.0.0.0/8", "10.0.0.0/33"])


@pytest.mark.parametrize(
    "url", ["ftp://example.com/", "file:///etc/passwd", "gopher://example.com/", "ws://x.test/"]
)
async def test_check_url_accepts_only_http_and_https(url: str) -> None:
    """Schemes other than http and https are refused before any resolution."""
    resolver = FakeResolver(["8.8.8.8"])
    with pytest.raises(UnsafeURL, match="only http and https"):
        await check_url(url, (), resolver=resolver)
    assert resolver.calls == []


async def test_check_url_needs_a_host() -> None:
    """A URL without a host is refused."""
    with pytest.raises(UnsafeURL, match="no host"):
        await check_url("http:///path", (), resolver=FakeResolver(["8.8.8.8"]))


@pytest.mark.parametrize("port", ["0", "65536", "99999"])
async def test_check_url_refuses_a_port_no_connection_can_use(port: str) -> None:
    """Port 0 and ports over 65535 parse (httpx takes any number) but can never be dialled:
    refused at registration, before any resolution, not stored to fail every attempt."""
    resolver = FakeResolver(["93.184.215.14"])
    with pytest.raises(UnsafeURL, match=f"port {port} is not a TCP port"):
        await check_url(f"https://hooks.example.com:{port}/in", (), resolver=resolver)
    assert resolver.calls == []
    await check_url("https://hooks.example.com:65535/in", (), resolver=resolver)


async def test_check_url_passes_a_public_host() -> None:
    """A host that resolves only to public addresses passes, resolved with the right port."""
    resolver = FakeResolver(["93.184.215.14", "2606:4700::1111"])
    await check_url("https://hooks.example.com/in", (), resolver=resolver)
    assert resolver.calls == [("hooks.example.com", 443)]


async def test_check_url_refuses_a_host_resolving_to_a_private_address() -> None:
    """If any resolved address is private the URL is refused, naming the host and address."""
    resolver = FakeResolver(["93.184.215.14", "10.0.0.5"])
    with pytest.raises(
        UnsafeURL, match=r"'internal\.example\.com' resolves to 10\.0\.0\.5"
    ) as info:
        await check_url("http://internal.example.com:8080/x", (), resolver=resolver)
    assert info.value.host == "internal.example.com"
    assert "private" in str(info.value)
    assert resolver.calls == [("internal.example.com", 8080)]


async def test_check_url_refuses_what_does_not_resolve() -> None:
    """No addresses, or a resolver error, means the URL is refused as unresolvable."""

    async def failing(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    with pytest.raises(UnsafeURL, match="does not resolve"):
        await check_url("http://nowhere.test/", (), resolver=FakeResolver([]))
    with pytest.raises(UnsafeURL, match="does not resolve"):
        await check_url("http://nowhere.test/", (), resolver=failing)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://127.0.0.1:9/", "127.0.0.1 is loopback"),
        ("http://[::1]:9/", "::1 is loopback"),
        ("http://[::ffff:169.254.169.254]/", "cloud metadata"),
        ("http://2130706433/", "2130706433 (= 127.0.0.1) is loopback"),
        ("http://0x7f.1/", "(= 127.0.0.1) is loopback"),
        ("http://0177.0.0.1/", "not a valid URL"),  # httpx itself refuses octal quads
        ("http://127.1/", "(= 127.0.0.1) is loopback"),
        ("http://0xa9fea9fe/", "cloud metadata"),
    ],
)
async def test_check_url_judges_ip_literals_without_resolving(url: str, fragment: str) -> None:
    """IP-literal hosts, in any spelling httpx accepts, are judged directly, not resolved."""
    resolver = FakeResolver(["8.8.8.8"])
    with pytest.raises(UnsafeURL, match=re.escape(fragment)):
        await check_url(url, (), resolver=resolver)
    assert resolver.calls == []


async def test_check_url_honours_the_allow_list() -> None:
    """A loopback URL passes once 127.0.0.0/8 is allow-listed."""
    await check_url("http://127.0.0.1:8080/", LOOPBACK)


async def _get(url: str, transport: httpx.AsyncHTTPTransport) -> httpx.Response:
    async with httpx.AsyncClient(transport=transport, timeout=5) as client:
        return await client.get(url)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433", "[::ffff:127.0.0.1]"])
async def test_guarded_transport_refuses_loopback(server: LoopbackServer, host: str) -> None:
    """Without an allow-list a real request to the loopback server is refused at connect time."""
    with pytest.raises(httpx.ConnectError) as info:
        await _get(f"http://{host}:{server.port}/", guarded_transport(()))
    assert str(info.value).startswith("blocked: ")
    assert is_blocked_error(info.value)
    assert server.hosts == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_guarded_transport_allows_opted_in_loopback(
    server: LoopbackServer, host: str
) -> None:
    """With 127.0.0.0/8 allow-listed the same request reaches the loopback server."""
    response = await _get(f"http://{host}:{server.port}/hook", guarded_transport(LOOPBACK))
    assert response.status_code == 200
    assert response.text == "ok"
    assert server.hosts == [f"{host}:{server.port}"]


async def test_dns_rebinding_is_refused_at_connect_time(server: LoopbackServer) -> None:
    """A host that is public at registration but loopback at delivery is refused on connect."""
    url = f"http://rebind.example.com:{server.port}/"
    resolver = FakeResolver(["93.184.215.14"], ["127.0.0.1"])
    await check_url(url, (), resolver=resolver)
    with pytest.raises(
        httpx.ConnectError, match=re.escape("resolves to 127.0.0.1, which is loopback")
    ):
        await _get(url, guarded_transport((), resolver=resolver))
    assert len(resolver.calls) == 2
    assert server.hosts == []


async def test_connects_by_ip_and_keeps_the_host_header(server: LoopbackServer) -> None:
    """The socket goes to the vetted address while the request still names the URL's host."""
    resolver = FakeResolver(["10.0.0.1", "127.0.0.2", "127.0.0.1"])
    url = f"http://hooks.example.com:{server.port}/"
    response = await _get(url, guarded_transport(LOOPBACK, resolver=resolver))
    # 10.0.0.1 is dropped unseen, nothing listens on 127.0.0.2, so 127.0.0.1 answers
    assert response.status_code == 200
    assert server.hosts == [f"hooks.example.com:{server.port}"]


async def test_tls_still_uses_the_hostname_for_sni() -> None:
    """httpcore hands the URL's hostname, not the dialled IP, to start_tls for SNI/cert checks."""
    dialled: list[str] = []
    server_hostnames: list[str | None] = []

    class RecordingStream(httpcore.AsyncNetworkStream):
        async def start_tls(
            self,
            ssl_context: ssl.SSLContext,
            server_hostname: str | None = None,
            timeout: float | None = None,  # noqa: ASYNC109
        ) -> httpcore.AsyncNetworkStream:
            server_hostnames.append(server_hostname)
            raise httpcore.ConnectError("stop before any TLS")

        async def aclose(self) -> None:
            pass

    class RecordingBackend(httpcore.AsyncNetworkBackend):
        async def connect_tcp(
            self, host: str, port: int, *args: Any, **kwargs: Any
        ) -> httpcore.AsyncNetworkStream:
            dialled.append(f"{host}:{port}")
            return RecordingStream()

    backend = GuardedBackend(
        LOOPBACK, resolver=FakeResolver(["127.0.0.1"]), inner=RecordingBackend()
    )
    async with httpcore.AsyncConnectionPool(network_backend=backend) as pool:
        with pytest.raises(httpcore.ConnectError, match="stop before any TLS"):
            await pool.request("GET", "https://hooks.example.com/in")
    assert dialled == ["127.0.0.1:443"]
    assert server_hostnames == ["hooks.example.com"]


async def test_unix_sockets_are_refused() -> None:
    """The guarded backend never connects to a unix socket."""
    with pytest.raises(httpcore.ConnectError, match=r"^blocked: unix sockets"):
        await GuardedBackend(()).connect_unix_socket("/run/docker.sock")


async def test_slow_resolution_counts_against_the_connect_timeout() -> None:
    """A resolver slower than the connect timeout yields ConnectTimeout, not a hang."""

    async def slow(host: str, port: int) -> list[str]:
        await asyncio.sleep(1)
        return ["8.8.8.8"]

    with pytest.raises(httpcore.ConnectTimeout):
        await GuardedBackend((), resolver=slow).connect_tcp("slow.test", 80, timeout=0.05)


async def test_resolution_failure_is_an_ordinary_connect_error() -> None:
    """A name that does not resolve at delivery is a retryable ConnectError, not a block."""
    with pytest.raises(httpcore.ConnectError, match="does not resolve") as info:
        await GuardedBackend((), resolver=FakeResolver([])).connect_tcp("gone.test", 80)
    assert not is_blocked_error(info.value)
