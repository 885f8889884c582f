"""The poll cycle against the simulated relay over real HTTP, with time under test control."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import time
import types
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from conftest import base_config, eventually, merge
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from tracker import config, events, platforms
from tracker.clock import FakeClock, SystemClock
from tracker.metrics import Metrics
from tracker.pipeline import Pipeline
from tracker.platforms.base import UpstreamError
from tracker.poller import NOT_FOUND_REASON, PollEngine, Poller, rounds
from tracker.poller import engine as engine_module
from tracker.poller.drain import MAX_RELAY_PAUSE, RELAY_PAUSE, relay_pause
from tracker.poller.report import CycleReport
from tracker.poller.rounds import DrainWork
from tracker.store import Registration, SqlStore
from tracker.store.sql import deliveries, polls, tasks
from tracker.testing.simulator import SimulatedRelay


class RealTransport(httpx.AsyncBaseTransport):
    """httpx's own transport, each answer read whole; the tests' transports add to it."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        await response.aread()
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class CountingTransport(RealTransport):
    """A real HTTP transport that also counts requests in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = 0
        self.peak = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            return await super().handle_async_request(request)
        finally:
            self.in_flight -= 1


class Rig:
    """A poller over a SQLite store, the fixture relay and a fake clock."""

    def __init__(self, settings: config.Settings, store: SqlStore) -> None:
        self.settings = settings
        self.store = store
        self.clock = FakeClock()
        self.transport = CountingTransport()
        self.client = httpx.AsyncClient(transport=self.transport)
        self.poller = Poller(
            store=store,
            platforms=platforms.build(settings),
            client=self.client,
            clock=self.clock,
            settings=settings.poll,
            targets=events.Targets(settings.webhooks),
            metrics=Metrics(),
        )

    def register(self, *ids: str, platform: str = "luma", **kw: Any) -> None:
        self.store.register(Registration(platform, list(ids), **kw), self.clock.now())

    async def cycle(self, advance: float = 0.0) -> Any:
        if advance:
            self.clock.advance(advance)
        return await self.poller.run_cycle()

    def task(self, task_id: str, platform: str = "luma") -> Any:
        task = self.store.get(platform, task_id)
        assert task is not None
        return task

    def outbox(self) -> list[Any]:
        with self.store.engine.connect() as conn:
            return list(conn.execute(sa.select(deliveries).order_by(deliveries.c.id)))


@pytest.fixture(name="rig_for")
async def _rig_for(
    settings_for: Callable[..., config.Settings], sqlite_url: str
) -> AsyncIterator[Callable[..., Rig]]:
    stores: list[SqlStore] = []
    rigs: list[Rig] = []

    def make(**overrides: Any) -> Rig:
        settings = settings_for(**overrides)
        store = SqlStore.from_url(sqlite_url)
        store.create_schema()
        stores.append(store)
        rigs.append(Rig(settings, store))
        return rigs[-1]

    yield make
    for rig in rigs:
        await rig.client.aclose()
    for store in stores:
        store.close()


@pytest.fixture(name="rig")
async def _rig(rig_for: Callable[..., Rig]) -> Rig:
    return rig_for()


async def test_statuses_move_with_the_relay_and_fire_one_final_event(
    rig: Rig, relay: SimulatedRelay
) -> None:
    """Each status change is recorded in order; only the final one fires a webhook event."""
    rig.register("t1", metadata={"user": 7})
    relay.set("luma", "t1", "SUBMITTED", "10%")
    await rig.cycle()
    relay.set("luma", "t1", "IN_PROGRESS", "45%")
    await rig.cycle(advance=1)
    relay.set("luma", "t1", "SUCCESS", "100%")
    await rig.cycle(advance=1)

    task = rig.task("t1")
    assert "completed" == task.status
    assert 100 == task.progress
    assert "100%" == task.upstream_progress
    assert task.finished_at is not None
    assert [("pending", "queued"), ("queued", "in_progress"), ("in_progress", "completed")] == [
        (t.from_status, t.to_status) for t in task.transitions
    ]
    [event] = rig.outbox()
    assert "task.completed" == event.event_type
    assert '"metadata":{"user":7}' in event.payload
    assert '"previous_status":"in_progress"' in event.payload


async def test_failure_carries_the_relay_reason(rig: Rig, relay: SimulatedRelay) -> None:
    """A FAILURE becomes failed with fail_reason, and one task.failed event."""
    rig.register("t1")
    relay.set("luma", "t1", "FAILURE", "100%", fail_reason="content policy")
    await rig.cycle()

    task = rig.task("t1")
    assert ("failed", "content policy") == (task.status, task.fail_reason)
    assert ["task.failed"] == [e.event_type for e in rig.outbox()]


async def test_unchanged_answers_write_no_task_row(rig: Rig, relay: SimulatedRelay) -> None:
    """A task whose state did not change keeps its updated_at: no row write beyond scheduling."""
    rig.register("t1")
    relay.set("luma", "t1", "IN_PROGRESS", "30%")
    await rig.cycle()
    before = rig.task("t1").updated_at
    await rig.cycle(advance=30)
    await rig.cycle(advance=30)

    assert before == rig.task("t1").updated_at
    assert 3 == len(relay.requests)


async def test_final_tasks_are_never_asked_again(rig: Rig, relay: SimulatedRelay) -> None:
    """Once final, a task is left alone even when the relay later says otherwise."""
    rig.register("t1")
    relay.set("luma", "t1", "SUCCESS", "100%")
    await rig.cycle()
    relay.set("luma", "t1", "IN_PROGRESS", "10%")
    relay.clear_requests()
    await rig.cycle(advance=600)

    assert [] == relay.requests
    assert "completed" == rig.task("t1").status


async def test_a_drains_lag_names_the_platform_of_its_most_overdue_task(rig: Rig) -> None:
    """Luma's task 5 s overdue, suno's 30 s: the report's lag is suno's, and says so, as does
    the lag warning; a drain of several lines keeps the platform of its worst one."""
    now = rig.clock.now()
    rig.store.register(Registration("luma", ["l1"]), now - timedelta(seconds=5))
    rig.store.register(Registration("suno", ["s1"]), now - timedelta(seconds=30))
    with capture_logs() as logs:
        report = await rig.cycle()
        PollEngine(rig.poller, rig.clock).check_lag(report)

    assert (30.0, "suno") == (round(report.lag, 1), report.lagging)
    [warning] = [e for e in logs if e["event"] == "poll_lagging"]
    assert ("suno", 30.0) == (warning["platform"], warning["lag_seconds"])
    assert warning["hint"].startswith("polls of suno run 30 s late")
    parts = [CycleReport(lag=2.0, lagging="luma"), CycleReport(lag=9.0, lagging="suno")]
    assert (9.0, "suno") == (CycleReport.total(parts).lag, CycleReport.total(parts).lagging)


async def test_a_batch_claimed_on_time_that_waits_for_the_rate_limit_shows_as_lag(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """Real time: twelve tasks due now (each finished at the relay, so asked once), one id a
    request, four lanes, two requests a second. Each claim finds its tasks on time, but the
    last batches wait in their lanes for the rate limit for seconds: the drain's lag says so
    (and the warning names the rate limit), where a lag taken only at the claims said well
    under a second."""
    rig = rig_for(poll={"batch_size": 1, "concurrency": 4}, platforms={"luma": {"rate_limit": 2}})
    rig.clock = SystemClock()
    rig.poller.clock = rig.clock
    ids = [f"t{n:02d}" for n in range(12)]
    for task_id in ids:
        relay.set("luma", task_id, "SUCCESS", "100%")
    rig.register(*ids)

    with capture_logs() as logs:
        report = await rig.cycle()
        PollEngine(rig.poller, rig.clock).check_lag(report)

    starts = sorted(r.at for r in relay.requests)
    assert 12 == len(starts) == report.requests
    waited = starts[-1] - starts[0]
    assert waited >= 4.5  # 11 gaps at two a second
    # The last request went out about `waited` after the tasks fell due.
    assert waited - 0.5 <= report.lag <= waited + 2.0
    assert "luma" == report.lagging
    [warning] = [e for e in logs if e["event"] == "poll_lagging"]
    assert "platforms.luma.rate_limit" == warning["setting"]


async def test_a_lag_left_by_downtime_is_said_to_be_caught_up_not_blamed_on_a_setting(
    rig: Rig,
) -> None:
    """A task due 30 s before the engine started (the daemon was down): the warning says it
    fell due before the start and is being caught up, naming the setting only should the lag
    stay. A lag of tasks due after the start is blamed on capacity, as ever."""
    rig.store.register(Registration("luma", ["old"]), rig.clock.now() - timedelta(seconds=30))
    engine = PollEngine(rig.poller, rig.clock)
    stop = asyncio.Event()
    with capture_logs() as logs:
        running = asyncio.create_task(engine.run(stop))
        await eventually(
            lambda: any(e["event"] == "poll_lagging" for e in logs), 5, "a lag warning"
        )
        stop.set()
        await running
    [warning] = [e for e in logs if e["event"] == "poll_lagging"]
    assert warning["hint"].startswith(
        "polls of luma run 30 s late: they fell due before this daemon started"
    )
    assert warning["hint"].endswith("if the lag does not shrink, raise poll.concurrency")

    after_start = PollEngine(rig.poller, rig.clock)
    after_start.started_at = rig.clock.now().timestamp() - 100
    with capture_logs() as logs:
        after_start.check_lag(CycleReport(lag=30.0, lagging="luma"))
    [warning] = logs
    assert (
        "polls of luma run 30 s late; raise poll.concurrency if the relay allows it"
        == (warning["hint"])
    )


def test_the_lag_warning_is_logged_at_most_once_a_minute(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog that lasts: poll_lagging once, then not again until a minute has passed on
    the monotonic clock, however many drains report the lag meanwhile; a lag within the
    interval is no warning at all."""
    monotonic = [1000.0]
    monkeypatch.setattr(
        engine_module, "time", types.SimpleNamespace(monotonic=lambda: monotonic[0])
    )
    engine = PollEngine(rig.poller, rig.clock)
    late = CycleReport(lag=120.0, lagging="luma")
    warned: list[float] = []
    with capture_logs() as logs:
        for at in (1000.0, 1001.0, 1059.9, 1060.0, 1100.0, 1120.5):
            monotonic[0] = at
            before = len(logs)
            engine.check_lag(late)
            engine.check_lag(CycleReport(lag=rig.poller.settings.interval, lagging="luma"))
            if len(logs) > before:
                warned.append(at)

    assert [1000.0, 1060.0, 1120.5] == warned
    assert all(e["event"] == "poll_lagging" for e in logs)


async def test_batches_respect_batch_size_and_concurrency(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """250 due ids go out as requests of at most batch_size ids, at most concurrency at once."""
    rig = rig_for(poll={"batch_size": 40, "concurrency": 2})
    relay.slow_seconds = 0.05
    relay.fail_next("slow", 7)
    rig.register(*(f"id-{n}" for n in range(250)))
    report = await rig.cycle()

    sizes = [len(r.json_body["ids"]) for r in relay.requests]
    assert 250 == sum(sizes)
    assert max(sizes) <= 40
    assert 7 == report.requests
    assert 2 == rig.transport.peak
    assert all(r.headers["authorization"] == "Bearer sk-sim" for r in relay.requests)


# A 429 pauses the relay for real seconds first: its own tests are below.
@pytest.mark.parametrize("fault", ["http_500", "code_error", "bad_json", "wrong_shape"])
async def test_relay_errors_change_nothing_and_ask_again_next_cycle(
    rig: Rig, relay: SimulatedRelay, fault: str
) -> None:
    """An unusable answer changes no task, is logged with what the relay said, and is retried."""
    rig.register("t1")
    relay.set("luma", "t1", "SUCCESS", "100%")
    relay.fail_next(fault)
    with capture_logs() as logs:
        report = await rig.cycle()

    assert 1 == report.errors
    assert "pending" == rig.task("t1").status
    assert [] == rig.outbox()
    [line] = [entry for entry in logs if entry["event"] == "upstream_error"]
    assert line["log_level"] == "warning"
    assert line["error"]
    assert "sk-sim" not in str(logs)

    await rig.cycle(advance=rig.settings.poll.interval)
    assert "completed" == rig.task("t1").status


@pytest.mark.parametrize("fault", ["echo_key_code", "echo_key"])
async def test_a_relay_error_quoting_the_key_reaches_neither_the_log_nor_the_dashboard_feed(
    rig: Rig, relay: SimulatedRelay, fault: str
) -> None:
    """A relay refusing the key may quote it: in its JSON error message (HTTP 200) or on an
    error page. The warning and the dashboard's recent relay errors say what it said, with
    the key redacted."""
    rig.register("t1")
    relay.fail_next(fault)
    with capture_logs() as logs:
        report = await rig.cycle()

    assert 1 == report.errors
    [line] = [entry for entry in logs if entry["event"] == "upstream_error"]
    [shown] = rig.poller.metrics.activity.recent_errors()
    for said in (line["error"], shown.message):
        assert "[redacted]" in said
        assert "sk-sim" not in said


async def test_a_relay_answering_429_is_asked_nothing_more_for_its_retry_after(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """Real time: the relay answers the first request 429 with Retry-After: 1. The batches
    behind it are neither sent into the pause nor held in their lane (where they would hold up
    every other relay's claims): planned for the pause's end, they go out a second later. The
    wait counts as the platform's rate wait, so the lag warning names its rate_limit; the log
    line says the pause."""
    rig = rig_for(poll={"batch_size": 1, "concurrency": 1})
    rig.register("t1", "t2", "t3")
    relay.fail_next("http_429")
    with capture_logs() as logs:
        report = await rig.cycle()

    assert 1 == len(relay.requests)
    assert report.rate_waits["luma"] >= 0.9
    assert "platforms.luma.rate_limit" == PollEngine(rig.poller, rig.clock).helpful_setting(report)
    [line] = [e for e in logs if e["event"] == "upstream_error"]
    assert 1.0 == line["relay_paused_seconds"]
    # Planned the look-ahead beyond the pause, as a claim takes tasks that much early.
    planned = [next_poll_at(rig, task_id) - rig.poller.ahead() for task_id in ("t2", "t3")]
    assert all(0.9 <= p - rig.clock.now().timestamp() <= 1.0 for p in planned)

    await asyncio.sleep(1.0)  # the pause, on the real clock
    await rig.cycle(advance=1.0)
    sent = sorted(r.at for r in relay.requests)
    assert 4 == len(sent)  # t1 again (retried an interval on), t2 and t3
    assert sent[1] - sent[0] >= 0.95


async def test_a_drain_told_to_stop_does_not_wait_out_a_relays_pause(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """Real time: the relay paused for a second by a 429, the drain is told to stop 0.2 s in;
    it ends at once, its unasked batches left to lapse, not after the pause."""
    rig = rig_for(poll={"batch_size": 1, "concurrency": 1})
    rig.register("t1", "t2", "t3")
    relay.fail_next("http_429")
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.2, stop.set)
    started = time.monotonic()
    report = await rig.poller.run_cycle(until=stop)

    assert time.monotonic() - started < 0.7
    assert 1 == len(relay.requests)
    assert (1, 0) == (report.errors, report.changed)


@pytest.mark.parametrize(
    ("status", "retry_after", "pause"),
    [
        (429, None, RELAY_PAUSE),
        (429, "5", 5.0),
        (429, "86400", MAX_RELAY_PAUSE),  # the relay cannot park polling for a day
        (429, "Thu, 01 Jan 2026 00:00:07 GMT", 7.0),  # an HTTP-date, from the answer's time
        (429, "0", None),
        (429, "soon", RELAY_PAUSE),  # unreadable: as if absent
        (503, "3", 3.0),
        (503, None, None),  # a relay down, not asking for time: the usual retry
        (500, "3", None),
    ],
)
def test_the_relays_pause_follows_its_retry_after_within_bounds(
    status: int, retry_after: str | None, pause: float | None
) -> None:
    """429 pauses the relay for its Retry-After (RELAY_PAUSE without one), a 503 only with one;
    never longer than MAX_RELAY_PAUSE."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    error = UpstreamError("HTTP", status_code=status, retry_after=retry_after)
    assert pause == relay_pause(error, now)


@pytest.mark.parametrize(
    "error", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.ReadError("reset")]
)
def test_a_relay_that_does_not_answer_is_paused_longer_for_each_failure_in_a_row(
    error: httpx.TransportError,
) -> None:
    """No answer at all (refused, reset, timed out): RELAY_PAUSE, doubled for each failure in
    a row, at most MAX_RELAY_PAUSE; while it is down the relay gets a round of requests now
    and then, not every batch waiting out its timeout."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    pauses = [relay_pause(error, now, failures) for failures in (1, 2, 3, 4, 5, 50)]

    assert [2.0, 4.0, 8.0, 16.0, 30.0, 30.0] == pauses
    assert relay_pause(UpstreamError("HTTP 500: boom", status_code=500), now, 5) is None


async def test_any_answer_ends_a_row_of_failures_without_one(
    rig: Rig, relay: SimulatedRelay
) -> None:
    """Real time: a reset connection pauses the relay 2 s; an HTTP 500 after it is an answer,
    if not a useful one, so the next reset starts a new row: 2 s again, not 4."""
    rig.register("t1")
    for fault in ("reset", "http_500", "reset"):
        relay.fail_next(fault)
    with capture_logs() as logs:
        await rig.cycle()
        await asyncio.sleep(RELAY_PAUSE + 0.05)
        await rig.cycle(advance=1)
        await rig.cycle(advance=1)

    errors = [e for e in logs if e["event"] == "upstream_error"]
    assert [RELAY_PAUSE, None, RELAY_PAUSE] == [e.get("relay_paused_seconds") for e in errors]
    assert 3 == len(relay.requests)


async def test_a_relay_that_stopped_answering_is_asked_one_request_at_a_time(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """Real time: four batches out at once all reset (one round: paused 2 s, not 16). After
    the pause, with eight batches due, one request goes out (the probe) and the others are
    planned for when it has had its time, not counted as rate waits; once it is answered,
    the relay is asked as usual."""
    rig = rig_for(poll={"batch_size": 1, "concurrency": 4})
    ids = [f"t{n}" for n in range(8)]
    rig.register(*ids[:4])
    relay.slow_seconds = 0.2
    for _ in range(4):
        relay.fail_next("reset")
    with capture_logs() as logs:
        await rig.cycle()
    pauses = [e["relay_paused_seconds"] for e in logs if e["event"] == "upstream_error"]
    assert [RELAY_PAUSE] * 4 == pauses
    relay.clear_requests()

    await asyncio.sleep(RELAY_PAUSE + 0.05)
    rig.register(*ids[4:])
    relay.fail_next("slow")  # the probe takes 0.2 s: the other batches see it out
    report = await rig.cycle(advance=1)

    assert 1 == len(relay.requests)
    assert 1 == report.requests
    assert {} == report.rate_waits  # a relay that is down: raising rate_limit cannot help
    relay.clear_requests()
    # Planned the probe's timeout on, and the look-ahead beyond: claimed once that has passed.
    await rig.cycle(advance=rig.settings.upstream.timeout + 0.01)
    assert 7 <= len(relay.requests)


async def test_after_a_429_pause_the_relay_is_asked_one_request_at_a_time(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """Real time: four batches out at once all answered 429 (Retry-After: 1). After the
    pause, with eight batches due, one request goes out (a probe), not four at once into the
    same limit; the others are planned RELAY_PAUSE on (counted as rate waits: the relay asked
    for them), and once the probe is answered the relay is asked as usual."""
    rig = rig_for(poll={"batch_size": 1, "concurrency": 4})
    ids = [f"t{n}" for n in range(8)]
    rig.register(*ids[:4])
    relay.slow_seconds = 1.0  # outlasts the claims of the other batches, on a loaded machine
    for _ in range(4):
        relay.fail_next("http_429")
    with capture_logs() as logs:
        await rig.cycle()
    pauses = [e["relay_paused_seconds"] for e in logs if e["event"] == "upstream_error"]
    assert [1.0] * 4 == pauses
    relay.clear_requests()

    await asyncio.sleep(1.05)
    rig.register(*ids[4:])
    relay.fail_next("slow")  # the probe takes 1 s: the other batches see it out
    report = await rig.cycle(advance=1)

    assert 1 == len(relay.requests) == report.requests
    assert report.rate_waits["luma"] >= 7 * RELAY_PAUSE
    relay.clear_requests()
    await rig.cycle(advance=RELAY_PAUSE + 0.01)
    assert 7 <= len(relay.requests)


async def test_a_sent_probe_after_a_429_is_not_called_off_at_a_drains_end(
    rig: Rig, relay: SimulatedRelay
) -> None:
    """Real time: after a 429 pause the next request is a probe, which the relay counts
    against its limit once sent; a drain's end 0.2 s after it gives it END_GRACE like any sent
    request (only a silent relay's probe is called off at once): its answer is recorded."""
    relay.set("luma", "t1", "SUCCESS", "100%")
    rig.register("t1")
    relay.fail_next("http_429")
    await rig.cycle()
    await asyncio.sleep(1.05)  # the pause (Retry-After: 1)
    relay.slow_seconds = 0.5
    relay.fail_next("slow")
    relay.clear_requests()

    async def call_off_once_it_is_out() -> None:
        await requests_seen(relay, 1)
        await asyncio.sleep(0.2)
        rig.poller.call_off_requests()

    calling_off = asyncio.create_task(call_off_once_it_is_out())
    await rig.cycle(advance=1)
    await calling_off

    assert "completed" == rig.task("t1").status


async def test_a_probe_called_off_leaves_its_tasks_due_when_they_were_and_counts_no_failure(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """Real time: after a reset (the relay paused 2 s), the next request is a probe, and the
    relay holds it. Called off 0.3 s in, as a drain's end calls it off, the cycle ends then,
    not at the 3 s timeout; the task is due when it was (its place in due order kept), and
    nothing counts against the relay: no error, no longer pause."""
    rig = rig_for(upstream={"timeout": 3})
    rig.register("t1")
    relay.fail_next("reset")
    await rig.cycle()
    await asyncio.sleep(RELAY_PAUSE + 0.05)
    rig.clock.advance(rig.settings.poll.interval)
    due = next_poll_at(rig, "t1")
    relay.fail_next("stall")
    asyncio.get_running_loop().call_later(0.3, rig.poller.call_off_requests)
    started = time.monotonic()
    with capture_logs() as logs:
        report = await rig.cycle()

    assert time.monotonic() - started < 1.0
    assert 2 == len(relay.requests)
    assert (1, 0) == (report.requests, report.errors)
    assert not [e for e in logs if e["event"] == "upstream_error"]
    assert due == next_poll_at(rig, "t1")


class TimeoutOnCancel(RealTransport):
    """A real transport whose request, cancelled, ends in httpx's read timeout instead: what a
    call-off meets when it lands in the very step the request's own timeout fires, and the
    timeout takes the cancel for its own."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except asyncio.CancelledError:
            raise httpx.ReadTimeout("timed out", request=request) from None


async def test_a_request_called_off_as_its_timeout_fires_counts_no_failure(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """Real time: the relay holds the request; the drain's end (0.3 s in) gives it END_GRACE
    from when it was sent, then calls it off, and the transport ends it as a read timeout.
    Called off all the same: no error, no pause of the relay, the task due when it was, and
    the next cycle asks the relay at once."""
    rig = rig_for(upstream={"timeout": 3})
    rig.register("t1")
    due = next_poll_at(rig, "t1")
    rig.poller.client = httpx.AsyncClient(transport=TimeoutOnCancel())
    relay.fail_next("stall")
    asyncio.get_running_loop().call_later(0.3, rig.poller.call_off_requests)
    try:
        with capture_logs() as logs:
            report = await rig.cycle()
        after = next_poll_at(rig, "t1")
        relay.set("luma", "t1", "SUCCESS", "100%")
        again = await rig.cycle()
    finally:
        await rig.poller.client.aclose()

    assert (1, 0) == (report.requests, report.errors)
    assert not [e for e in logs if e["event"] == "upstream_error"]
    assert due == after
    assert (1, 1) == (again.requests, again.changed)


class SettingOnAnswer(RealTransport):
    """A real transport that sets ``event`` once the first answer is read: in the very step
    the lane goes on to its next batch, before anything else on the loop runs."""

    def __init__(self, event: asyncio.Event) -> None:
        super().__init__()
        self.event = event

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        self.event.set()
        return response


async def test_a_stop_set_as_an_answer_comes_sends_no_other_batch(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """One lane, batches of one, the relay answering after 0.2 s: the stop is set as the
    first answer is read, and the lane, going on at once, sends none of the batches queued
    behind it; their tasks are due when they were, the answer is recorded."""
    rig = rig_for(poll={"batch_size": 1, "concurrency": 1})
    for task_id in ("t1", "t2", "t3"):
        relay.set("luma", task_id, "IN_PROGRESS", "50%")
    rig.register("t1", "t2", "t3")
    due = {task_id: next_poll_at(rig, task_id) for task_id in ("t1", "t2", "t3")}
    relay.slow_seconds = 0.2
    relay.fail_next("slow")
    stop = asyncio.Event()
    rig.poller.client = httpx.AsyncClient(transport=SettingOnAnswer(stop))
    try:
        report = await rig.poller.run_cycle(until=stop)
    finally:
        await rig.poller.client.aclose()

    assert 1 == len(relay.requests) == report.requests
    [asked] = relay.requests[0].json_body["ids"]
    waited = sorted(set(due) - {asked})
    assert [due[task_id] for task_id in waited] == [next_poll_at(rig, t) for t in waited]
    assert "in_progress" == rig.task(asked).status
    assert next_poll_at(rig, asked) > due[asked]


async def test_requests_waiting_for_their_rate_limit_are_called_off_at_once(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """Real time: four batches of one at a rate limit of one request a second. The first
    goes out; the other three wait their turn in their lanes. Called off 0.2 s after it, as
    a drain's end calls them off, none of them is sent: the cycle ends then, not 3 s later,
    and their tasks are due when they were."""
    rig = rig_for(poll={"batch_size": 1, "concurrency": 4}, platforms={"luma": {"rate_limit": 1}})
    for task_id in ("t1", "t2", "t3", "t4"):
        relay.set("luma", task_id, "IN_PROGRESS", "50%")
    rig.register("t1", "t2", "t3", "t4")
    due = {task_id: next_poll_at(rig, task_id) for task_id in ("t1", "t2", "t3", "t4")}

    async def call_off_once_the_first_is_out() -> float:
        deadline = time.monotonic() + 5
        while not relay.requests:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        rig.poller.call_off_requests()
        return time.monotonic()

    calling_off = asyncio.create_task(call_off_once_the_first_is_out())
    report = await rig.cycle()

    assert time.monotonic() - await calling_off < 0.5
    assert 1 == len(relay.requests) == report.requests
    [asked] = relay.requests[0].json_body["ids"]
    waited = sorted(set(due) - {asked})
    assert [due[task_id] for task_id in waited] == [next_poll_at(rig, t) for t in waited]
    assert next_poll_at(rig, asked) > due[asked]


async def test_a_stop_after_a_drains_end_lets_the_request_sent_finish(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """Real time: the relay holds the one request 1.5 s. The drain's end (0.2 s in) gives it
    until END_GRACE after it was sent; a stop at 0.4 s takes that grace back, as a stop lets
    the requests sent finish: the answer comes and is recorded."""
    rig = rig_for(upstream={"timeout": 5})
    relay.slow_seconds = 1.5
    relay.fail_next("slow")
    relay.set("luma", "t1", "SUCCESS", "100%")
    rig.register("t1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.call_later(0.2, rig.poller.call_off_requests)
    loop.call_later(0.4, stop.set)
    started = time.monotonic()
    report = await rig.poller.run_cycle(until=stop)

    assert time.monotonic() - started >= 1.4
    assert (1, 0, 1) == (report.requests, report.errors, report.changed)
    assert "completed" == rig.task("t1").status


async def test_relay_timeout_changes_nothing(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """A relay slower than [upstream].timeout counts as an error, not as an answer."""
    rig = rig_for(upstream={"timeout": 0.2})
    relay.slow_seconds = 1.0
    relay.fail_next("slow")
    rig.register("t1")
    relay.set("luma", "t1", "SUCCESS", "100%")
    with capture_logs() as logs:
        report = await rig.cycle()

    assert 1 == report.errors
    assert "pending" == rig.task("t1").status
    assert any("timeout" in str(e.get("error")) for e in logs)


async def test_unknown_words_are_stored_and_logged_but_never_finish(
    rig: Rig, relay: SimulatedRelay
) -> None:
    """UNKNOWN or an unlisted word is kept as upstream_status and changes no status."""
    rig.register("t1")
    relay.set("luma", "t1", "IN_PROGRESS", "20%")
    await rig.cycle()
    relay.set("luma", "t1", "WEIRD_STATE", "20%")
    with capture_logs() as logs:
        await rig.cycle(advance=10)

    task = rig.task("t1")
    assert ("in_progress", "WEIRD_STATE") == (task.status, task.upstream_status)
    assert any(e["event"] == "unknown_upstream_status" for e in logs)


async def test_tasks_are_given_up_after_give_up_after(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """A task not final after give_up_after fails with a reason saying so, without asking."""
    rig = rig_for(poll={"give_up_after": 100})
    rig.register("t1")
    relay.set("luma", "t1", "IN_PROGRESS", "20%")
    await rig.cycle()
    relay.clear_requests()
    await rig.cycle(advance=101)

    task = rig.task("t1")
    assert "failed" == task.status
    assert "gave up after 100 s" in task.fail_reason
    assert [] == relay.requests
    assert ["task.failed"] == [e.event_type for e in rig.outbox()]


async def test_ids_missing_upstream_fail_only_after_not_found_after(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """An id the relay leaves out is not failed at once, but after not_found_after seconds."""
    relay.auto_create = False
    rig = rig_for(poll={"not_found_after": 60})
    rig.register("ghost", "back")
    await rig.cycle()
    relay.add("luma", "back")
    relay.set("luma", "back", "QUEUED", "0%")
    await rig.cycle(advance=30)
    assert "pending" == rig.task("ghost").status
    await rig.cycle(advance=31)

    assert ("failed", NOT_FOUND_REASON) == (rig.task("ghost").status, rig.task("ghost").fail_reason)
    assert "queued" == rig.task("back").status


async def test_a_relay_that_cuts_its_answer_at_100_ids_gets_the_others_asked_again(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """one-hub answers at most 100 ids per batch query, leaving the others out as if unknown.
    Asked 150, the relay answers 100: the 50 it left out are due again at once (asked by the
    engine's next drain), none is counted as missing (not_found_after would fail them all a
    minute on), the platform asks 100 at a time from then on, and the log names the setting
    to change."""
    relay.answer_cap = 100
    ids = [f"c{n:03}" for n in range(150)]
    for task_id in ids:
        relay.set("luma", task_id, "IN_PROGRESS", "50%")
    rig = rig_for(poll={"batch_size": 150, "concurrency": 1, "not_found_after": 60})
    rig.register(*ids)
    with capture_logs() as logs:
        await rig.cycle()
        await rig.cycle()  # the engine's next drain, at once: the 50 are due
        asked = [len(r.json_body["ids"]) for r in relay.requests]
        await rig.cycle(advance=61)

    assert [150, 50] == asked
    assert {"in_progress"} == {rig.task(task_id).status for task_id in ids}
    [capped] = [e for e in logs if e["event"] == "relay_answer_capped"]
    assert ("luma", 150, 100) == (capped["platform"], capped["asked"], capped["answered"])
    assert "batch_size to 100" in capped["hint"]
    assert 100 == rig.poller.platforms["luma"].batch_size


@pytest.mark.parametrize(
    ("batch_size", "setting"), [(50, "poll.batch_size"), (100, "poll.concurrency")]
)
def test_the_lag_hint_names_batch_size_only_below_what_every_relay_answers(
    rig_for: Callable[..., Rig], batch_size: int, setting: str
) -> None:
    """Lagging without rate waits, the hint names poll.batch_size while a batch platform asks
    fewer than 100 ids a request, and poll.concurrency from there on: a larger batch would be
    cut by a relay that answers at most 100 ids (one-hub)."""
    rig = rig_for(poll={"batch_size": batch_size})

    assert setting == PollEngine(rig.poller, rig.clock).helpful_setting(CycleReport(lag=60))


async def test_ids_unknown_beside_exactly_100_known_are_asked_once_more_then_missing(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """150 asked, the relay knows 100 of them: an answer of exactly 100 looks cut, so the 50
    others are due again at once, and asked in a request of their own. That answer leaves them out
    too, under no cap: they are missing, and fail after not_found_after as any unknown id."""
    relay.auto_create = False
    ids = [f"c{n:03}" for n in range(150)]
    for task_id in ids[:100]:
        relay.set("luma", task_id, "IN_PROGRESS", "50%")
    rig = rig_for(poll={"batch_size": 150, "concurrency": 1, "not_found_after": 60})
    rig.register(*ids)
    await rig.cycle()
    await rig.cycle()
    asked = [len(r.json_body["ids"]) for r in relay.requests]
    await rig.cycle(advance=61)

    assert [150, 50] == asked
    statuses = collections.Counter(rig.task(task_id).status for task_id in ids)
    assert {"in_progress": 100, "failed": 50} == statuses
    assert {NOT_FOUND_REASON} == {rig.task(task_id).fail_reason for task_id in ids[100:]}


async def test_a_task_another_claim_took_is_not_asked_after_a_renewal(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """A drain stalled past its lease; another daemon claimed its task; then the drain renewed
    its claim. The renewal moves nothing for that task, and the batch still holding it is not
    sent, as the README promises of a batch whose claim lapsed. (The renewal moved the claim's
    end all the same, so the lapse check passed and the task was polled twice.)"""
    rig = rig_for()
    rig.register("t1")
    (mine,) = rig.store.claim_due(rig.clock.now(), 10, lease=5)
    rig.clock.advance(6)
    (theirs,) = rig.store.claim_due(rig.clock.now(), 10, lease=20)  # another daemon's
    assert mine.claim is not None
    assert 0 == rig.store.renew_claim(mine.claim, rig.clock.now().timestamp() + 5)

    answer = await rig.poller.ask(rig.poller.platforms["luma"], [mine])

    assert ([], []) == (answer, relay.requests)
    assert 1 == rig.poller.report.lapsed
    assert theirs.lease_until == next_poll_at(rig, "t1")


async def test_due_order_not_id_order(rig_for: Callable[..., Rig], relay: SimulatedRelay) -> None:
    """Tasks are asked about in due-time order, whatever order they were registered in."""
    rig = rig_for(poll={"batch_size": 1, "concurrency": 1})
    start = rig.clock.now()
    for offset, task_id in ((30, "late"), (10, "early"), (20, "middle")):
        rig.store.register(Registration("luma", [task_id]), start + timedelta(seconds=offset))
    rig.clock.advance(40)
    await rig.cycle()

    assert ["early", "middle", "late"] == [r.json_body["ids"][0] for r in relay.requests]


async def test_quiet_tasks_back_off_and_moving_ones_do_not(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """A task that does not move is asked less and less often, never beyond max_interval."""
    rig = rig_for(poll={"interval": 1, "max_interval": 20})
    rig.register("quiet")
    relay.set("luma", "quiet", "IN_PROGRESS", "50%")
    for _ in range(300):
        await rig.cycle(advance=1)

    asked = len(relay.requests)
    assert 300 / 20 <= asked < 300 / 4


async def test_started_and_progress_events_when_configured(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """With task.started and task.progress enabled, each fires once per move."""
    rig = rig_for(
        webhooks={"events": ["task.completed", "task.failed", "task.started", "task.progress"]}
    )
    rig.register("t1")
    relay.set("luma", "t1", "IN_PROGRESS", "10%")
    await rig.cycle()
    relay.set("luma", "t1", "IN_PROGRESS", "60%")
    await rig.cycle(advance=5)
    relay.set("luma", "t1", "SUCCESS", "100%")
    await rig.cycle(advance=5)

    assert ["task.started", "task.progress", "task.completed"] == [
        e.event_type for e in rig.outbox()
    ]


async def test_registration_events_narrow_but_never_drop_finals(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """A registration asking for no extra events still gets its final event."""
    rig = rig_for(webhooks={"events": ["task.completed", "task.failed", "task.started"]})
    rig.register("t1", events=("task.progress",))
    relay.set("luma", "t1", "IN_PROGRESS", "10%")
    await rig.cycle()
    relay.set("luma", "t1", "FAILURE", "")
    await rig.cycle(advance=5)

    assert ["task.failed"] == [e.event_type for e in rig.outbox()]


async def test_tasks_of_an_unconfigured_platform_are_kept(rig: Rig) -> None:
    """Tasks whose platform left the config are logged and kept, not failed."""
    rig.register("t1", platform="gone")
    with capture_logs() as logs:
        await rig.cycle()

    assert "pending" == rig.task("t1", platform="gone").status
    assert any(e["event"] == "unknown_platform" for e in logs)


async def test_one_log_line_per_cycle(rig: Rig, relay: SimulatedRelay) -> None:
    """Every cycle logs one poll_cycle line with its figures."""
    rig.register("a", "b")
    with capture_logs() as logs:
        await rig.cycle()

    [line] = [e for e in logs if e["event"] == "poll_cycle"]
    assert (2, 1, 0) == (line["claimed"], line["requests"], line["errors"])


async def test_moving_tasks_are_polled_every_interval(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """A task whose progress moves on every answer keeps being asked every interval."""
    rig = rig_for(poll={"interval": 1, "max_interval": 20})
    rig.register("busy")
    for second in range(60):
        relay.set("luma", "busy", "IN_PROGRESS", f"{second + 1}%")
        await rig.cycle(advance=1)

    assert 60 == len(relay.requests)


async def test_upstream_wait_hint_postpones_the_next_poll(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """estimate_wait_seconds moves the next poll later, capped at max_interval."""
    rig = rig_for(poll={"interval": 1, "max_interval": 30})
    relay.luma_estimate_wait = 25
    rig.register("hinted")
    relay.set("luma", "hinted", "IN_PROGRESS", "5%")
    await rig.cycle()
    for _ in range(24):
        await rig.cycle(advance=1)
    assert 1 == len(relay.requests)
    await rig.cycle(advance=1)

    assert 2 == len(relay.requests)


@pytest.mark.parametrize("platform", ["luma", "suno", "midjourney", "video", "kling", "replicate"])
async def test_every_builtin_platform_reaches_a_final_status(
    rig: Rig, relay: SimulatedRelay, platform: str
) -> None:
    """Each built-in platform's adapter reads the simulated relay's answers to the end."""
    rig.register("ok-1", "ok-2", platform=platform)
    rig.register("x-fail", platform=platform)
    await rig.cycle()

    assert "completed" == rig.task("ok-1", platform).status
    assert "completed" == rig.task("ok-2", platform).status
    failed = rig.task("x-fail", platform)
    assert "failed" == failed.status
    assert failed.fail_reason
    assert 3 == len(rig.outbox())


async def test_canceled_midjourney_task_fires_task_canceled(
    rig: Rig, relay: SimulatedRelay
) -> None:
    """CANCEL is final: status canceled and a task.canceled event."""
    rig.register("c1", platform="midjourney")
    relay.set("midjourney", "c1", "CANCEL", "")
    await rig.cycle()

    assert "canceled" == rig.task("c1", "midjourney").status
    assert ["task.canceled"] == [e.event_type for e in rig.outbox()]


async def test_per_id_platforms_respect_concurrency_and_rate_limit(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """Per-id polling sends one request per id, at most concurrency at once, rate_limit per s."""
    rig = rig_for(poll={"concurrency": 3}, platforms={"video": {"rate_limit": 20}})
    rig.register(*(f"v{n}" for n in range(8)), platform="video")
    await rig.cycle()

    paths = sorted(r.path for r in relay.requests)
    assert [f"/v1/video/generations/v{n}" for n in range(8)] == paths
    assert rig.transport.peak <= 3
    starts = sorted(r.at for r in relay.requests)
    # 20 requests per second: 8 requests span at least 7 gaps of 50 ms. Measured over the
    # span, as single arrivals at the relay jitter by tens of ms on a loaded machine.
    assert starts[-1] - starts[0] >= 7 * 0.05 * 0.95


async def test_custom_platform_from_config_only(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """A reseller path is a config change: a custom platform with its own status word."""
    rig = rig_for(
        platforms={
            "my-luma": {
                "style": "newapi-batch",
                "path": "/luma/tasks",
                "statuses": {"WEIRD": "completed"},
            }
        }
    )
    rig.register("m1", platform="my-luma")
    relay.set("luma", "m1", "WEIRD", "")
    await rig.cycle()

    assert "completed" == rig.task("m1", "my-luma").status


RELAY_WORDS = ["NOT_START", "SUBMITTED", "QUEUED", "IN_PROGRESS", "SUCCESS", "FAILURE",
               "UNKNOWN", "CANCELLED", "something-new"]  # fmt: skip


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(answers=st.lists(st.sampled_from(RELAY_WORDS), min_size=1, max_size=8))
def test_no_answer_sequence_reopens_a_final_task_or_fires_two_final_events(
    relay: SimulatedRelay, tmp_path_factory: pytest.TempPathFactory, answers: list[str]
) -> None:
    """Whatever the relay answers, in whatever order, through the real store: one final event."""
    db = tmp_path_factory.mktemp("prop") / "t.db"
    document = base_config(relay.base_url, "http://127.0.0.1:9/h", f"sqlite:///{db}")
    settings = config.parse(
        merge(document, {"poll": {"interval": 1, "max_interval": 1}}), environ={}
    )
    store = SqlStore.from_url(settings.database.url)
    store.create_schema()

    async def scenario() -> list[str]:
        rig = Rig(settings, store)
        rig.register("p1")
        seen = []
        for word in answers:
            relay.set("luma", "p1", word, "50%")
            await rig.cycle(advance=1)
            seen.append(rig.task("p1").status)
        await rig.client.aclose()
        return seen

    try:
        statuses = asyncio.run(scenario())
        with store.engine.connect() as conn:
            events_written = [r.event_type for r in conn.execute(sa.select(deliveries))]
        history = store.get("luma", "p1")
    finally:
        store.close()
    assert history is not None
    final_statuses = {"completed", "failed", "canceled"}
    first_final = next((i for i, s in enumerate(statuses) if s in final_statuses), None)
    if first_final is None:
        assert [] == events_written
    else:
        assert len(set(statuses[first_final:])) == 1  # never leaves its final status
        assert 1 == len(events_written)
        assert 1 == sum(t.to_status in final_statuses for t in history.transitions)


async def test_shorter_interval_after_reload_applies_at_the_next_cycle(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """Tasks scheduled under a long interval are asked again soon after it is shortened."""
    rig = rig_for(poll={"interval": 300})
    rig.register("t1")
    relay.set("luma", "t1", "IN_PROGRESS", "5%")
    await rig.cycle()
    rig.poller.configure(config.PollSettings(interval=1, max_interval=2))
    await rig.cycle(advance=1)  # the pull-in happens here; the task is due 2 s out
    await rig.cycle(advance=2)

    assert 2 == len(relay.requests)


async def test_a_second_reload_before_the_next_cycle_keeps_the_first_ones_pull_in(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """A reload shortening max_interval, then another changing something else (the same
    max_interval) before the next cycle: the task planned under the long interval is still
    pulled in, not left planned 300 s out."""
    rig = rig_for(poll={"interval": 300})
    rig.register("t1")
    relay.set("luma", "t1", "IN_PROGRESS", "5%")
    await rig.cycle()
    rig.poller.configure(config.PollSettings(interval=1, max_interval=2))
    rig.poller.configure(config.PollSettings(interval=1, max_interval=2, batch_size=50))
    await rig.cycle(advance=1)
    await rig.cycle(advance=2)

    assert 2 == len(relay.requests)


async def test_a_pull_in_the_database_refused_is_done_at_the_next_cycle(
    rig_for: Callable[..., Rig], relay: SimulatedRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pull-in after a shorter max_interval fails once (the database is down): that
    cycle fails, and the next one pulls the task in."""
    rig = rig_for(poll={"interval": 300})
    rig.register("t1")
    relay.set("luma", "t1", "IN_PROGRESS", "5%")
    await rig.cycle()
    rig.poller.configure(config.PollSettings(interval=1, max_interval=2))
    real = rig.poller.store.pull_in
    calls: list[datetime] = []

    def down_once(latest: datetime, **options: Any) -> None:
        calls.append(latest)
        if len(calls) == 1:
            raise sa.exc.OperationalError("UPDATE polls", {}, Exception("database is locked"))
        real(latest, **options)

    monkeypatch.setattr(rig.poller.store, "pull_in", down_once)
    with pytest.raises(sa.exc.OperationalError):
        await rig.cycle(advance=1)
    await rig.cycle(advance=0)
    await rig.cycle(advance=2)

    assert 2 == len(calls)
    assert 2 == len(relay.requests)


async def test_a_set_stop_event_ends_the_cycle_before_claiming_more(rig: Rig) -> None:
    """When stopping, no new batch is claimed; the tasks stay due for the next start."""
    rig.register("t1")
    stop = asyncio.Event()
    stop.set()
    report = await rig.poller.run_cycle(until=stop)

    assert 0 == report.claimed
    assert "pending" == rig.task("t1").status


async def test_an_empty_cycle_still_logs_its_line(rig: Rig) -> None:
    """A cycle with nothing due logs one info poll_cycle line too (one line per cycle)."""
    with capture_logs() as logs:
        await rig.cycle()

    [line] = [e for e in logs if e["event"] == "poll_cycle"]
    assert ("info", 0) == (line["log_level"], line["claimed"])


# -- the plan ---------------------------------------------------------------------------------


def next_poll_at(rig: Rig, task_id: str) -> float:
    """The stored next poll of a task, in epoch seconds."""
    with rig.store.engine.connect() as conn:
        value: float = conn.execute(
            sa.select(polls.c.next_poll_at)
            .join(tasks, tasks.c.id == polls.c.task_pk)
            .where(tasks.c.task_id == task_id)
        ).scalar_one()
    return value


async def test_the_plan_never_drifts_when_polls_run_late(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """Polls answered 3 s late keep their plan: the k-th poll stays planned at T0 + k * 10 s."""
    rig = rig_for(poll={"interval": 10, "max_interval": 10})
    start = rig.clock.now().timestamp()
    rig.register("steady")
    relay.set("luma", "steady", "IN_PROGRESS", "50%")
    await rig.cycle(advance=3)
    for k in range(1, 20):
        assert start + k * 10 == next_poll_at(rig, "steady")
        rig.clock.advance(10)
        await rig.cycle()

    assert start + 20 * 10 == next_poll_at(rig, "steady")
    assert 20 == len(relay.requests)


async def test_a_task_a_whole_interval_late_is_asked_once_not_once_per_missed_interval(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """After an outage the plan restarts from the answer: no burst of catch-up polls."""
    rig = rig_for(poll={"interval": 10, "max_interval": 10})
    rig.register("back")
    relay.set("luma", "back", "IN_PROGRESS", "50%")
    await rig.cycle(advance=35)
    await rig.cycle()
    await rig.cycle(advance=9)

    assert 1 == len(relay.requests)
    assert rig.clock.now().timestamp() + 1 == pytest.approx(next_poll_at(rig, "back"))


async def test_a_backlog_drains_oldest_first_without_a_cap(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """120 overdue tasks, one per request, one request at a time: all are asked in one drain,
    most overdue first, whatever the order they were registered in.
    """
    rig = rig_for(poll={"batch_size": 1, "concurrency": 1})
    start = rig.clock.now()
    offsets = list(range(120))
    random.Random(8).shuffle(offsets)
    for offset in offsets:
        rig.store.register(
            Registration("luma", [f"o{offset:03}"]), start + timedelta(seconds=offset)
        )
    rig.clock.advance(200)

    with capture_logs() as logs:
        await rig.cycle()

    lines = [e for e in logs if e["event"] == "poll_cycle"]  # one per interval of the drain
    assert 120 == sum(line["claimed"] for line in lines)
    assert [f"o{n:03}" for n in range(120)] == [r.json_body["ids"][0] for r in relay.requests]
    assert lines[0]["lag"] == pytest.approx(200)


async def test_a_batch_whose_claim_lapsed_before_its_request_sends_nothing(
    rig: Rig, relay: SimulatedRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose claim ran out before its request could start (a stalled loop) is not
    sent: another claim may hold the tasks by then, and they fall due again anyway.
    """
    monkeypatch.setattr(rig.poller, "lease", lambda: 0.0)
    rig.register("short")
    with capture_logs() as logs:
        await rig.cycle()

    assert [] == relay.requests
    [line] = [e for e in logs if e["event"] == "poll_cycle"]
    assert (1, 1, 0) == (line["claimed"], line["lapsed"], line["requests"])
    assert rig.clock.now().timestamp() == next_poll_at(rig, "short")


async def test_a_request_slower_than_the_lease_keeps_its_claim_renewed(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """Real clock: a 1 s lease, a relay answering after 1.6 s. The drain renews its claim while
    the request is in flight, so no other claim takes the task meanwhile (no second poll),
    and the answer is written when it comes."""
    rig = rig_for(poll={"interval": 1, "max_interval": 1})
    rig.poller.clock = SystemClock()
    rig.store.register(Registration("luma", ["slow"]), SystemClock().now())
    relay.set("luma", "slow", "SUBMITTED")
    relay.slow_seconds = 1.6
    relay.fail_next("slow", 1)
    drain = asyncio.create_task(rig.cycle())
    await asyncio.sleep(0.1)
    first_end = next_poll_at(rig, "slow")

    await asyncio.sleep(1.2)  # past the first lease's end, still inside the request
    tried_at = time.time()
    taken = rig.store.claim_due(SystemClock().now(), 10, lease=1.0)
    await drain

    assert [] == taken
    assert 1 == len(relay.requests)
    assert "queued" == rig.task("slow").status
    assert first_end < tried_at  # the first lease alone would have run out by then


async def test_the_next_claim_is_queued_before_the_answers_come(
    rig_for: Callable[..., Rig], relay: SimulatedRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real time: a claim takes 0.6 s (a busy database), the relay 1 s per answer. The
    second claim is taken while the first batches are at the relay, so each lane sends its
    next batch as soon as its answer comes, not a claim's time later."""
    rig = rig_for(poll={"batch_size": 1, "concurrency": 2})
    rig.register(*(f"t{n}" for n in range(4)))
    claim_due = rig.store.claim_due

    def slow_claim(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.6)
        return claim_due(*args, **kwargs)

    monkeypatch.setattr(rig.store, "claim_due", slow_claim)
    relay.latency = 1.0
    await rig.cycle()

    sent = sorted(r.at for r in relay.requests)
    assert 4 == len(sent)
    # The second pair follows the first by the relay's 1 s; waiting for the claim: 1.6 s.
    assert sent[2] - sent[0] < 1.0 + 0.3


async def test_the_claims_of_a_drain_cut_off_mid_request_lapse_within_one_lease(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """Real clock: a drain stopped mid-request (as a killed daemon stops) renews nothing more;
    its claim lapses within one lease (1 s) and another claim takes the task."""
    rig = rig_for(poll={"interval": 1, "max_interval": 1})
    rig.poller.clock = SystemClock()
    rig.store.register(Registration("luma", ["orphan"]), SystemClock().now())
    relay.slow_seconds = 5.0
    relay.fail_next("slow", 1)
    drain = asyncio.create_task(rig.cycle())
    await asyncio.sleep(0.6)  # the request is in flight, its claim renewed at least once
    drain.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await drain
    cut_at = time.monotonic()

    taken: list[Any] = []
    while not taken and time.monotonic() - cut_at < 3.0:
        await asyncio.sleep(0.05)
        taken = rig.store.claim_due(SystemClock().now(), 10, lease=1.0)

    assert ["orphan"] == [t.task_id for t in taken]
    assert time.monotonic() - cut_at <= 1.0 + 0.3


async def requests_seen(relay: SimulatedRelay, count: int, within: float = 5.0) -> None:
    """Return once the relay has received ``count`` requests (fail after ``within`` s)."""
    deadline = time.monotonic() + within
    while len(relay.requests) < count:
        assert time.monotonic() < deadline, f"{len(relay.requests)} requests, not {count}"
        await asyncio.sleep(0.01)


async def test_a_reload_ends_the_drain_under_way_so_the_next_asks_with_its_batch_size(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """Real clock: a drain working off 20 tasks one at a time from a relay that takes 0.3 s
    (it would take 6 s) is reloaded with batches of 10: it takes no more claims, puts back what
    it had queued, and ends once its request under way is answered; the next drain asks in
    batches of 10. (Interval 8 s: no renewal of the claims wakes the drain meanwhile.)"""
    rig = rig_for(poll={"interval": 8, "max_interval": 8, "batch_size": 1, "concurrency": 1})
    rig.poller.clock = SystemClock()
    ids = [f"t{n:02d}" for n in range(20)]
    rig.store.register(Registration("luma", ids), SystemClock().now())
    relay.latency = 0.3
    drain = asyncio.create_task(rig.cycle())
    await requests_seen(relay, 2)  # the second request is at the relay
    poll = rig.settings.poll.model_copy(update={"batch_size": 10})
    reloaded = rig.settings.model_copy(update={"poll": poll})
    rig.poller.configure(poll, platforms.build(reloaded))
    reloaded_at = time.monotonic()
    # Taken back at once, not at the coordinator's next turn: no lane starts one meanwhile.
    assert rig.poller.earliest_held() is None
    await drain
    ended_after = time.monotonic() - reloaded_at
    before = len(relay.requests)
    second = await rig.cycle()

    assert ended_after < 0.3 + 0.2  # the answer under way, not the 5 s of the rest
    assert before == 2
    left = 20 - before
    asked = [len((r.json_body or {})["ids"]) for r in relay.requests]
    assert asked == [1] * before + [10, left - 10]
    assert second.claimed == left  # what the first had queued was put back, due
    assert sorted(i for r in relay.requests for i in (r.json_body or {})["ids"]) == ids


async def test_a_reload_paces_requests_at_the_new_rate_limit(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """Real time: at one request a second, six batches of one would take five seconds. After a
    reload to ten a second, the next drain's six requests span about half a second; after one
    that removes the limit, they go out back to back."""
    rig = rig_for(poll={"batch_size": 1, "concurrency": 1}, platforms={"luma": {"rate_limit": 1}})

    async def span_of_six(rate_limit: float | None) -> float:
        reloaded = rig.settings.model_copy(
            update={"platforms": {"luma": config.PlatformSettings(rate_limit=rate_limit)}}
        )
        rig.poller.configure(rig.settings.poll, platforms.build(reloaded))
        relay.clear_requests()
        ids = [f"{rate_limit}-{n}" for n in range(6)]
        for task_id in ids:  # final at their first poll: asked once
            relay.set("luma", task_id, "SUCCESS", "100%")
        rig.register(*ids)
        await rig.cycle()
        starts = sorted(r.at for r in relay.requests)
        assert 6 == len(starts)
        return starts[-1] - starts[0]

    paced = await span_of_six(10)
    assert 0.45 <= paced < 1.5
    assert 10 == rig.poller.platforms["luma"].rate_limit
    assert await span_of_six(None) < paced / 2
    assert rig.poller.platforms["luma"].rate_limit is None


async def test_a_reload_that_changes_no_poll_setting_leaves_the_drain_alone(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """Real clock: a reload of other sections (the same [poll]) mid-drain puts nothing back:
    the drain asks about its 6 tasks one after another, in one drain."""
    rig = rig_for(poll={"interval": 8, "max_interval": 8, "batch_size": 1, "concurrency": 1})
    rig.poller.clock = SystemClock()
    rig.store.register(Registration("luma", [f"t{n}" for n in range(6)]), SystemClock().now())
    relay.latency = 0.1
    drain = asyncio.create_task(rig.cycle())
    await requests_seen(relay, 2)
    rig.poller.configure(rig.settings.poll, platforms.build(rig.settings))
    report = await drain

    assert (6, 6) == (report.claimed, len(relay.requests))


async def test_a_reload_during_a_pull_in_gets_its_own_pull_in_at_the_next_drain(
    rig_for: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload to a shorter max_interval while the pull-in of the one before runs: that
    pull-in used the longer one, so the next drain pulls in again, to the shorter."""
    rig = rig_for(poll={"interval": 1, "max_interval": 600})
    pulled: list[float] = []
    pull_in = rig.store.pull_in

    def pulling(latest: datetime, **options: Any) -> None:
        pulled.append((latest - rig.clock.now()).total_seconds())
        if len(pulled) == 1:  # a second reload comes while the first pull-in runs
            rig.poller.configure(rig.settings.poll.model_copy(update={"max_interval": 60}))
        pull_in(latest, **options)

    monkeypatch.setattr(rig.store, "pull_in", pulling)
    rig.poller.configure(rig.settings.poll.model_copy(update={"max_interval": 300}))
    await rig.cycle()
    await rig.cycle()
    await rig.cycle()

    assert [300.0, 60.0] == pulled


async def test_a_drain_cut_off_puts_back_the_batches_queued_behind_a_request(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """Real clock: a drain stopped (the daemon stopping) while a batch waits behind a slow
    request writes its task back as due when it was: another claim takes it at once, beside
    the task no claim had taken yet, and leaves the one whose request was cut off until its
    claim lapses."""
    rig = rig_for(poll={"interval": 1, "max_interval": 1, "batch_size": 1, "concurrency": 1})
    rig.poller.clock = SystemClock()
    rig.store.register(
        Registration("luma", ["a-sent", "b-queued", "c-queued"]), SystemClock().now()
    )
    relay.slow_seconds = 5.0
    relay.fail_next("slow", 1)
    drain = asyncio.create_task(rig.cycle())
    await asyncio.sleep(0.3)  # "a-sent" is at the relay, "b-queued" waits in its lane
    drain.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await drain

    taken = rig.store.claim_due(SystemClock().now(), 10, lease=1.0)
    assert ["b-queued", "c-queued"] == [t.task_id for t in taken]
    assert 1 == len(relay.requests)


async def test_a_drain_longer_than_an_interval_logs_a_line_per_interval_and_returns_all(
    rig_for: Callable[..., Rig], relay: SimulatedRelay
) -> None:
    """The log keeps its heartbeat during a long drain; the report returned covers it all."""
    rig = rig_for(poll={"batch_size": 1, "concurrency": 1})
    relay.slow_seconds = 0.06
    relay.fail_next("slow", 30)
    rig.register(*(f"s{n}" for n in range(30)))
    with capture_logs() as logs:
        report = await rig.cycle()

    lines = [e for e in logs if e["event"] == "poll_cycle"]
    assert len(lines) >= 2
    assert (30, 30) == (report.claimed, report.requests)
    assert 30 == sum(line["claimed"] for line in lines)


async def test_a_drain_keeps_one_total_of_its_earlier_lines_not_one_report_each(
    rig_for: Callable[..., Rig], relay: SimulatedRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under more work than fits a drain never ends: what it logged so far is kept as one
    running total, so its memory does not grow a report per interval."""
    drains: list[DrainWork] = []
    init = DrainWork.__init__

    def remembered(self: DrainWork, *args: Any) -> None:
        init(self, *args)
        drains.append(self)

    monkeypatch.setattr(DrainWork, "__init__", remembered)
    rig = rig_for(poll={"batch_size": 1, "concurrency": 1})
    relay.slow_seconds = 0.06
    relay.fail_next("slow", 45)  # 2.7 s: lines at about 1 and 2 s, and the last
    rig.register(*(f"s{n}" for n in range(45)))
    with capture_logs() as logs:
        report = await rig.cycle()

    [drain] = drains
    assert len([e for e in logs if e["event"] == "poll_cycle"]) >= 3
    assert 1 == len(drain.logged)
    assert 45 == report.claimed


async def test_a_large_answer_is_read_and_decided_in_parts_with_other_work_in_between(
    rig_for: Callable[..., Rig], relay: SimulatedRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """250 ids in one request: the answer is decided 100 tasks at a time, and the event loop
    runs other coroutines (an API request, say) between the parts."""
    rig = rig_for(poll={"batch_size": 250, "concurrency": 1})
    ids = [f"many{n:03}" for n in range(250)]
    rig.register(*ids)
    for task_id in ids:
        relay.set("luma", task_id, "IN_PROGRESS", "10%")
    turns = 0
    seen: list[tuple[int, int]] = []  # (tasks decided, loop turns so far) per part
    decide = rig.poller.planner.decide

    def counting(platform: Any, tasks: Any, observations: Any, now: Any, asked: Any) -> Any:
        seen.append((len(tasks), turns))
        return decide(platform, tasks, observations, now, asked)

    async def ticker() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    monkeypatch.setattr(rig.poller.planner, "decide", counting)
    ticking = asyncio.create_task(ticker())
    try:
        await rig.cycle()
    finally:
        ticking.cancel()

    assert [100, 100, 50] == [size for size, _ in seen]
    assert seen[0][1] < seen[1][1] < seen[2][1]
    assert 250 == sum(1 for t in ids if rig.task(t).status == "in_progress")


def test_a_drain_takes_no_claim_after_ten_intervals_so_the_engines_chores_run(rig: Rig) -> None:
    """A drain kept going by claims (a slow relay and tasks falling due all the time, or
    more work than fits) stops claiming after ten intervals or ten relay timeouts, the longer
    (at least 10 s), and ends once its requests are answered: the clock-step check, a
    reload's pull-in and its new batch size run between two drains."""
    settings = rig.settings
    span = max(settings.poll.interval, settings.upstream.timeout) * rounds.DRAIN_INTERVALS
    size = settings.poll.batch_size * settings.poll.concurrency
    fresh = DrainWork(rig.poller, time.monotonic())
    old = DrainWork(rig.poller, time.monotonic() - span - 0.01)
    younger = DrainWork(rig.poller, time.monotonic() - span + 1)

    assert 20.0 == span  # interval 1 s, timeout 2 s: ten timeouts
    assert old.claim_in() == 0.0  # claim_size is asked at once, and winds the drain down
    claims = [work.claim_size(Pipeline(work)) for work in (fresh, younger, old)]
    assert [size, size, 0] == claims
    assert old.claim_in() is None  # wound down: only its requests finishing matter now


def test_while_every_relay_is_busy_a_drain_is_woken_when_its_claims_end(rig: Rig) -> None:
    """With two claims' worth of tasks waiting for every relay, nothing but an answer would
    make a claim, yet the end of the drain's claiming still wakes it (claim_in), to take back
    what is queued before a lane starts its next batch."""
    span = max(rig.settings.poll.interval, rig.settings.upstream.timeout) * rounds.DRAIN_INTERVALS
    work = DrainWork(rig.poller, time.monotonic() - span + 5)
    work._unanswered["default"] = 10**6

    assert work.claim_size(Pipeline(work)) == 0
    assert 4.5 < (work.claim_in() or 0.0) <= 5.0


async def test_a_change_the_store_turns_away_is_not_counted_as_recorded(
    rig: Rig, relay: SimulatedRelay
) -> None:
    """A task removed while its request is out: the relay's SUCCESS for it is not written
    (compare-and-set), and so neither counted in tracker_transitions, the drain's changed
    and events, nor announced to the deliverer; the other task's change counts once."""
    rig.register("gone", "kept")
    relay.set("luma", "gone", "SUCCESS", "100%")
    relay.set("luma", "kept", "SUCCESS", "100%")
    told: list[None] = []
    rig.poller.on_events = lambda: told.append(None)
    inner = rig.transport.handle_async_request

    async def removing(request: httpx.Request) -> httpx.Response:
        assert rig.store.remove("luma", "gone")
        return await inner(request)

    rig.transport.handle_async_request = removing  # type: ignore[method-assign]
    report = await rig.cycle()

    assert rig.store.get("luma", "gone") is None
    assert "completed" == rig.task("kept").status
    assert (1, 1) == (report.changed, report.events)
    assert ["task.completed"] == [e.event_type for e in rig.outbox()]
    registry = rig.poller.metrics.registry
    labels = {"platform": "luma", "to": "completed"}
    assert 1 == registry.get_sample_value("tracker_transitions_total", labels)
    assert [None] == told
