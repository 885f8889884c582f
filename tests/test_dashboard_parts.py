"""The dashboard's parts on their own: config, sessions, activity counts, charts, queries."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import base_config, merge
from fastapi import FastAPI
from test_store import claim_jobs, outcome, queue_events

from tracker import config
from tracker.activity import ERRORS_KEPT, WINDOW_MINUTES, Activity, Series
from tracker.clock import FakeClock
from tracker.dashboard import Dashboard, chart, mount
from tracker.dashboard.sessions import (
    MAX_SESSIONS,
    MAX_SIGN_IN_FAILURES,
    MAX_TRACKED_CLIENTS,
    SIGN_IN_WINDOW,
    Sessions,
    SignInThrottle,
    csrf_ok,
    tokens_match,
)
from tracker.retry import DeliveryState
from tracker.store import Registration, SqlStore, dashboard_queries
from tracker.store.base import dashboard_sessions
from tracker.store.dashboard_queries import DashboardQueries

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def _settings(**overrides: Any) -> config.Settings:
    document = base_config("http://127.0.0.1:9", "http://127.0.0.1:9/hooks", "sqlite://")
    return config.parse(merge(document, overrides), environ={})


class Ticker:
    """A settable epoch clock."""

    def __init__(self, at: float = 1_800_000_000.0) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


# -- config ----------------------------------------------------------------------------------


def test_the_dashboard_is_on_by_default_on_loopback_only() -> None:
    """Unset, [dashboard].enabled follows the host; set, it wins either way."""
    public = {"host": "0.0.0.0", "api_tokens": ["t"]}

    assert _settings().dashboard_enabled()
    assert not _settings(server=public).dashboard_enabled()
    assert _settings(server=public, dashboard={"enabled": True}).dashboard_enabled()
    assert not _settings(dashboard={"enabled": False}).dashboard_enabled()


def test_dashboard_config_errors_name_the_key_and_the_token_is_a_secret() -> None:
    """A bad [dashboard] value is reported by its key; the token is redacted from logs."""
    with pytest.raises(config.ConfigError) as caught:
        _settings(dashboard={"enabled": "yes", "session_lifetime": 0, "token": "", "x": 1})
    problems = "\n".join(caught.value.problems)
    for key in ("enabled", "session_lifetime", "token", "x"):
        assert f"dashboard.{key}:" in problems

    assert "dash-secret" in _settings(dashboard={"token": "dash-secret"}).secrets()


def test_mount_serves_ui_only_when_enabled() -> None:
    """A disabled dashboard adds no route at all; sessions are bounded by MAX_SESSIONS and
    live for [dashboard].session_lifetime (43,200 s by default)."""
    store = SqlStore.from_url("sqlite://")
    # Enabled: the dashboard, and the redirect from /ui to it.
    for enabled, expected in ((True, ["/ui", "/ui"]), (False, [])):
        settings = _settings(dashboard={"enabled": enabled})
        app = FastAPI()
        mount(
            app,
            Dashboard(store=store, clock=FakeClock(), settings=lambda s=settings: s, platforms=[]),
        )
        paths = [getattr(route, "path", "") for route in app.routes]
        assert expected == [p for p in paths if p == "/ui"]
    dashboard = Dashboard(store=store, clock=FakeClock(), settings=_settings, platforms=[])
    assert (MAX_SESSIONS, 43200) == (dashboard.sessions.keep, dashboard.sessions.lifetime)
    store.close()


# -- sessions --------------------------------------------------------------------------------


def test_sessions_expire_after_their_lifetime_and_end_on_sign_out(store: SqlStore) -> None:
    """A session is live until its lifetime passes, or until it is ended."""
    now = Ticker()
    sessions = Sessions(store, 60, now)
    first, second = sessions.start("t"), sessions.start("t")

    now.at += 59
    assert first == sessions.get(first.id)
    assert 2 == sessions.count()
    sessions.end(second.id)
    assert sessions.get(second.id) is None
    now.at += 1
    assert sessions.get(first.id) is None
    assert 0 == sessions.count()
    assert sessions.get("") is None
    assert sessions.get(None) is None


def test_a_session_started_by_one_daemon_is_known_to_every_other_on_the_database(
    store: SqlStore, db_url: str
) -> None:
    """Two stores on one database, as two daemons have: a session one starts, the other
    finds, with the same CSRF token; one's sign-out ends it for both."""
    other = SqlStore.from_url(db_url)
    try:
        here, there = Sessions(store, 60, Ticker()), Sessions(other, 60, Ticker())
        session = here.start("t")
        found = there.get(session.id)

        assert found is not None
        assert found == session
        assert session.csrf == found.csrf
        there.end(session.id)
        assert here.get(session.id) is None
    finally:
        other.close()


def test_the_database_holds_nothing_that_opens_a_session_or_names_its_token(
    store: SqlStore,
) -> None:
    """The stored row is keyed by a digest of the cookie's value, and the token is a MAC keyed
    by that value: neither the cookie, nor the token, nor the token's plain digest is stored;
    the session still knows which token it signed in with."""
    token = "operator-token-1"
    session = Sessions(store, 60, Ticker()).start(token)
    with store.engine.connect() as conn:
        [row] = conn.execute(sa.select(dashboard_sessions)).all()
    stored = " ".join(str(value) for value in row)

    for secret in (session.id, token, hashlib.sha256(token.encode()).hexdigest(), session.csrf):
        assert secret not in stored
    assert session.signed_in_with(["other", token])
    assert not session.signed_in_with(["other", ""])
    # A token that is the CSRF token's own message still gives a MAC unlike the CSRF token.
    odd = Sessions(store, 60, Ticker()).start("csrf")
    assert odd.token_mac != odd.csrf


def test_a_shorter_lifetime_shortens_the_sessions_already_given_out(store: SqlStore) -> None:
    """A session lives for the lifetime of the daemon reading it: one started for 600 s is
    over after 61 s for a daemon restarted with session_lifetime = 60."""
    now = Ticker()
    session = Sessions(store, 600, now).start("t")
    now.at += 61

    assert Sessions(store, 600, now).get(session.id) is not None
    assert Sessions(store, 60, now).get(session.id) is None
    assert 0 == Sessions(store, 60, now).count()


def test_sessions_are_bounded_dropping_the_oldest(store: SqlStore) -> None:
    """A flood of sign-ins keeps at most as many sessions as the bound, the newest."""
    now = Ticker()
    sessions = Sessions(store, 60, now, keep=5)
    started = []
    for _ in range(8):
        started.append(sessions.start("t"))
        now.at += 1

    assert 5 == sessions.count()
    assert [None] * 3 == [sessions.get(s.id) for s in started[:3]]
    assert started[3:] == [sessions.get(s.id) for s in started[3:]]


def test_csrf_and_token_checks_accept_only_exact_values(store: SqlStore) -> None:
    """The CSRF field must be the session's own token; a sign-in token must be listed."""
    session = Sessions(store, 60, Ticker()).start("t")

    assert csrf_ok(session, session.csrf)
    assert not csrf_ok(session, session.csrf[:-1])
    assert not csrf_ok(session, None)
    assert tokens_match("b", ["a", "b"])
    assert not tokens_match("c", ["a", "b"])
    assert not tokens_match("", [])


# -- activity and charts ---------------------------------------------------------------------


def test_activity_counts_per_minute_over_the_last_hour() -> None:
    """Counts land in their minute; minutes older than the window fall out."""
    now = Ticker(60 * 1000)
    activity = Activity(now)
    activity.count(Series.POLLS, 5)
    now.at += 60
    activity.count(Series.POLLS, 2)
    activity.count(Series.WEBHOOKS)

    polls = activity.per_minute(Series.POLLS)
    assert WINDOW_MINUTES == len(polls)
    assert [5, 2] == polls[-2:]
    assert [0] * 59 + [1] == activity.per_minute(Series.WEBHOOKS)
    now.at += 60 * WINDOW_MINUTES
    assert [0] * WINDOW_MINUTES == activity.per_minute(Series.POLLS)


def test_activity_keeps_the_newest_relay_errors_first_and_cut() -> None:
    """The error ring holds ERRORS_KEPT entries, newest first, messages cut to size."""
    activity = Activity(Ticker())
    for n in range(ERRORS_KEPT + 5):
        activity.relay_error("luma", "500", f"boom {n}" + "x" * 1000)

    errors = activity.recent_errors()
    assert ERRORS_KEPT == len(errors)
    assert errors[0].message.startswith(f"boom {ERRORS_KEPT + 4}")
    assert 300 == len(errors[0].message)


def test_chart_bars_scale_to_the_peak_and_label_their_minute() -> None:
    """The tallest bar fills the height; an empty hour draws nothing tall."""
    drawn = chart.per_minute("t", [0, 5, 10])

    assert (10, 15) == (drawn.peak, drawn.total)
    assert [0.0, chart.HEIGHT / 2, chart.HEIGHT] == [b.height for b in drawn.bars]
    assert ["2 min ago", "1 min ago", "this minute"] == [b.label for b in drawn.bars]
    assert all(b.height == 0 for b in chart.per_minute("t", [0] * 60).bars)


# -- queries (SQLite and PostgreSQL) ---------------------------------------------------------


def test_task_search_matches_id_or_metadata_any_case_with_wildcards_as_text(
    store: SqlStore,
) -> None:
    """Text search reads ids and metadata; % and _ match only themselves."""
    store.register(Registration("luma", ["Alpha_1", "alphax1"]), NOW)
    store.register(Registration("suno", ["s-1"], metadata={"who": "100% Zed"}), NOW)
    queries = DashboardQueries(store)

    def ids(**kwargs: Any) -> list[str]:
        return [t.task_id for t in queries.tasks_page(**kwargs).tasks]

    assert ["alphax1", "Alpha_1"] == ids(text="ALPHA")
    assert ["Alpha_1"] == ids(text="a_1")
    assert ["s-1"] == ids(text="0% zed")
    assert ["s-1"] == ids(text="zed", platform="suno")
    assert [] == ids(text="zed", status="completed")
    exact = queries.tasks_page(text="s-1", platforms=["luma", "suno"]).exact
    assert [("suno", "s-1")] == [(t.platform, t.task_id) for t in exact]


def test_task_search_finds_metadata_text_as_typed_though_stored_json_escapes_it(
    store: SqlStore,
) -> None:
    """Metadata is stored as json.dumps writes it (\\uXXXX, \\"), yet a search for non-ASCII
    text, quotes or a backslash finds it as typed, the same on both databases: ASCII case
    never matters, a non-ASCII letter of a value matches as typed, and a character typed
    next to escaped text never matches the JSON's own syntax (a closing quote, say).
    """
    store.register(
        Registration(
            "luma",
            ["jp"],
            metadata={"jp": "日本語", "note": '<b>bold</b> & "quoted"', "path": "C:\\temp"},
        ),
        NOW,
    )
    store.register(Registration("luma", ["uni"], metadata={"name": "Ünïcødé 日本"}), NOW)
    store.register(Registration("luma", ["ascii"], metadata={"name": "plain u00e9"}), NOW)
    store.register(Registration("luma", ["mixed"], metadata={"n": "café", "n2": "é\nx"}), NOW)
    queries = DashboardQueries(store)

    def ids(text: str) -> list[str]:
        return [t.task_id for t in queries.tasks_page(text=text).tasks]

    assert ["jp"] == ids("日本語")
    assert ["uni", "jp"] == ids("日本")
    assert ["uni"] == ids("Ünïcødé")
    assert ["mixed", "uni"] == ids("é")  # not "plain u00e9": the escape's backslash counts
    assert ["jp"] == ids('"QUOTED"')
    assert ["jp"] == ids("<b>bold</b> & ")
    assert ["jp"] == ids("c:\\TEMP")
    assert ["jp"] == ids('"jp"')  # a key, as the JSON text holds it
    assert [] == ids("naïve")
    assert [] == ids("üNÏCØDÉ")
    assert [] == ids('é"')  # café's closing quote is JSON, not text
    assert [] == ids("é\\")  # nor is the backslash of é's own escape, or of \\n


def test_task_pages_go_older_and_a_search_reads_a_bounded_share_per_page(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages follow one another newest first; a search out of budget stops and offers more."""
    monkeypatch.setattr(dashboard_queries, "SEARCH_CHUNK", 4)
    store.register(Registration("luma", [f"t{n}" for n in range(10)]), NOW)
    queries = DashboardQueries(store)

    first = queries.tasks_page(limit=4)
    second = queries.tasks_page(limit=4, before=first.next_before)
    assert ["t9", "t8", "t7", "t6"] == [t.task_id for t in first.tasks]
    assert ["t5", "t4", "t3", "t2"] == [t.task_id for t in second.tasks]

    pages = [queries.tasks_page(text="t", limit=50, budget=0)]  # one chunk per page
    while pages[-1].next_before is not None:
        pages.append(queries.tasks_page(text="t", before=pages[-1].next_before, budget=0))
    assert [["t9", "t8", "t7", "t6"], ["t5", "t4", "t3", "t2"], ["t1", "t0"]] == [
        [t.task_id for t in page.tasks] for page in pages
    ]
    whole = queries.tasks_page(text="t", limit=50, budget=60)
    assert (10, None) == (len(whole.tasks), whole.next_before)


@pytest.mark.parametrize("few", [dashboard_queries.FEW_IN_STATE, 0])
def test_deliveries_page_pages_one_state_newest_first_by_either_route(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch, few: int
) -> None:
    """Rare states come from the state index, common ones from the table: same pages."""
    monkeypatch.setattr(dashboard_queries, "FEW_IN_STATE", few)
    queue_events(store, "a", "b", "c", "d", "e", now=NOW)
    jobs = sorted(claim_jobs(store, NOW), key=lambda j: j.pk)
    store.finish_attempts(
        [outcome(j, "dead", NOW, status_code=500) for j in jobs[:3]]
        + [outcome(j, "delivered", NOW) for j in jobs[3:4]]
    )
    queries = DashboardQueries(store)

    first, cursor = queries.deliveries_page(state=DeliveryState.DEAD, limit=2)
    second, last = queries.deliveries_page(state=DeliveryState.DEAD, limit=2, before=cursor)

    dead = [j.pk for j in reversed(jobs[:3])]
    assert dead == [d.id for d in first + second]
    assert last is None
    assert all(d.state == "dead" and len(d.log) == 1 for d in first + second)
    pending, _ = queries.deliveries_page(state=DeliveryState.PENDING)
    assert [jobs[4].pk] == [d.id for d in pending]


# -- refused sign-ins ------------------------------------------------------------------------


def test_a_client_is_held_back_after_too_many_refused_sign_ins_until_the_oldest_ages_out() -> None:
    """MAX_SIGN_IN_FAILURES refusals within the window make that client (only) wait."""
    now = Ticker()
    throttle = SignInThrottle(now)
    blocked = [throttle.refused("10.0.0.1") for _ in range(MAX_SIGN_IN_FAILURES - 1)]
    assert not any(blocked)
    assert 0.0 == throttle.wait("10.0.0.1")

    now.at += 10
    assert throttle.refused("10.0.0.1")  # the last one allowed: from now on it waits
    assert SIGN_IN_WINDOW - 10 == throttle.wait("10.0.0.1")
    assert 0.0 == throttle.wait("10.0.0.2")
    now.at += SIGN_IN_WINDOW - 11
    assert 1.0 == throttle.wait("10.0.0.1")
    now.at += 1
    assert 0.0 == throttle.wait("10.0.0.1")  # the first nine aged out


def test_the_throttle_remembers_a_bounded_number_of_clients() -> None:
    """A flood from many addresses keeps at most MAX_TRACKED_CLIENTS, forgetting the oldest."""
    now = Ticker()
    throttle = SignInThrottle(now)
    for _ in range(MAX_SIGN_IN_FAILURES):
        throttle.refused("first")
    assert throttle.wait("first") > 0
    for n in range(MAX_TRACKED_CLIENTS):
        throttle.refused(f"10.{n}")
    assert 0.0 == throttle.wait("first")
