"""The dashboard over plain HTTP, on SQLite and on PostgreSQL, given task ids full of URL syntax
and values the database cannot take: every link and form reaches the task it names, and every
bad value is a 4xx page saying what is wrong, never a 500 and never a half-done action.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import markupsafe
import pytest
from conftest import base_config, eventually, merge

from tracker import config, sdnotify
from tracker.app import Daemon
from tracker.store import Registration
from tracker.testing.dashboard import hidden_fields, sign_in
from tracker.testing.receiver import Reply, WebhookReceiver
from tracker.testing.simulator import SimulatedRelay

TOKEN = "test-token"
#: ids the API accepts that mean something in a URL: a query, a fragment, an escape that
#: decoded once more would be "abc?x", a dot segment leading to "abc", slashes
TRICKY_IDS = ("abc?x", "abc#x", "abc%3Fx", "x/../abc", "a/b", "abc/")
#: dot segments themselves: registration refuses them, but tasks stored earlier may hold them
DOT_IDS = (".", "..")
#: beyond PostgreSQL's 32-bit INTEGER, and beyond SQLite's 64-bit one
TOO_BIG = ("3000000000", "99999999999999999999999")


@pytest.fixture(name="daemon")
async def _daemon(
    relay: SimulatedRelay, receiver: WebhookReceiver, db_url: str
) -> AsyncIterator[Daemon]:
    """A started daemon with the dashboard on; every webhook is refused until it is dead."""
    receiver.default = Reply(status=500, body=b"receiver down")
    document = merge(
        base_config(relay.base_url, receiver.url, db_url),
        {"poll": {"interval": 0.2, "max_interval": 1}, "webhooks": {"retry_delays": [0.05]}},
    )
    daemon = Daemon(
        config.parse(document, environ={}), notifier=sdnotify.Notifier("/nonexistent/notify")
    )
    await daemon.start()
    yield daemon
    await daemon.stop()


@pytest.fixture(name="browser")
async def _browser(daemon: Daemon) -> AsyncIterator[httpx.AsyncClient]:
    """A cookie-keeping client on the daemon (httpx resolves dot segments as a browser does)."""
    async with httpx.AsyncClient(base_url=daemon.api_url, timeout=5) as client:
        yield client


async def _register(
    browser: httpx.AsyncClient, *ids: str, metadata: dict[str, str] | None = None
) -> None:
    """Register ``ids`` on luma through the API, which decides what a task id may be."""
    answer = await browser.post(
        "/v1/tasks",
        json={"platform": "luma", "ids": list(ids), "metadata": metadata},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert 201 == answer.status_code, answer.text


def _link(page: str, text: str) -> str:
    """The href of the page's first link that reads ``text``."""
    shown = re.escape(str(markupsafe.escape(text)))
    found = re.search(rf'<a [^>]*href="(?P<href>[^"]*)"[^>]*>{shown}</a>', page)
    assert found is not None, f"no link reads {text!r}"
    return html.unescape(found["href"])


def _form_action(page: str) -> str:
    """Where the confirmation page's form posts."""
    found = re.search(r'<form method="post" action="(?P<action>[^"]*)">', page)
    assert found is not None, "no confirmation form"
    return html.unescape(found["action"])


def _problems(answer: httpx.Response) -> list[str]:
    """The problems an HTML error page lists (none on any other answer)."""
    if not answer.headers["content-type"].startswith("text/html"):
        return []
    return [html.unescape(m) for m in re.findall(r"<li>(.*?)</li>", answer.text)]


def _shows_task(page: httpx.Response, task_id: str) -> bool:
    return f'<span id="task-id">{markupsafe.escape(task_id)}</span>' in page.text


async def test_stop_tracking_removes_the_task_shown_whatever_url_syntax_its_id_holds(
    daemon: Daemon, browser: httpx.AsyncClient
) -> None:
    """From the list, to the task, to the confirmation, to its POST: each step names the same
    task, so removing "abc?x" or "x/../abc" leaves "abc" (and every other task) tracked; a
    task stored under ".." before registration refused it is reached too.
    """
    store = daemon.parts.store
    await _register(browser, "abc", *TRICKY_IDS)
    store.register(Registration("luma", list(DOT_IDS)), datetime.now(UTC))
    every = (*TRICKY_IDS, *DOT_IDS)
    await sign_in(browser, TOKEN)

    for n, task_id in enumerate(every):
        listing = await browser.get("/ui/tasks")
        task_page = await browser.get(_link(listing.text, task_id))
        assert _shows_task(task_page, task_id), task_id
        confirm = await browser.get(_link(task_page.text, "Stop tracking…"))
        assert f"Task {markupsafe.escape(task_id)} on luma" in confirm.text
        done = await browser.post(
            _form_action(confirm.text), data=hidden_fields(confirm.text), follow_redirects=True
        )

        assert 200 == done.status_code, task_id
        assert f"Task {markupsafe.escape(task_id)} on luma is no longer tracked" in done.text
        kept = [t for t in ("abc", *every) if store.get("luma", t) is not None]
        assert ["abc", *every[n + 1 :]] == kept


async def test_every_link_to_a_task_opens_that_task_whatever_url_syntax_its_id_holds(
    daemon: Daemon, browser: httpx.AsyncClient
) -> None:
    """The overview's dead deliveries, the deliveries page and a redelivery's "Back to task"
    link to the task they name, and a task's Redeliver button reaches its own delivery.
    """
    store = daemon.parts.store
    await _register(browser, "abc", *TRICKY_IDS)

    def all_dead() -> bool:
        rows, _ = store.list_deliveries(state="dead", limit=100)
        return {r.task_id for r in rows} >= set(TRICKY_IDS)

    await eventually(all_dead, 20, "every tricky task's webhook to die")
    await sign_in(browser, TOKEN)
    overview = (await browser.get("/ui/")).text
    deliveries = (await browser.get("/ui/deliveries")).text

    on_overview = [t for t in TRICKY_IDS if f"luma/{markupsafe.escape(t)}</a>" in overview]
    assert on_overview  # the five newest dead
    for task_id in on_overview:
        assert _shows_task(await browser.get(_link(overview, f"luma/{task_id}")), task_id)
    for task_id in TRICKY_IDS:
        task_page = await browser.get(_link(deliveries, f"luma/{task_id}"))
        assert _shows_task(task_page, task_id), task_id
        confirm = await browser.get(_link(task_page.text, "Redeliver"))
        assert f"of task {markupsafe.escape(task_id)} on luma" in confirm.text
        done = await browser.post(
            _form_action(confirm.text), data=hidden_fields(confirm.text), follow_redirects=True
        )
        back = _link(done.text, f"Back to task {task_id}")
        assert _shows_task(await browser.get(back), task_id), task_id


def _metadata_shown(page: str) -> list[str]:
    """The text of each task list row's metadata excerpt, or of a task page's metadata."""
    found = re.findall(r'<td class="excerpt">(.*?)</td>', page.partition('id="task-list"')[2], re.S)
    found += re.findall(r"<dt>metadata</dt><dd><pre>(.*?)</pre>", page, re.S)
    return [html.unescape(text) for text in found]


async def test_the_task_list_shows_metadata_as_its_task_page_does_readable_and_escaped(
    daemon: Daemon, browser: httpx.AsyncClient
) -> None:
    """Non-ASCII text reads as itself, not as \\u escapes, and HTML in an id or metadata is
    shown as text: the list's excerpt is the task page's metadata, cut to 80 characters.
    """
    metadata = {"jp": "日本語", "note": '<b>bold</b> & "quoted"', "x": "<script>alert(1)</script>"}
    await _register(browser, "<script>alert(1)</script>", metadata=metadata)
    await sign_in(browser, TOKEN)

    listing = (await browser.get("/ui/tasks")).text
    task_page = (await browser.get(_link(listing, "<script>alert(1)</script>"))).text

    [excerpt] = _metadata_shown(listing)
    [whole] = _metadata_shown(task_page)
    assert "<script>" not in listing
    assert "<script>" not in task_page
    assert "\\u" not in excerpt
    assert '"jp": "日本語"' in excerpt
    assert whole.startswith(excerpt.removesuffix("..."))
    assert metadata == json.loads(whole)


async def test_a_search_finds_metadata_text_as_typed(
    daemon: Daemon, browser: httpx.AsyncClient
) -> None:
    """Non-ASCII text and quotes in metadata are found as typed in the Tasks page's search."""
    await _register(browser, "jp", metadata={"jp": "日本語", "note": '<b>bold</b> & "quoted"'})
    await _register(browser, "uni", metadata={"name": "Ünïcødé 日本"})
    await sign_in(browser, TOKEN)

    for text, expected in {"日本語": ["jp"], "Ünïcødé": ["uni"], '"quoted"': ["jp"]}.items():
        page = await browser.get("/ui/tasks", params={"q": text})
        shown = re.findall(r'<a href="[^"]*">([^<]*)</a></td>', page.text)
        assert expected == shown, text


async def test_bad_input_in_a_page_address_is_a_4xx_page_naming_it(
    daemon: Daemon, browser: httpx.AsyncClient
) -> None:
    """Cursors and delivery ids that are not ASCII or overflow the id column, times that
    overflow on the way to UTC, a NUL (which PostgreSQL refuses in any text) and unknown
    platforms: the API's 4xx, as an HTML page that says what is wrong.
    """
    await sign_in(browser, TOKEN)
    late_window = "since=2026-01-01T00:00&until=9999-12-31T23:30-01:00"
    expected: dict[str, tuple[int, str]] = {
        "/ui/tasks?before=%C2%B2": (400, "before: must be"),
        "/ui/deliveries?before=%C2%B2": (400, "before: must be"),
        "/ui/tasks?before=0": (400, "before: must be"),
        f"/ui/tasks?before={'9' * 5000}": (400, "before: must be"),  # past int()'s digit limit
        **{f"/ui/tasks?before={big}": (400, "before: must be") for big in TOO_BIG},
        **{f"/ui/deliveries?before={big}": (400, "before: must be") for big in TOO_BIG},
        **{f"/ui/deliveries/{big}/redeliver": (404, "ids are integers from 1") for big in TOO_BIG},
        "/ui/deliveries/%C2%B2/redeliver": (404, "ids are integers from 1"),
        "/ui/deliveries/x/redeliver": (404, "ids are integers from 1"),
        "/ui/recover?since=0001-01-01T00:00%2B01:00": (400, "since: must lie between the years"),
        f"/ui/recover?{late_window}": (400, "until: must lie between the years"),
        "/ui/recover?since=2026-01-02T00:00&until=2026-01-01T00:00": (400, "until: must be after"),
        "/ui/tasks?q=%00": (400, "q: must not contain a NUL"),
        "/ui/tasks?q=a%00b&platform=luma": (400, "q: must not contain a NUL"),
        "/ui/tasks?platform=%00": (400, "platform: must be one of"),
        "/ui/tasks?platform=nowhere": (400, "platform: must be one of"),
        "/ui/tasks/luma/%00": (404, "no task"),
        "/ui/tasks/lu%00ma/a": (404, "no task"),
        "/ui/remove/luma/a%00": (404, "no task"),
        "/ui/remove/lu%00ma/a": (404, "no task"),
    }
    answers = {path: await browser.get(path) for path in expected}

    named = {
        p: (a.status_code, any(expected[p][1] in m for m in _problems(a)))
        for p, a in answers.items()
    }
    assert {p: (status, True) for p, (status, _) in expected.items()} == named

    for path in ("/ui/tasks?before=2147483647", "/ui/deliveries?before=2147483647"):
        assert 200 == (await browser.get(path)).status_code, path


async def test_a_bad_value_posted_to_a_button_is_a_4xx_page_and_changes_nothing(
    daemon: Daemon, browser: httpx.AsyncClient
) -> None:
    """Redeliver with an overflowing id, remove with a NUL, recover with a time that overflows:
    each POST, its CSRF token right, answers 4xx and queues or forgets nothing.
    """
    store = daemon.parts.store
    await _register(browser, "kept")

    def dead() -> int | None:
        rows, _ = store.list_deliveries(state="dead", task_id="kept")
        return rows[0].id if rows else None

    delivery: int = await eventually(dead, 15, "the webhook to die")
    csrf = await sign_in(browser, TOKEN)
    posts: dict[str, tuple[dict[str, str], int]] = {
        **{f"/ui/deliveries/{big}/redeliver": ({}, 404) for big in TOO_BIG},
        "/ui/deliveries/%C2%B2/redeliver": ({}, 404),
        "/ui/remove/luma/kept%00": ({}, 404),
        "/ui/remove/lu%00ma/kept": ({}, 404),
        "/ui/recover": ({"since": "0001-01-01T00:00+01:00"}, 400),
    }
    answers = {
        path: await browser.post(path, data={**f, "csrf": csrf}) for path, (f, _) in posts.items()
    }

    assert {p: s for p, (_, s) in posts.items()} == {p: a.status_code for p, a in answers.items()}
    assert all(_problems(a) for a in answers.values())

    assert "dead" == store.get_delivery(delivery).state  # type: ignore[union-attr]
    assert store.get("luma", "kept") is not None
