"""The dashboard over plain HTTP against an in-process daemon: sign-in, CSRF, escaping, actions."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable

import httpx
import pydantic
import pytest
import structlog
from conftest import WEBHOOK_SECRET, base_config, eventually, merge
from starlette.routing import Mount

from tracker import config, sdnotify
from tracker.app import Daemon
from tracker.dashboard.sessions import COOKIE, LOGIN_COOKIE, MAX_SIGN_IN_FAILURES, SIGN_IN_WINDOW
from tracker.dashboard.web import Dashboard
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


async def _sign_in_again(browser: httpx.AsyncClient, token: str) -> str:
    """Sign in once more from the sign-in form ``browser`` loaded before (a second tab's), while
    still signed in; returns the new session's CSRF token."""
    answer = await browser.post(
        "/ui/login", data={"token": token, "login_csrf": browser.cookies[LOGIN_COOKIE]}
    )
    assert 303 == answer.status_code
    return hidden_fields((await browser.get("/ui/")).text)["csrf"]


async def _followed(browser: httpx.AsyncClient, answer: httpx.Response) -> httpx.Response:
    """The page a button's POST answered 303 to (its result page)."""
    assert 303 == answer.status_code, answer.text
    return await browser.get(answer.headers["location"])


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
    await _sign_in_again(browser, TOKEN)  # a new session: the first one's token is not this one's
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
            assert "Reload the page and try again" in answer.text

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
    done = await _followed(
        browser,
        await browser.post(
            f"/ui/deliveries/{delivery}/redeliver", data=hidden_fields(confirm.text)
        ),
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
    done = await _followed(
        browser, await browser.post("/ui/recover", data=hidden_fields(confirm.text))
    )

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
    done = await _followed(
        browser,
        await browser.post("/ui/remove/luma/remove%2Fme%201", data=hidden_fields(confirm.text)),
    )

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


# -- result pages: POST, then redirect, then GET ------------------------------------------------


async def test_reloading_the_redeliver_result_page_does_not_send_the_webhook_again(
    daemon: Daemon, browser: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    """The redeliver POST answers 303 to a result page; loading that page again (a reload)
    shows the same result and queues nothing: the receiver gets the webhook once."""
    delivery = await _dead_delivery(daemon, receiver, "reload-redeliver-1")
    await sign_in(browser, TOKEN)
    before = receiver.count
    confirm = await browser.get(f"/ui/deliveries/{delivery}/redeliver")

    answer = await browser.post(
        f"/ui/deliveries/{delivery}/redeliver", data=hidden_fields(confirm.text)
    )
    assert 303 == answer.status_code
    result = answer.headers["location"]
    assert result.startswith("/ui/done?")
    first = await browser.get(result)
    await asyncio.to_thread(receiver.wait_for, before + 1, 10)
    await eventually(
        lambda: daemon.parts.store.get_delivery(delivery).state == "delivered",  # type: ignore[union-attr]
        10,
        "the redelivery",
    )
    again = await browser.get(result)
    await asyncio.sleep(0.5)  # a delivery pass or two: a re-queued delivery would be sent

    for page in (first, again):
        assert 200 == page.status_code
        assert f"Delivery {delivery} is queued again" in page.text
        assert "it does not do it again" in page.text
        assert 'href="/ui/tasks/luma/reload-redeliver-1"' in page.text
    assert before + 1 == receiver.count
    assert "delivered" == daemon.parts.store.get_delivery(delivery).state  # type: ignore[union-attr]


async def test_reloading_the_recover_and_remove_result_pages_does_nothing_again(
    daemon: Daemon, browser: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    """Recover and stop tracking answer 303 to their result pages: loaded again, the recover
    page does not take a delivery that died since, the remove page does not remove a task
    registered again since."""
    recovered_id = await _dead_delivery(daemon, receiver, "reload-recover-1")
    await sign_in(browser, TOKEN)
    confirm = await browser.get("/ui/recover", params={"since": "2000-01-01T00:00"})
    recovered = await browser.post("/ui/recover", data=hidden_fields(confirm.text))
    assert 303 == recovered.status_code
    assert (
        "1 dead deliveries are queued again"
        in (await browser.get(recovered.headers["location"])).text
    )
    await eventually(
        lambda: daemon.parts.store.get_delivery(recovered_id).state == "delivered",  # type: ignore[union-attr]
        10,
        "the recovered delivery",
    )  # before the receiver's refusals are queued for the next one
    died_since = await _dead_delivery(daemon, receiver, "reload-recover-2")
    confirm = await browser.get("/ui/remove/luma/reload-recover-1")
    removed = await browser.post(
        "/ui/remove/luma/reload-recover-1", data=hidden_fields(confirm.text)
    )
    assert 303 == removed.status_code
    await asyncio.to_thread(
        daemon.parts.store.register,
        Registration("luma", ["reload-recover-1"]),
        daemon.parts.clock.now(),
    )

    recover_again = await browser.get(recovered.headers["location"])
    remove_again = await browser.get(removed.headers["location"])

    assert "1 dead deliveries are queued again" in recover_again.text
    assert "Task reload-recover-1 on luma is no longer tracked" in remove_again.text
    assert "dead" == daemon.parts.store.get_delivery(died_since).state  # type: ignore[union-attr]
    assert daemon.parts.store.get("luma", "reload-recover-1") is not None


async def test_a_made_up_or_another_session_s_result_page_shows_no_result(
    daemon: Daemon, browser: httpx.AsyncClient
) -> None:
    """A result page's URL is signed for the session it was given to: changed by hand, or
    opened by another session, it says 404 and shows no result."""
    await sign_in(browser, TOKEN)
    confirm = await browser.get("/ui/recover", params={"since": "2000-01-01T00:00"})
    result = (await browser.post("/ui/recover", data=hidden_fields(confirm.text))).headers[
        "location"
    ]
    query = dict(httpx.URL(result).params)
    outcome = json.loads(base64.urlsafe_b64decode(query["outcome"] + "=" * 4))
    assert ["0 dead deliveries are queued again."] == outcome["lines"]
    outcome["lines"] = ["99 dead deliveries are queued again."]
    text = json.dumps(outcome, separators=(",", ":")).encode()
    made_up = {**query, "outcome": base64.urlsafe_b64encode(text).decode().rstrip("=")}

    forged = await browser.get("/ui/done", params=made_up)
    unsigned = await browser.get("/ui/done", params={"outcome": query["outcome"]})
    async with httpx.AsyncClient(base_url=daemon.api_url, timeout=5) as other:
        await sign_in(other, TOKEN)
        elsewhere = await other.get(result)

    for page in (forged, unsigned, elsewhere):
        assert 404 == page.status_code
        assert "was not given to this session" in page.text
        assert "queued again" not in page.text


# -- where a redelivery goes ---------------------------------------------------------------------


async def test_the_redeliver_confirmation_names_the_url_the_webhook_goes_to_now(
    relay: SimulatedRelay, receiver: WebhookReceiver, sqlite_url: str
) -> None:
    """A named endpoint's delivery goes to the endpoint's URL as configured now, a default
    one to [webhooks].url as now, a registration's own webhook_url as stored; a delivery
    whose endpoint left the config is said not to be sent."""
    document = merge(
        base_config(relay.base_url, receiver.url, sqlite_url),
        {
            "dashboard": {"session_lifetime": 600},
            "webhooks": {
                "endpoints": {"app": {"url": f"{receiver.url}/app", "secret": WEBHOOK_SECRET}}
            },
        },
    )
    async with (
        _running(config.parse(document, environ={})) as daemon,
        httpx.AsyncClient(base_url=daemon.api_url, timeout=5) as browser,
    ):
        store, now = daemon.parts.store, daemon.parts.clock.now()
        for registration in (
            Registration("luma", ["to-app"], endpoint="app"),
            Registration("luma", ["to-default"]),
            Registration("luma", ["to-own"], webhook_url=f"{receiver.url}/own"),
        ):
            await asyncio.to_thread(store.register, registration, now)

        def ids() -> dict[str, int] | None:
            rows, _ = store.list_deliveries(platform="luma", limit=10)
            found = {row.task_id: row.id for row in rows}
            return found if len(found) == 3 else None

        delivery = await eventually(ids, 15, "the three deliveries")
        moved = merge(
            document,
            {
                "webhooks": {
                    "url": "http://127.0.0.1:9/moved-default",
                    "endpoints": {
                        "app": {"url": "http://127.0.0.1:9/moved-app", "secret": WEBHOOK_SECRET}
                    },
                }
            },
        )
        daemon.apply(config.parse(moved, environ={}))
        await sign_in(browser, TOKEN)

        async def confirmation(task_id: str) -> str:
            page = await browser.get(f"/ui/deliveries/{delivery[task_id]}/redeliver")
            assert 200 == page.status_code
            return page.text

        assert "sent to http://127.0.0.1:9/moved-app." in await confirmation("to-app")
        assert "sent to http://127.0.0.1:9/moved-default." in await confirmation("to-default")
        assert f"sent to {receiver.url}/own." in await confirmation("to-own")

        gone = merge(document, {})
        gone["webhooks"]["endpoints"] = {}
        daemon.apply(config.parse(gone, environ={}))
        to_app = await confirmation("to-app")
        assert "sent to" not in to_app
        assert "it is not sent: endpoint &#39;app&#39; is no longer in" in to_app


# -- sign-in in several tabs ---------------------------------------------------------------------


async def test_two_sign_in_forms_open_at_once_both_sign_in(
    daemon: Daemon, browser: httpx.AsyncClient
) -> None:
    """Two tabs load the sign-in form, one after the other: the first loaded signs in, and so
    does the second afterwards (not a 403 "form expired"); a made-up form token still fails."""
    first = hidden_fields((await browser.get("/ui/login")).text)["login_csrf"]
    second = hidden_fields((await browser.get("/ui/login")).text)["login_csrf"]

    forged = await browser.post("/ui/login", data={"token": TOKEN, "login_csrf": "x" * 43})
    by_first = await browser.post("/ui/login", data={"token": TOKEN, "login_csrf": first})
    by_second = await browser.post("/ui/login", data={"token": TOKEN, "login_csrf": second})

    assert 403 == forged.status_code
    assert (303, "/ui/") == (by_first.status_code, by_first.headers.get("location"))
    assert (303, "/ui/") == (by_second.status_code, by_second.headers.get("location"))
    assert 200 == (await browser.get("/ui/")).status_code
    assert 1 == await asyncio.to_thread(_dashboard(daemon).sessions.count)


def _dashboard(daemon: Daemon) -> Dashboard:
    (ui,) = [r for r in daemon.parts.app.routes if isinstance(r, Mount) and r.path == "/ui"]
    found: Dashboard = ui.app.state.dashboard
    return found


async def test_the_sign_in_page_sends_a_signed_in_browser_to_the_overview(
    daemon: Daemon, browser: httpx.AsyncClient
) -> None:
    """Opening /ui/login while signed in leads to the overview and starts no session."""
    await sign_in(browser, TOKEN)
    cookie = browser.cookies[COOKIE]

    answer = await browser.get("/ui/login")

    assert (303, "/ui/") == (answer.status_code, answer.headers.get("location"))
    assert cookie == browser.cookies[COOKIE]
    assert 1 == await asyncio.to_thread(_dashboard(daemon).sessions.count)


async def test_signing_in_again_ends_the_browser_s_previous_session(
    daemon: Daemon, browser: httpx.AsyncClient
) -> None:
    """A sign-in posted while the browser's session is live (a sign-in form left open in
    another tab) ends that session in the database before starting the new one."""
    await sign_in(browser, TOKEN)
    old = browser.cookies[COOKIE]
    async with httpx.AsyncClient(base_url=daemon.api_url, timeout=5) as tab:
        form = hidden_fields((await tab.get("/ui/login")).text)["login_csrf"]  # loaded before
        tab.cookies.set(COOKIE, old)  # ... the other tab signed in
        answer = await tab.post("/ui/login", data={"token": TOKEN, "login_csrf": form})
        assert 303 == answer.status_code
        assert old != answer.cookies[COOKIE]

    assert 303 == (await browser.get("/ui/")).status_code  # the old cookie opens nothing
    assert 1 == await asyncio.to_thread(_dashboard(daemon).sessions.count)


async def test_a_sign_out_form_from_before_signing_in_again_says_to_reload_the_page(
    browser: httpx.AsyncClient,
) -> None:
    """The sign-out form of a page loaded before the browser signed in again is refused with
    a page that says to reload and try again, and links to a page whose form works."""
    stale = await sign_in(browser, TOKEN)
    await _sign_in_again(browser, TOKEN)

    refused = await browser.post("/ui/logout", data={"csrf": stale})

    assert 403 == refused.status_code
    assert "you may have signed in again or signed out in another tab" in refused.text
    assert "Reload the page and try again." in refused.text
    assert '<a href="/ui/" id="again">' in refused.text
    fresh = hidden_fields((await browser.get("/ui/")).text)["csrf"]
    signed_out = await browser.post("/ui/logout", data={"csrf": fresh})
    assert (303, "/ui/login") == (signed_out.status_code, signed_out.headers["location"])


# -- errors of routing ---------------------------------------------------------------------------


async def test_a_mistyped_address_or_a_wrong_method_gets_the_dashboard_s_error_page(
    browser: httpx.AsyncClient,
) -> None:
    """/ui/nonexistent is a 404, GET /ui/logout and POST /ui/tasks are 405s with Allow, each
    the dashboard's HTML page with its security headers, not the API's JSON."""
    missing = await browser.get("/ui/nonexistent")
    get_logout = await browser.get("/ui/logout")
    post_tasks = await browser.post("/ui/tasks", data={"q": "x"})

    assert (404, "Not Found") == (missing.status_code, _heading(missing))
    assert "There is no dashboard page at this address." in missing.text
    assert (405, "POST") == (get_logout.status_code, get_logout.headers["allow"])
    assert (405, "GET, HEAD") == (post_tasks.status_code, post_tasks.headers["allow"])
    assert "does not take a GET request (it takes POST)" in get_logout.text
    for page in (missing, get_logout, post_tasks):
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert '"detail"' not in page.text
        assert '<a href="/ui/" id="again">' in page.text


def _heading(page: httpx.Response) -> str:
    found = re.search(r"<h1>(.*?)</h1>", page.text)
    return found[1] if found else ""
