"""The dashboard over plain HTTP against an in-process daemon: sign-in, CSRF, escaping, actions."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable

import httpx
import pydantic
import pytest
import structlog
from conftest import base_config, eventually, merge
from starlette.routing import Mount

from tracker import config, sdnotify
from tracker.app import Daemon
from tracker.dashboard.sessions import COOKIE, MAX_SIGN_IN_FAILURES, SIGN_IN_WINDOW
from tracker.store import Registration
from tracker.testing.dashboard import hidden_fields, sign_in
from tracker.testing.receiver import Reply, WebhookReceiver
from tracker.testing.simulator import SimulatedRelay

TOKEN = "test-token"
DASHBOARD_TOKEN = "dash-only-token"


def _settings(relay: SimulatedRelay, receiver: WebhookReceiver, db_url: str) -> config.Settings:
    """The dashboard on, the simulated relay polled fast."""
    document = merge(
        base_config(relay.base_url, receiver.url, db_url),
        {
            "poll": {"interval": 0.2, "max_interval": 1},
            # A refused webhook dies within a fraction of a second.
            "webhooks": {"retry_delays": [0.05, 0.05, 0.05]},
            "dashboard": {"token": DASHBOARD_TOKEN, "session_lifetime": 600},
        },
    )
    return config.parse(document, environ={})


@contextlib.asynccontextmanager
async def _running(settings: config.Settings) -> AsyncIterator[Daemon]:
    daemon = Daemon(settings, notifier=sdnotify.Notifier("/nonexistent/notify"))
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


@pytest.fixture(name="daemon")
async def _daemon(
    relay: SimulatedRelay, receiver: WebhookReceiver, sqlite_url: str
) -> AsyncIterator[Daemon]:
    """A started daemon with the dashboard on, polling the simulated relay fast."""
    async with _running(_settings(relay, receiver, sqlite_url)) as daemon:
        yield daemon


@pytest.fixture(name="browser")
async def _browser(daemon: Daemon) -> AsyncIterator[httpx.AsyncClient]:
    """A cookie-keeping HTTP client on the daemon, signed out."""
    async with httpx.AsyncClient(base_url=daemon.api_url, timeout=5) as client:
        yield client


async def _dead_delivery(daemon: Daemon, receiver: WebhookReceiver, task_id: str) -> int:
    """Register a task whose webhook the receiver refuses until it is dead; its delivery id."""
    receiver.reply(*[Reply(status=500, body=b"receiver down")] * 4)
    await asyncio.to_thread(
        daemon.parts.store.register, Registration("luma", [task_id]), daemon.parts.clock.now()
    )

    def dead() -> int | None:
        rows, _ = daemon.parts.store.list_deliveries(state="dead", task_id=task_id)
        return rows[0].id if rows else None

    found: int = await eventually(dead, 15, "the delivery to die")
    return found


async def test_the_address_without_its_slash_leads_to_the_dashboard(
    browser: httpx.AsyncClient,
) -> None:
    """/ui, as people type it, is sent on to /ui/ (the app redirects no other slash)."""
    answer = await browser.get("/ui", follow_redirects=False)

    assert (307, "/ui/") == (answer.status_code, answer.headers["location"])


async def test_every_page_and_action_redirects_to_sign_in_without_a_session(
    daemon: Daemon, browser: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    """No page is shown and no button works without a session: each answers 303 to /ui/login."""
    delivery = await _dead_delivery(daemon, receiver, "nosession-1")
    for path in ("/ui/", "/ui/tasks", "/ui/tasks/luma/nosession-1", "/ui/deliveries"):
        answer = await browser.get(path)
        assert (303, "/ui/login") == (answer.status_code, answer.headers["location"]), path
    for path in (f"/ui/deliveries/{delivery}/redeliver", "/ui/remove/luma/nosession-1"):
        answer = await browser.post(path, data={"csrf": "anything"})
        assert (303, "/ui/login") == (answer.status_code, answer.headers["location"]), path

    assert "dead" == daemon.parts.store.get_delivery(delivery).state  # type: ignore[union-attr]
    assert daemon.parts.store.get("luma", "nosession-1") is not None


async def test_sign_in_with_an_api_token_sets_a_strict_http_only_session_cookie(
    browser: httpx.AsyncClient,
) -> None:
    """The token goes in a POST body; the answer sets an HttpOnly, SameSite=Strict cookie."""
    form = await browser.get("/ui/login")
    assert 'type="password"' in form.text
    answer = await browser.post(
        "/ui/login",
        data={"token": TOKEN, "login_csrf": hidden_fields(form.text)["login_csrf"]},
    )

    assert (303, "/ui/") == (answer.status_code, answer.headers["location"])
    cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith(COOKIE))
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "samesite", "max-age", "path"} <= attributes
    assert "samesite=strict" in cookie.lower()
    assert "max-age=600" in cookie.lower()
    assert TOKEN not in cookie
    assert 200 == (await browser.get("/ui/")).status_code


async def test_the_dashboard_token_signs_in_but_not_into_the_api(
    browser: httpx.AsyncClient,
) -> None:
    """[dashboard].token opens the pages and is no API bearer token."""
    await sign_in(browser, DASHBOARD_TOKEN)

    assert 200 == (await browser.get("/ui/tasks")).status_code
    api = await browser.get("/v1/tasks", headers={"Authorization": f"Bearer {DASHBOARD_TOKEN}"})
    assert 401 == api.status_code


async def test_a_wrong_token_is_refused_and_never_logged(browser: httpx.AsyncClient) -> None:
    """A bad token gets 401 and no session; neither token reaches the log lines."""
    form = await browser.get("/ui/login")
    with structlog.testing.capture_logs() as logged:
        answer = await browser.post(
            "/ui/login",
            data={"token": "not-it", "login_csrf": hidden_fields(form.text)["login_csrf"]},
        )
        await sign_in(browser, TOKEN)

    assert 401 == answer.status_code
    assert "that token is not accepted" in answer.text
    assert ["dashboard_sign_in_refused", "dashboard_signed_in"] == [
        e["event"] for e in logged if e["event"].startswith("dashboard_")
    ]
    assert "not-it" not in repr(logged)
    assert TOKEN not in repr(logged)


async def test_sign_in_without_the_form_token_is_refused(browser: httpx.AsyncClient) -> None:
    """A sign-in posted from elsewhere (no login form cookie) gets 403 and no session."""
    answer = await browser.post("/ui/login", data={"token": TOKEN, "login_csrf": "forged"})

    assert 403 == answer.status_code
    assert COOKIE not in answer.headers.get("set-cookie", "")
    assert 303 == (await browser.get("/ui/")).status_code


async def test_a_forged_csrf_token_is_refused_and_changes_nothing(
    daemon: Daemon, browser: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    """Redeliver, recover and remove with a wrong or another session's CSRF token: 403."""
    delivery = await _dead_delivery(daemon, receiver, "forged-1")
    other_csrf = await sign_in(browser, TOKEN)
    await sign_in(browser, TOKEN)  # a new session: the first one's token is not this one's
    posts = {
        f"/ui/deliveries/{delivery}/redeliver": {},
        "/ui/recover": {"since": "2000-01-01T00:00:00Z"},
        "/ui/remove/luma/forged-1": {},
    }
    for path, fields in posts.items():
        for forged in ("forged", other_csrf, None):
            data = fields if forged is None else {**fields, "csrf": forged}
            answer = await browser.post(path, data=data)
            assert 403 == answer.status_code, (path, forged)
            assert "forged or out of date" in answer.text

    assert "dead" == daemon.parts.store.get_delivery(delivery).state  # type: ignore[union-attr]
    assert daemon.parts.store.get("luma", "forged-1") is not None


async def test_redeliver_asks_first_then_queues_the_delivery_and_the_receiver_gets_it(
    daemon: Daemon, browser: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    """GET shows a confirmation with a CSRF form; its POST re-queues and the webhook arrives."""
    delivery = await _dead_delivery(daemon, receiver, "redeliver-1")
    await sign_in(browser, TOKEN)
    before = receiver.count

    confirm = await browser.get(f"/ui/deliveries/{delivery}/redeliver")
    assert "Redeliver this webhook?" in confirm.text
    assert "dead" == daemon.parts.store.get_delivery(delivery).state  # type: ignore[union-attr]
    done = await browser.post(
        f"/ui/deliveries/{delivery}/redeliver", data=hidden_fields(confirm.text)
    )

    assert 200 == done.status_code
    assert f"Delivery {delivery} is queued again" in done.text
    await asyncio.to_thread(receiver.wait_for, before + 1, 10)
    assert (
        "delivered"
        == (
            await eventually(
                lambda: (
                    (d := daemon.parts.store.get_delivery(delivery))
                    and d.state == "delivered"
                    and d
                ),
                10,
                "the redelivery",
            )
        ).state
    )


async def test_recover_counts_the_dead_of_the_window_then_requeues_them(
    daemon: Daemon, browser: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    """The confirmation says how many dead deliveries the window holds; the POST takes them."""
    delivery = await _dead_delivery(daemon, receiver, "recover-1")
    await sign_in(browser, TOKEN)

    old_window = {"since": "2000-01-01T00:00", "until": "2000-01-02T00:00"}
    empty = await browser.get("/ui/recover", params=old_window)
    assert "0 dead deliveries were created" in empty.text
    confirm = await browser.get("/ui/recover", params={"since": "2000-01-01T00:00"})
    assert "1 dead deliveries were created" in confirm.text
    done = await browser.post("/ui/recover", data=hidden_fields(confirm.text))

    assert "1 dead deliveries are queued again" in done.text
    assert daemon.parts.store.get_delivery(delivery).state in {"pending", "delivered"}  # type: ignore[union-attr]


async def test_recover_names_a_bad_window(browser: httpx.AsyncClient) -> None:
    """A window without a start or with an unreadable time is a 400 naming the field."""
    await sign_in(browser, TOKEN)

    assert "since: required" in (await browser.get("/ui/recover")).text
    bad = await browser.get("/ui/recover", params={"since": "yesterday"})
    assert 400 == bad.status_code
    assert "since: must be a time" in bad.text


async def test_stop_tracking_asks_first_then_removes_the_task(
    daemon: Daemon, browser: httpx.AsyncClient
) -> None:
    """The remove button leads to a confirmation; its POST forgets the task and says so. The
    slash in the id is percent-encoded in the link and the form, and comes back as a slash.
    """
    await asyncio.to_thread(
        daemon.parts.store.register, Registration("luma", ["remove/me 1"]), daemon.parts.clock.now()
    )
    await sign_in(browser, TOKEN)
    task_page = await browser.get("/ui/tasks/luma/remove/me%201")
    assert 'href="/ui/remove/luma/remove%2Fme%201"' in task_page.text

    confirm = await browser.get("/ui/remove/luma/remove%2Fme%201")
    assert 'action="/ui/remove/luma/remove%2Fme%201"' in confirm.text
    assert daemon.parts.store.get("luma", "remove/me 1") is not None
    done = await browser.post("/ui/remove/luma/remove%2Fme%201", data=hidden_fields(confirm.text))

    assert "is no longer tracked" in done.text
    assert daemon.parts.store.get("luma", "remove/me 1") is None


async def test_everything_shown_is_html_escaped(daemon: Daemon, browser: httpx.AsyncClient) -> None:
    """Ids and metadata with markup appear as text on the list and the task page."""
    evil = "<script>alert(1)</script>"
    await asyncio.to_thread(
        daemon.parts.store.register,
        Registration("luma", ['x"><img src=x>'], metadata={"note": evil}),
        daemon.parts.clock.now(),
    )
    await sign_in(browser, TOKEN)

    listing = await browser.get("/ui/tasks", params={"q": "script"})
    page = await browser.get("/ui/tasks/luma/x%22%3E%3Cimg%20src%3Dx%3E")
    for text in (listing.text, page.text):
        assert "<script>" not in text
        assert "<img src=x>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "x&#34;&gt;&lt;img src=x&gt;" in page.text


async def test_pages_carry_headers_that_forbid_scripts_framing_and_caching(
    browser: httpx.AsyncClient,
) -> None:
    """Every answer, the sign-in form included, has the CSP and no-store headers."""
    answer = await browser.get("/ui/login")

    assert "default-src 'none'" in answer.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    assert ("DENY", "no-store", "no-referrer") == (
        answer.headers["x-frame-options"],
        answer.headers["cache-control"],
        answer.headers["referrer-policy"],
    )


async def test_a_wrong_method_is_told_every_method_the_page_takes(
    browser: httpx.AsyncClient,
) -> None:
    """The sign-in page takes GET and POST, each a route of its own: a PUT's 405 names both."""
    login = await browser.put("/ui/login")
    tasks = await browser.delete("/ui/tasks")

    assert (405, "GET, HEAD, POST") == (login.status_code, login.headers["allow"])
    assert (405, "GET, HEAD") == (tasks.status_code, tasks.headers["allow"])


async def test_sign_out_ends_the_session(browser: httpx.AsyncClient) -> None:
    """After signing out, the old cookie opens nothing."""
    csrf = await sign_in(browser, TOKEN)
    cookie = browser.cookies[COOKIE]

    answer = await browser.post("/ui/logout", data={"csrf": csrf})

    assert (303, "/ui/login") == (answer.status_code, answer.headers["location"])
    browser.cookies.set(COOKIE, cookie)
    assert 303 == (await browser.get("/ui/")).status_code


async def _carried_over(cookie: str, csrf: str, there: httpx.AsyncClient) -> None:
    """The session of ``cookie`` opens the pages ``there``, whose forms carry ``csrf``; it is
    signed out there."""
    there.cookies.set(COOKIE, cookie)
    page = await there.get("/ui/tasks")
    assert 200 == page.status_code
    assert csrf == hidden_fields(page.text)["csrf"]
    answer = await there.post("/ui/logout", data={"csrf": csrf})
    assert (303, "/ui/login") == (answer.status_code, answer.headers["location"])


async def test_a_session_outlives_a_restart_of_the_daemon(
    relay: SimulatedRelay, receiver: WebhookReceiver, sqlite_url: str
) -> None:
    """Signed in before a restart, the browser is still signed in after it (same CSRF
    token); signed out after it, the old cookie opens nothing."""
    settings = _settings(relay, receiver, sqlite_url)
    async with _running(settings) as before, httpx.AsyncClient(base_url=before.api_url) as here:
        csrf = await sign_in(here, TOKEN)
        cookie = here.cookies[COOKIE]
    async with _running(settings) as after, httpx.AsyncClient(base_url=after.api_url) as there:
        await _carried_over(cookie, csrf, there)
        there.cookies.set(COOKIE, cookie)
        assert 303 == (await there.get("/ui/")).status_code


@pytest.mark.postgres
async def test_a_session_opened_on_one_daemon_works_on_another_on_the_database(
    relay: SimulatedRelay, receiver: WebhookReceiver, make_pg_url: Callable[[], str]
) -> None:
    """Two daemons on one PostgreSQL database, as behind a load balancer: the cookie one gave
    opens the other's pages; signing out on the other ends the session on the first too."""
    settings = _settings(relay, receiver, make_pg_url())
    async with (
        _running(settings) as first,
        _running(settings) as second,
        httpx.AsyncClient(base_url=first.api_url, timeout=5) as here,
        httpx.AsyncClient(base_url=second.api_url, timeout=5) as there,
    ):
        csrf = await sign_in(here, TOKEN)
        await _carried_over(here.cookies[COOKIE], csrf, there)
        assert 303 == (await here.get("/ui/")).status_code


async def test_the_overview_shows_counts_outbox_activity_and_the_poll_lag(
    daemon: Daemon, browser: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    """Tasks by status, the dead count, the per-minute SVG charts and the poller's lag."""
    await _dead_delivery(daemon, receiver, "overview-1")  # polled, so the lag is known
    await sign_in(browser, TOKEN)

    page = (await browser.get("/ui/")).text

    assert re.search(r'<span class="value" id="poll-lag">\d+\.\d s</span>', page)
    assert 'id="dead-count"><a href="/ui/deliveries?state=dead">1</a>' in page
    assert page.count("<svg") == 2
    assert "Webhook attempts per minute: 4 in the last hour" in page
    assert "overview-1" in page


async def test_task_search_finds_by_id_and_metadata_and_filters_by_status(
    daemon: Daemon, browser: httpx.AsyncClient
) -> None:
    """The tasks page matches text in ids and metadata, any case, and narrows by status."""
    now = daemon.parts.clock.now()
    store = daemon.parts.store
    await asyncio.to_thread(store.register, Registration("luma", ["alpha-1", "beta-2"]), now)
    await asyncio.to_thread(
        store.register, Registration("suno", ["gamma-3"], metadata={"user": "Zed%"}), now
    )
    await sign_in(browser, TOKEN)

    by_id = (await browser.get("/ui/tasks", params={"q": "ALPHA"})).text
    by_metadata = (await browser.get("/ui/tasks", params={"q": "zed%"})).text
    exact = (await browser.get("/ui/tasks", params={"q": "beta-2"})).text
    by_platform = (await browser.get("/ui/tasks", params={"platform": "suno"})).text
    wrong = await browser.get("/ui/tasks", params={"status": "sleeping"})

    assert "alpha-1" in by_id
    assert "beta-2" not in by_id
    assert "gamma-3" in by_metadata
    assert "alpha-1" not in by_metadata
    assert "Exact id match" in exact
    assert "gamma-3" in by_platform
    assert "alpha-1" not in by_platform
    assert 400 == wrong.status_code
    assert "status: must be one of" in wrong.text


async def test_a_token_taken_out_of_the_config_ends_its_sessions(
    daemon: Daemon, browser: httpx.AsyncClient
) -> None:
    """After a reload drops an API token, its sessions go to sign-in; others stay."""
    await sign_in(browser, TOKEN)
    async with httpx.AsyncClient(base_url=daemon.api_url, timeout=5) as other:
        await sign_in(other, DASHBOARD_TOKEN)
        daemon.apply(
            daemon.settings.model_copy(
                update={
                    "server": daemon.settings.server.model_copy(
                        update={"api_tokens": (pydantic.SecretStr("next-token"),)}
                    )
                }
            )
        )

        assert 303 == (await browser.get("/ui/")).status_code
        assert 200 == (await other.get("/ui/")).status_code
    await sign_in(browser, "next-token")
    assert 200 == (await browser.get("/ui/")).status_code


async def test_with_no_token_configured_sign_in_asks_for_none_but_still_makes_a_session(
    relay: SimulatedRelay, receiver: WebhookReceiver, sqlite_url: str
) -> None:
    """An open loopback API means an open dashboard, yet pages still need the session cookie."""
    document = merge(
        base_config(relay.base_url, receiver.url, sqlite_url), {"server": {"api_tokens": []}}
    )
    daemon = Daemon(
        config.parse(document, environ={}), notifier=sdnotify.Notifier("/nonexistent/notify")
    )
    await daemon.start()
    try:
        async with httpx.AsyncClient(base_url=daemon.api_url, timeout=5) as client:
            form = await client.get("/ui/login")
            assert 'name="token"' not in form.text
            assert 303 == (await client.get("/ui/tasks")).status_code
            await sign_in(client, "")
            assert 200 == (await client.get("/ui/tasks")).status_code
    finally:
        await daemon.stop()


async def test_the_overview_says_n_a_when_the_poller_reports_no_lag(
    daemon: Daemon, browser: httpx.AsyncClient
) -> None:
    """A poll-lag source that knows nothing yet shows as n/a, not as zero."""
    (ui,) = [r for r in daemon.parts.app.routes if isinstance(r, Mount) and r.path == "/ui"]
    ui.app.state.dashboard.poll_lag = lambda: None
    await sign_in(browser, TOKEN)

    page = (await browser.get("/ui/")).text

    assert '<span class="value" id="poll-lag">n/a</span>' in page


async def test_too_many_refused_sign_ins_hold_the_client_back_even_with_the_right_token(
    browser: httpx.AsyncClient,
) -> None:
    """After MAX_SIGN_IN_FAILURES wrong tokens, even the right one gets 429 with Retry-After,
    so a token cannot be guessed at network speed; the hold is logged once, without tokens.
    """
    with structlog.testing.capture_logs() as logged:
        for n in range(MAX_SIGN_IN_FAILURES):
            form = await browser.get("/ui/login")
            answer = await browser.post(
                "/ui/login",
                data={"token": f"guess-{n}", "login_csrf": hidden_fields(form.text)["login_csrf"]},
            )
            assert 401 == answer.status_code
        form = await browser.get("/ui/login")
        held = await browser.post(
            "/ui/login",
            data={"token": TOKEN, "login_csrf": hidden_fields(form.text)["login_csrf"]},
        )

    assert 429 == held.status_code
    assert 0 < int(held.headers["retry-after"]) <= SIGN_IN_WINDOW
    assert "too many refused sign-ins" in held.text
    assert COOKIE not in held.headers.get("set-cookie", "")
    assert 1 == sum(e["event"] == "dashboard_sign_ins_held_back" for e in logged)
    assert TOKEN not in repr(logged)
    assert "guess-3" not in repr(logged)
