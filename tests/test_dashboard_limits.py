"""The dashboard's forms against floods, over a real daemon on loopback: sign-ins sent all at
once check no more tokens than the throttle allows, and no form, signed in or not, declared or
chunked, is read past the dashboard's few KiB.
"""

from __future__ import annotations

import asyncio
import collections
import http.cookiejar
import urllib.parse
from collections.abc import AsyncIterator

import httpx
import pytest
import structlog

# The daemon (dashboard on, tokens TOKEN and DASHBOARD_TOKEN) and the browser of test_dashboard.
from test_dashboard import TOKEN, _browser, _daemon  # noqa: F401 - fixtures

from tracker.app import Daemon
from tracker.dashboard.forms import MAX_FIELD_BYTES, MAX_FORM_BYTES, MAX_FORM_FIELDS
from tracker.dashboard.sessions import (
    COOKIE,
    LOGIN_COOKIE,
    MAX_SIGN_IN_FAILURES,
    SIGN_IN_WINDOW,
    SignInThrottle,
)
from tracker.testing.dashboard import hidden_fields, sign_in

#: wrong sign-ins sent at once from one address
FLOOD = 40
URLENCODED = {"Content-Type": "application/x-www-form-urlencoded"}


def _urlencoded(fields: list[tuple[str, str]]) -> bytes:
    return urllib.parse.urlencode(fields).encode()


async def _chunked(body: bytes, size: int = 1024) -> AsyncIterator[bytes]:
    """``body`` sent in chunks, with no Content-Length (Transfer-Encoding: chunked)."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def _login_form(browser: httpx.AsyncClient) -> str:
    """Fetch the sign-in form; its login_csrf (the browser keeps the matching cookie)."""
    return hidden_fields((await browser.get("/ui/login")).text)["login_csrf"]


# -- the sign-in throttle --------------------------------------------------------------------


def test_the_throttle_counts_an_ipv6_client_by_its_64_and_a_mapped_ipv4_as_itself() -> None:
    """Refusals of one address hold back its whole /64 (a client owns one whole), not the
    next /64; an IPv4 address written as IPv6 counts as that IPv4 address."""
    throttle = SignInThrottle(lambda: 100.0)
    for n in range(MAX_SIGN_IN_FAILURES):
        throttle.refused(f"2001:db8:1:2::{n:x}")
        throttle.refused("10.0.0.1")

    assert SIGN_IN_WINDOW == throttle.wait("2001:db8:1:2:ffff:ffff:ffff:ffff")  # the same /64
    assert 0.0 == throttle.wait("2001:db8:1:3::1")  # the next /64
    assert SIGN_IN_WINDOW == throttle.wait("::ffff:10.0.0.1")
    assert 0.0 == throttle.wait("10.0.0.2")


async def test_sign_ins_sent_at_once_check_no_more_tokens_than_the_throttle_allows(
    daemon: Daemon, browser: httpx.AsyncClient
) -> None:
    """FLOOD wrong sign-ins whose heads all arrive before any body: MAX_SIGN_IN_FAILURES of
    them have their token checked (401), every other one is held back (429); then the
    right token is held back too, with Retry-After, as the README says.
    """
    login_csrf = await _login_form(browser)
    cookie = f"{LOGIN_COOKIE}={browser.cookies[LOGIN_COOKIE]}"
    heads_sent = 0
    all_heads_sent = asyncio.Event()

    async def body(n: int) -> AsyncIterator[bytes]:
        # httpx writes a request's head before it asks for the body: once every body is
        # asked for, every head is on its way, and the bodies go out together.
        nonlocal heads_sent
        heads_sent += 1
        if heads_sent == FLOOD:
            all_heads_sent.set()
        await all_heads_sent.wait()
        await asyncio.sleep(0.2)  # let the daemon (on this loop) read the last heads
        yield _urlencoded([("token", f"guess-{n}"), ("login_csrf", login_csrf)])

    # A jar that keeps nothing: each request carries the one login cookie given here.
    jar = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    limits = httpx.Limits(max_connections=FLOOD)
    async with httpx.AsyncClient(
        base_url=daemon.api_url, cookies=jar, limits=limits, timeout=30
    ) as flood:
        with structlog.testing.capture_logs() as logged:
            answers = await asyncio.gather(
                *(
                    flood.post(
                        "/ui/login",
                        content=body(n),
                        headers={**URLENCODED, "Cookie": cookie},
                    )
                    for n in range(FLOOD)
                )
            )
    statuses = collections.Counter(a.status_code for a in answers)
    checked = sum(e["event"] == "dashboard_sign_in_refused" for e in logged)

    assert {401: MAX_SIGN_IN_FAILURES, 429: FLOOD - MAX_SIGN_IN_FAILURES} == statuses
    assert MAX_SIGN_IN_FAILURES == checked
    held = await browser.post(
        "/ui/login", data={"token": TOKEN, "login_csrf": await _login_form(browser)}
    )
    assert 429 == held.status_code
    assert 0 < int(held.headers["retry-after"]) <= SIGN_IN_WINDOW
    assert "too many refused sign-ins" in held.text
    assert COOKIE not in held.headers.get("set-cookie", "")


# -- form sizes ------------------------------------------------------------------------------

#: bodies past the byte cap, declared by Content-Length: 413 before a byte is read
TOO_LARGE = {
    "many fields": _urlencoded([(f"f{n}", "x" * 1000) for n in range(300)]),
    "one huge field": _urlencoded([("token", "x" * 1024 * 1024)]),
}
#: bodies within the byte cap that break a field limit: 400
TOO_MANY = {
    "too many fields": _urlencoded([(f"f{n}", "1") for n in range(MAX_FORM_FIELDS + 1)]),
    "one field too long": _urlencoded([("token", "x" * (MAX_FIELD_BYTES + 1))]),
}


@pytest.mark.parametrize("kind", sorted(TOO_LARGE))
async def test_a_sign_in_form_over_the_byte_cap_is_413_unread(
    browser: httpx.AsyncClient, kind: str
) -> None:
    """Without a token, a huge urlencoded form to /ui/login is refused by its length."""
    answer = await browser.post("/ui/login", content=TOO_LARGE[kind], headers=URLENCODED)

    assert 413 == answer.status_code
    assert f"larger than {MAX_FORM_BYTES} bytes" in answer.text


@pytest.mark.parametrize("kind", sorted(TOO_MANY))
async def test_a_sign_in_form_past_a_field_limit_is_400_naming_it(
    browser: httpx.AsyncClient, kind: str
) -> None:
    """A form small enough to read, but with too many or too long fields, is a 400 page."""
    answer = await browser.post("/ui/login", content=TOO_MANY[kind], headers=URLENCODED)

    assert 400 == answer.status_code
    assert "maximum" in answer.text.lower()


async def test_a_chunked_sign_in_form_over_the_byte_cap_is_413(
    browser: httpx.AsyncClient,
) -> None:
    """A body with no Content-Length is cut off once it passes the cap."""
    body = _urlencoded([("token", "x" * 4 * MAX_FORM_BYTES)])
    answer = await browser.post("/ui/login", content=_chunked(body), headers=URLENCODED)

    assert 413 == answer.status_code
    assert f"larger than {MAX_FORM_BYTES} bytes" in answer.text


async def test_multipart_sign_in_forms_are_bounded_too(browser: httpx.AsyncClient) -> None:
    """A multipart form over the cap is 413; one carrying a file is 400."""
    huge = await browser.post(
        "/ui/login", data={"token": "x" * 1024 * 1024}, files={"f": ("f", b"x")}
    )
    with_file = await browser.post(
        "/ui/login", data={"login_csrf": "x"}, files={"f": ("f.txt", b"x")}
    )

    assert 413 == huge.status_code
    assert 400 == with_file.status_code
    assert "maximum number of files is 0" in with_file.text.lower()


async def test_a_signed_in_form_over_the_byte_cap_is_413_and_does_nothing(
    browser: httpx.AsyncClient,
) -> None:
    """Sign-out with a huge form, declared or chunked, is refused, and the session lives on;
    a normal sign-out still works."""
    csrf = await sign_in(browser, TOKEN)
    body = _urlencoded([("csrf", csrf), ("pad", "x" * 4 * MAX_FORM_BYTES)])

    declared = await browser.post("/ui/logout", content=body, headers=URLENCODED)
    chunked = await browser.post("/ui/logout", content=_chunked(body), headers=URLENCODED)
    many = await browser.post(
        "/ui/logout",
        content=TOO_MANY["too many fields"] + b"&csrf=" + csrf.encode(),
        headers=URLENCODED,
    )

    assert (413, 413, 400) == (declared.status_code, chunked.status_code, many.status_code)
    assert f"larger than {MAX_FORM_BYTES} bytes" in declared.text
    assert 200 == (await browser.get("/ui/")).status_code  # still signed in
    signed_out = await browser.post("/ui/logout", data={"csrf": csrf})
    assert (303, "/ui/login") == (signed_out.status_code, signed_out.headers["location"])


async def test_normal_sign_in_and_a_dashboard_action_still_work(
    browser: httpx.AsyncClient,
) -> None:
    """The dashboard's own forms fit: sign in, confirm a recovery, post it."""
    await sign_in(browser, TOKEN)
    confirm = await browser.get("/ui/recover", params={"since": "2020-01-01T00:00:00"})
    done = await browser.post(
        "/ui/recover", data=hidden_fields(confirm.text), follow_redirects=True
    )

    assert 200 == done.status_code
    assert "0 dead deliveries are queued again" in done.text
