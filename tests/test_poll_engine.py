"""The poll engine: cadence at the relay, plans that never drift, backlogs, wake-ups."""

from __future__ import annotations

import asyncio
import collections
import itertools
import statistics
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from conftest import merge
from structlog.testing import capture_logs

from tracker import config, events, platforms
from tracker.clock import Clock, SystemClock
from tracker.metrics import Metrics
from tracker.poller import PollEngine, Poller, rounds
from tracker.poller.drain import END_GRACE
from tracker.poller.plan import next_poll
from tracker.store import Registration, Replan, SqlStore
from tracker.testing.cadence import poll_gaps, quantile
from tracker.testing.simulator import SimulatedRelay


def poller_for(
    settings: config.Settings, store: SqlStore, client: httpx.AsyncClient, clock: Clock
) -> Poller:
    """A Poller as the daemon builds one from ``settings``, on ``store`` and ``clock``."""
    return Poller(
        store=store,
        platforms=platforms.build(settings),
        client=client,
        clock=clock,
        settings=settings.poll,
        targets=events.Targets(settings.webhooks),
        metrics=Metrics(),
    )


class Running:
    """A PollEngine on the system clock (or ``clock``), running as a task until stopped."""

    def __init__(
        self, settings: config.Settings, store: SqlStore, clock: Clock | None = None
    ) -> None:
        self.store = store
        self.clock = clock or SystemClock()
        self.client = httpx.AsyncClient()
        self.poller = poller_for(settings, store, self.client, self.clock)
        self.engine = PollEngine(self.poller, self.clock)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.engine.run(self.stop))

    def register(self, *ids: str) -> None:
        self.store.register(Registration("luma", list(ids)), self.clock.now())

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)
        await self.client.aclose()


@pytest.fixture(name="running_for")
async def _running_for(
    settings_for: Callable[..., config.Settings], sqlite_url: str
) -> AsyncIterator[Callable[..., Running]]:
    started: list[Running] = []

    def make(clock: Clock | None = None, **overrides: Any) -> Running:
        store = SqlStore.from_url(sqlite_url)
        store.create_schema()
        started.append(Running(settings_for(**overrides), store, clock))
        return started[-1]

    yield make
    for running in started:
        await running.close()
        running.store.close()


async def gaps_at_relay(
    running_for: Callable[..., Running],
    relay: SimulatedRelay,
    *,
    tasks: int,
    interval: float,
    seconds: float,
) -> list[float]:
    """Run an engine over ``tasks`` live tasks at ``interval`` for ``seconds`` on the real
    clock; every gap between two polls of one task, as the relay saw them."""
    ids = [f"c{n}" for n in range(tasks)]
    for task_id in ids:
        relay.set("luma", task_id, "IN_PROGRESS", "50%")
    running = running_for(poll={"interval": interval, "max_interval": interval})
    running.register(*ids)
    await asyncio.sleep(seconds)
    await running.close()
    return [g for per_task in poll_gaps(relay.requests).values() for g in per_task]


async def test_every_task_is_asked_once_per_interval_at_the_relay(
    running_for: Callable[..., Running], relay: SimulatedRelay
) -> None:
    """300 live tasks at interval 1 s on the real clock: 95 % of the gaps between two polls of
    one task, measured at the relay, are within 1.2 s, and the median is the interval.
    """
    gaps = await gaps_at_relay(running_for, relay, tasks=300, interval=1, seconds=6.5)

    assert len(gaps) >= 300 * 5
    assert quantile(gaps, 0.95) <= 1.2
    # A poll answered late is followed by one planned on time, so some gaps are short; none
    # is a double poll.
    assert quantile(gaps, 0.05) >= 0.5
    assert 0.9 <= statistics.median(gaps) <= 1.1


async def test_a_relay_slower_than_a_second_does_not_stretch_the_interval(
    running_for: Callable[..., Running], relay: SimulatedRelay
) -> None:
    """A relay that takes 1.4 s to answer every request, 40 tasks at interval 3 s on the real
    clock: each task is still asked every 3 s at the relay (its time to answer is not time
    waited in the drain, so it never moves the plan)."""
    relay.latency = 1.4
    gaps = await gaps_at_relay(running_for, relay, tasks=40, interval=3, seconds=14)

    assert len(gaps) >= 40 * 3
    assert 2.9 <= statistics.median(gaps) <= 3.1
    assert quantile(gaps, 0.95) <= 3.3


async def polls_beside(
    running_for: Callable[..., Running],
    relay: SimulatedRelay,
    other: SimulatedRelay,
    *,
    suno: int,
    seconds: float,
    **overrides: Any,
) -> tuple[list[float], list[dict[str, Any]]]:
    """30 luma tasks on ``relay`` and ``suno`` suno tasks on ``other`` (a second upstream),
    interval 1 s, on the real clock for ``seconds``: the gaps between two polls of each luma
    task at its relay, and the log."""
    sections = {
        "upstreams": {"other": {"base_url": other.base_url, "api_key": "sk-sim", "timeout": 5}},
        "platforms": {"suno": {"upstream": "other"}},
        "poll": {"interval": 1, "max_interval": 1},
    }
    running = running_for(**merge(sections, overrides))
    luma, others = [f"f{n}" for n in range(30)], [f"s{n}" for n in range(suno)]
    for task_id in luma:
        relay.set("luma", task_id, "IN_PROGRESS", "50%")
    for task_id in others:
        other.set("suno", task_id, "IN_PROGRESS", "50%")
    with capture_logs() as logs:
        running.register(*luma)
        running.store.register(Registration("suno", others), running.clock.now())
        await asyncio.sleep(seconds)
        await running.close()
    return [g for per_task in poll_gaps(relay.requests).values() for g in per_task], logs


async def test_a_slow_relay_does_not_hold_up_the_polls_of_another(
    running_for: Callable[..., Running], relay: SimulatedRelay
) -> None:
    """Suno on a second relay answering in 2.5 s, luma on the usual one, interval 1 s, real
    clock: luma's tasks are still asked every second at their relay; the drain does not wait
    for suno's answers before it claims what falls due meanwhile."""
    with SimulatedRelay(step=0.0) as slow:
        slow.latency = 2.5
        gaps, _ = await polls_beside(running_for, relay, slow, suno=100, seconds=6)

    assert len(gaps) >= 30 * 4
    assert quantile(gaps, 0.95) <= 1.3
    assert len(slow.requests) >= 2


async def beside_an_overloaded_relay(
    running_for: Callable[..., Running], relay: SimulatedRelay, *, seconds: float
) -> tuple[list[float], list[str]]:
    """polls_beside with suno's relay answering in 1.5 s and 300 suno tasks, far more than
    it can answer at interval 1 s in batches of 10, two at a time: luma's gaps, and the ids
    suno's relay was asked about, in order."""
    with SimulatedRelay(step=0.0) as slow:
        slow.latency = 1.5
        gaps, _ = await polls_beside(
            running_for,
            relay,
            slow,
            suno=300,
            seconds=seconds,
            poll={"batch_size": 10, "concurrency": 2},
        )
        asked = [i for r in slow.requests for i in (r.json_body or {}).get("ids", [])]
    return gaps, asked


async def test_a_slow_relay_with_more_tasks_than_it_can_answer_does_not_hold_up_another(
    running_for: Callable[..., Running], relay: SimulatedRelay
) -> None:
    """Suno's relay answers in 1.5 s, and its 300 tasks at interval 1 s are far more than it
    can answer (batches of 10, two at a time): its tasks fall ever further behind, and, most
    overdue, would fill every claim. The drain claims no more of an upstream's tasks while
    two claims' worth wait for it, so luma's tasks on the other relay are still asked about
    every second."""
    gaps, asked = await beside_an_overloaded_relay(running_for, relay, seconds=8)

    assert len(gaps) >= 30 * 6
    assert 0.9 <= statistics.median(gaps) <= 1.1
    assert quantile(gaps, 0.95) <= 1.2
    assert len(asked) >= 80


async def test_the_end_of_a_drain_does_not_wait_for_the_batches_queued_for_a_slow_relay(
    running_for: Callable[..., Running], relay: SimulatedRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, with drains cut to 5 s (one relay timeout): when a drain stops claiming, the
    batches still queued behind suno's slow requests go back, due as they were, and the drain
    ends once the requests under way are answered, so luma's tasks on the other relay are
    asked again within about one of suno's answers, not after every queued batch (three
    rounds of 1.5 s here)."""
    monkeypatch.setattr(rounds, "DRAIN_INTERVALS", 1)
    monkeypatch.setattr(rounds, "MIN_DRAIN_SPAN", 1.0)
    drains: list[rounds.DrainWork] = []
    start = rounds.DrainWork.__init__

    def counted(work: rounds.DrainWork, *args: Any) -> None:
        drains.append(work)
        start(work, *args)

    monkeypatch.setattr(rounds.DrainWork, "__init__", counted)
    gaps, asked = await beside_an_overloaded_relay(running_for, relay, seconds=12)

    assert len(drains) >= 2
    assert len(gaps) >= 30 * 9
    # One slow answer (1.5 s) late at most; waiting for the queued batches too was 4.5 s.
    assert max(gaps) <= 3.5
    # Suno's relay was kept busy, and no task of its backlog was asked twice while others
    # waited: the tasks put back kept their place, first in due order.
    assert len(asked) >= 120
    assert len(set(asked)) == len(asked)


def luma_beside_suno(
    running_for: Callable[..., Running],
    relay: SimulatedRelay,
    other: SimulatedRelay,
    *,
    timeout: float,
) -> Running:
    """An engine at interval 1 s with 30 luma tasks in progress on ``relay`` and two suno
    tasks on ``other`` (its own upstream, with this ``timeout``)."""
    luma = [f"f{n}" for n in range(30)]
    for task_id in luma:
        relay.set("luma", task_id, "IN_PROGRESS", "50%")
    running = running_for(
        upstreams={"other": {"base_url": other.base_url, "api_key": "sk-sim", "timeout": timeout}},
        platforms={"suno": {"upstream": "other"}},
        poll={"interval": 1, "max_interval": 1},
    )
    running.register(*luma)
    running.store.register(Registration("suno", ["s0", "s1"]), running.clock.now())
    return running


async def test_the_end_of_a_drain_does_not_wait_for_the_probe_of_a_relay_that_is_down(
    running_for: Callable[..., Running], relay: SimulatedRelay
) -> None:
    """Suno's relay takes every request and never answers (timeout 4 s). Its first request
    times out at 4 s, and after a 2 s pause it gets one request at a time (a probe), out from
    6 s to 10 s, which keeps the drain open. A reload at 7 s ends that drain (as the end of
    its span would): it calls the probe off, its tasks going back due, and the next drain
    starts at once, so luma's tasks on the other relay (interval 1 s) are not left unasked
    for what is left of the probe's 4 s."""
    with SimulatedRelay(step=0.0) as down:
        down.fail_next("stall", 10**6)
        running = luma_beside_suno(running_for, relay, down, timeout=4)
        await asyncio.sleep(7)
        poll = running.poller.settings
        reloaded = time.monotonic()  # the relays' clock
        running.poller.configure(poll.model_copy(update={"batch_size": poll.batch_size - 1}))
        await asyncio.sleep(3)
        await running.close()
        asked = [r.at for r in down.requests]

    # Suno's relay was asked at 0 s, 6 s, and by the next drain at once (7 s). Waiting out
    # the probe, the next would go out at 14 s (the probe fails at 10 s; then a 4 s pause),
    # and luma's tasks would wait 3 s.
    first = asked[0]
    assert len(asked) == 3
    assert 5.8 < asked[1] - first < 6.5
    assert 0 < asked[2] - reloaded < 0.5
    gaps = poll_gaps([r for r in relay.requests if r.at >= first + 5])
    assert len(gaps) == 30
    assert max(g for per_task in gaps.values() for g in per_task) <= 2.0


async def test_the_end_of_a_drain_waits_about_a_second_for_a_relay_that_went_silent(
    running_for: Callable[..., Running], relay: SimulatedRelay
) -> None:
    """Suno's relay answers at once for 2 s, then takes every request and answers none
    (timeout 10 s): not yet known to be down, its request out at about 3 s is an ordinary
    one. A reload at 3.5 s ends that drain: the request gets END_GRACE since it was sent
    (twice the relay's usual answer time being shorter), is called off then, its tasks due
    again and no failure counted, and the next drain starts at once, so luma's tasks on the
    other relay (interval 1 s) are not left unasked for what is left of the 10 s."""
    with SimulatedRelay(step=10**6) as silent:
        running = luma_beside_suno(running_for, relay, silent, timeout=10)
        await asyncio.sleep(2)
        silent.fail_next("stall", 10**6)
        stalled = len(silent.requests)
        deadline = time.monotonic() + 2
        while len(silent.requests) == stalled:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        poll = running.poller.settings
        with capture_logs() as logs:
            running.poller.configure(poll.model_copy(update={"batch_size": poll.batch_size - 1}))
            await asyncio.sleep(1.5)
        asked = [r.at for r in silent.requests[stalled:]]
    # Closed once the silent relay is gone, so the close need not wait out its last request.
    await running.close()

    assert 2 <= stalled <= 4
    # The stalled request, then the next drain's, END_GRACE after it (not at its timeout).
    assert len(asked) == 2
    assert END_GRACE <= asked[1] - asked[0] < END_GRACE + 0.3
    assert not [e for e in logs if e["event"] == "upstream_error"]
    gaps = poll_gaps([r for r in relay.requests if r.at >= asked[0] - 1])
    assert len(gaps) == 30
    assert max(g for per_task in gaps.values() for g in per_task) <= 2.0


def due_now(running: Running) -> bool:
    """Whether the most overdue live task is due by now (tasks were left due, not put off)."""
    overdue = running.store.most_overdue()
    return overdue is not None and overdue[0] <= running.clock.now()


async def test_a_stop_sends_no_batch_still_waiting_for_its_rate_limit(
    running_for: Callable[..., Running], relay: SimulatedRelay
) -> None:
    """Three batches of one at a rate limit of one request every 2 s: the first goes out at
    once, the other two wait their turn. A stop 0.3 s in sends neither: the engine returns
    at once, not 4 s later, and their tasks are left due."""
    for task_id in ("t1", "t2", "t3"):
        relay.set("luma", task_id, "IN_PROGRESS", "50%")
    running = running_for(
        poll={"interval": 10, "batch_size": 1, "concurrency": 3},
        platforms={"luma": {"rate_limit": 0.5}},
    )
    running.register("t1", "t2", "t3")
    deadline = time.monotonic() + 5
    while not relay.requests:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    stopping = time.monotonic()
    running.stop.set()
    await asyncio.wait_for(running.task, 10)

    assert time.monotonic() - stopping < 1.0
    assert len(relay.requests) == 1
    assert due_now(running)


async def test_a_stop_does_not_wait_for_the_probe_of_a_relay_that_is_down(
    running_for: Callable[..., Running], relay: SimulatedRelay
) -> None:
    """The relay takes every request and never answers (timeout 3 s); three tasks, asked one
    at a time. The first request times out at 3 s, and after a 2 s pause one request (a
    probe) goes out, the other two batches queued behind it. A stop a moment later calls the
    probe off and sends none of the queued ones as another probe: the engine returns at
    once, not after a timeout (a daemon's stop would wait for it), no failure is counted,
    and the tasks are left due."""
    relay.fail_next("stall", 10**6)
    running = running_for(
        upstream={"timeout": 3},
        poll={"interval": 1, "max_interval": 1, "batch_size": 1, "concurrency": 1},
    )
    running.register("t1", "t2", "t3")
    deadline = time.monotonic() + 10
    while len(relay.requests) < 2:  # the probe, about 5 s in
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    stopping = time.monotonic()
    with capture_logs() as logs:
        running.stop.set()
        await asyncio.wait_for(running.task, 10)

    assert time.monotonic() - stopping < 1.0
    assert len(relay.requests) == 2
    assert not [e for e in logs if e["event"] == "upstream_error"]
    assert due_now(running)


async def test_the_tasks_of_a_paused_relay_are_claimed_again_once_its_pause_is_over(
    running_for: Callable[..., Running], relay: SimulatedRelay
) -> None:
    """The relay answers the first request 429 with Retry-After: 1, at interval 20 s (a
    claim takes tasks up to 1 s early). The two tasks behind it are claimed again once, when
    the pause is over, and asked then (once before too, if a claim took them before the 429
    came); not claimed over and over through the pause's last second, each claim a write to
    find the relay still paused."""
    relay.fail_next("http_429")
    running = running_for(poll={"interval": 20, "batch_size": 1, "concurrency": 1})
    claimed: list[str] = []
    claim_due = running.store.claim_due

    def counted(*args: Any, **kwargs: Any) -> list[Any]:
        due = claim_due(*args, **kwargs)
        claimed.extend(t.task_id for t in due)
        return due

    running.store.claim_due = counted  # type: ignore[method-assign]
    running.register("t1", "t2", "t3")
    await asyncio.sleep(2.5)
    await running.close()

    sent = sorted(r.at for r in relay.requests)
    assert len(sent) == 3  # t1 (answered 429), then t2 and t3 after the pause
    assert sent[1] - sent[0] >= 0.95
    times = collections.Counter(claimed)
    assert times["t1"] == 1
    assert 1 <= times["t2"] <= 2
    assert 1 <= times["t3"] <= 2


async def test_a_backlog_on_one_relay_is_claimed_without_pause_beside_an_idle_one(
    settings_for: Callable[..., config.Settings], sqlite_url: str, relay: SimulatedRelay
) -> None:
    """400 overdue luma tasks in claims of 20 (batches of 10, two at a time), while suno's
    relay has nothing due (interval 30 s, so the reclaim period is 1 s). A claim taken while
    luma's lane is busy finds nothing (suno's alone); yet each time the lane has room again it
    gets its next claim at once, so one drain asks about all 400 without a pause, and the
    claim that finds nothing is not repeated within the period."""
    with SimulatedRelay(step=0.0) as other:
        settings = settings_for(
            upstreams={"other": {"base_url": other.base_url, "api_key": "sk-sim"}},
            platforms={"suno": {"upstream": "other"}},
            poll={"interval": 30, "batch_size": 10, "concurrency": 2},
        )
        store = SqlStore.from_url(sqlite_url)
        store.create_schema()
        clock = SystemClock()
        store.register(Registration("suno", ["s0"]), clock.now())
        luma = [f"l{n}" for n in range(400)]
        async with httpx.AsyncClient() as client:
            poller = poller_for(settings, store, client, clock)
            await poller.run_cycle()  # suno's task: asked, then not due for 30 s
            store.register(Registration("luma", luma), clock.now())
            found: list[int] = []
            claim_due = store.claim_due

            def counted(*args: Any, **kwargs: Any) -> list[Any]:
                due = claim_due(*args, **kwargs)
                found.append(len(due))
                return due

            store.claim_due = counted  # type: ignore[method-assign]
            started = time.monotonic()
            await poller.run_cycle()
            took = time.monotonic() - started
        store.close()

    asked = [i for r in relay.requests for i in (r.json_body or {}).get("ids", [])]
    assert sorted(asked) == sorted(luma)
    assert sum(found) == 400
    # 20 claims; waiting out the period at each would take 20 s.
    assert took < 5.0
    assert found.count(0) <= 2 + took


async def test_a_relay_that_does_not_answer_does_not_hold_up_the_polls_of_another(
    running_for: Callable[..., Running], relay: SimulatedRelay
) -> None:
    """Suno's relay answers nothing within its 0.5 s timeout, and its 200 tasks are more than
    the drain's claims hold (batches of 10, two at a time): after its first timeouts it is
    paused (longer at each failure in a row) and its tasks planned for the pause's end, not
    held in its lane, so luma's tasks on the other relay are still asked about every second."""
    with SimulatedRelay(step=0.0) as down:
        down.latency = 5.0
        gaps, logs = await polls_beside(
            running_for,
            relay,
            down,
            suno=200,
            seconds=8,
            upstreams={"other": {"timeout": 0.5}},
            poll={"batch_size": 10, "concurrency": 2},
        )

    assert len(gaps) >= 30 * 6
    assert 0.9 <= statistics.median(gaps) <= 1.1
    assert quantile(gaps, 0.9) <= 1.6
    pauses = [e["relay_paused_seconds"] for e in logs if "relay_paused_seconds" in e]
    assert max(pauses) > 2.0  # doubled for failures in a row


async def test_a_registration_wakes_the_engine_at_once(
    running_for: Callable[..., Running], relay: SimulatedRelay
) -> None:
    """A sleeping engine polls a new task as soon as it is told, not at its next look."""
    running = running_for(poll={"interval": 30, "max_interval": 60})
    await asyncio.sleep(0.3)  # asleep: nothing is live
    relay.clear_requests()
    running.register("new")
    running.engine.wake()

    await requests_at(relay, 1, within=0.5)  # the engine's next look would be 30 s away


async def requests_at(relay: SimulatedRelay, count: int, *, within: float) -> None:
    """Until the relay has seen ``count`` requests; fails after ``within`` seconds."""
    deadline = time.monotonic() + within
    while len(relay.requests) < count:
        assert time.monotonic() < deadline, f"fewer than {count} requests in {within} s"
        await asyncio.sleep(0.01)


class SteppedClock:
    """The system clock, which the test steps as NTP steps a machine's clock."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.offset)

    def monotonic(self) -> float:
        return time.monotonic()


async def test_a_step_back_of_the_wall_clock_does_not_pause_the_polls(
    running_for: Callable[..., Running], relay: SimulatedRelay
) -> None:
    """Real clock, 50 live tasks at interval 1 s: the daemon's wall clock steps back an hour.
    Every task is still asked about every second at the relay (the plans, wall-clock times,
    move back by the step; left alone, the next polls would wait an hour), and the log says
    how far the clock stepped."""
    ids = [f"s{n}" for n in range(50)]
    for task_id in ids:
        relay.set("luma", task_id, "IN_PROGRESS", "50%")
    clock = SteppedClock()
    with capture_logs() as logs:
        running = running_for(clock=clock, poll={"interval": 1, "max_interval": 1})
        running.register(*ids)
        await asyncio.sleep(2.5)
        stepped_at = time.monotonic()
        clock.offset = -3600
        await asyncio.sleep(3)
        await running.close()

    after = [r for r in relay.requests if r.at > stepped_at + 0.5]
    asked = [task_id for r in after for task_id in r.json_body["ids"]]
    assert all(asked.count(task_id) >= 2 for task_id in ids), sorted(set(ids) - set(asked))
    gaps = [g for per_task in poll_gaps(relay.requests).values() for g in per_task]
    assert max(gaps) <= 2.0
    (step,) = [e for e in logs if e["event"] == "clock_stepped_back"]
    assert 3599 <= step["seconds"] <= 3601
    assert 50 == step["polls_moved"]


@pytest.mark.postgres
async def test_a_step_back_leaves_another_daemons_claims_alone_on_a_shared_database(
    settings_for: Callable[..., config.Settings], make_pg_url: Callable[[], str]
) -> None:
    """Two daemons on one PostgreSQL database, this one's wall clock an hour ahead until it is
    set right. Its own plan moves back by the step, but the poll the other daemon has claimed
    (its lease ends within MAX_LEASE of the true now) stays, so that daemon's answer is still
    recorded. (Moved, its claim was gone: the answer written nowhere, the task due at once.)"""
    url = make_pg_url()
    ours, theirs = SqlStore.from_url(url), SqlStore.from_url(url)
    ours.create_schema()
    clock = SteppedClock()
    clock.offset = 3600
    settings = settings_for(db_url=url, poll={"interval": 10, "max_interval": 60})
    async with httpx.AsyncClient() as client:
        poller = poller_for(settings, ours, client, clock)
        engine = PollEngine(poller, clock)
        now = datetime.now(UTC)
        ours.register(Registration("luma", ["ours"]), clock.now())  # planned an hour ahead
        theirs.register(Registration("luma", ["theirs"]), now)
        (held,) = theirs.claim_due(now, 10, lease=20)
        clock.offset = 0
        with capture_logs() as logs:
            await engine.follow_clock()
        answered = Replan(now.timestamp() + 10, held.pk, held.lease_until or 0.0)
        written = theirs.record([], now, [answered])
    try:
        with ours.engine.connect() as conn:
            planned = dict(conn.execute(sa.text(PLANS)).all())
    finally:
        ours.close()
        theirs.close()

    assert 1 == written
    assert answered.next_poll_at == planned["theirs"]
    assert abs(planned["ours"] - now.timestamp()) < 5  # moved back an hour
    (step,) = [e for e in logs if e["event"] == "clock_stepped_back"]
    assert 1 == step["polls_moved"]


#: each task's next poll, by task id
PLANS = "SELECT tasks.task_id, polls.next_poll_at FROM polls JOIN tasks ON tasks.id = polls.task_pk"


async def test_a_jump_forward_of_the_wall_clock_is_logged_and_what_fell_due_is_polled(
    running_for: Callable[..., Running], relay: SimulatedRelay
) -> None:
    """Real clock, interval 30 s: the daemon's wall clock jumps forward an hour (a machine
    resumed from suspend looks the same). The task, due meanwhile, is asked about at once,
    and the log says how far the clock jumped, once."""
    relay.set("luma", "j", "IN_PROGRESS", "50%")
    clock = SteppedClock()
    with capture_logs() as logs:
        running = running_for(clock=clock, poll={"interval": 30, "max_interval": 60})
        running.register("j")
        await requests_at(relay, 1, within=3)
        await asyncio.sleep(0.2)
        clock.offset = 3600
        jumped = time.monotonic()
        await requests_at(relay, 2, within=3)
        asked_after = time.monotonic() - jumped
        await asyncio.sleep(0.2)
        await running.close()

    assert asked_after < 1.5  # the engine looks at least once a second
    [jump] = [e for e in logs if e["event"] == "clock_jumped_forward"]
    assert 3599 <= jump["seconds"] <= 3601
    assert [] == [e for e in logs if e["event"] == "clock_stepped_back"]


def test_poll_gaps_are_measured_per_task_from_the_relay_log() -> None:
    """poll_gaps pairs consecutive requests naming one id, in arrival order."""

    class Seen:
        def __init__(self, at: float, ids: list[str]) -> None:
            self.at = at
            self.json_body = {"ids": ids}

    gaps = poll_gaps([Seen(0.0, ["a", "b"]), Seen(1.0, ["a"]), Seen(2.5, ["b", "a"])])

    assert {"a": [1.0, 1.5], "b": [2.5]} == gaps
    assert 2.0 == quantile([1.0, 2.0, 3.0], 0.5)


def test_a_poll_that_waited_behind_a_burst_starts_a_new_phase_from_its_answer() -> None:
    """Tasks sharing one planned instant spread out: one that waited 3 s within the drain is
    planned from its answer; one answered within a second, or late only because the drain
    itself started late, keeps its plan."""
    assert 133.0 == next_poll(100.0, 103.0, 30.0, started=99.5)
    assert 130.0 == next_poll(100.0, 100.5, 30.0, started=99.5)
    assert 130.0 == next_poll(100.0, 103.0, 30.0, started=102.5)
    assert 130.0 == next_poll(100.0, 103.0, 30.0)


def test_the_relays_own_time_to_answer_is_not_waiting_in_the_drain() -> None:
    """A request sent on time keeps its task on plan however long the relay takes to answer;
    one sent after waiting over LATE_TOLERANCE in the drain starts a new phase from its
    answer. Five polls through a relay taking 3 s each stay 30 s apart."""
    assert 130.0 == next_poll(100.0, 103.0, 30.0, started=99.5, asked=100.1)
    assert 134.5 == next_poll(100.0, 104.5, 30.0, started=99.5, asked=101.5)
    planned = 100.0
    for _ in range(5):
        following = next_poll(planned, planned + 3.0, 30.0, started=planned, asked=planned)
        assert planned + 30.0 == following
        planned = following


async def test_a_failed_drain_is_tried_again_a_second_later_not_an_interval_later(
    running_for: Callable[..., Running],
) -> None:
    """At interval 10 s, with the database failing every drain (its polls table gone), the
    engine tries again every FAILURE_PAUSE (1 s) on the real clock, each failure logged and
    kept for /readyz: an outage of the database costs a second of polling once it is over,
    not an interval."""
    running = running_for(poll={"interval": 10})
    with running.store.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE polls"))
    tried: list[float] = []
    run_cycle = running.poller.run_cycle

    async def timed(*args: Any, **kwargs: Any) -> Any:
        tried.append(time.monotonic())
        return await run_cycle(*args, **kwargs)

    running.poller.run_cycle = timed  # type: ignore[method-assign]
    with capture_logs() as logs:
        await asyncio.sleep(2.5)
    failed = running.engine.last_error

    assert 3 == len(tried)
    assert all(0.9 <= b - a <= 1.4 for a, b in itertools.pairwise(tried))
    assert 3 == sum(e["event"] == "poll_cycle_failed" for e in logs)
    assert failed is not None
    assert "polls" in str(failed)
