"""Tests for webhook delivery against real loopback receivers that misbehave on purpose."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import standardwebhooks
import structlog.testing
from pydantic import SecretStr

from tracker import config, events, signing, ssrf, status
from tracker.clock import Clock, FakeClock, SystemClock
from tracker.delivery import Deliverer, passes
from tracker.delivery.outbox import LEASE, Round
from tracker.delivery.sending import EXCERPT_BYTES
from tracker.limits import Load, Ticket
from tracker.metrics import Metrics
from tracker.retry import DeliveryState
from tracker.status import EventType, TaskStatus
from tracker.store import Registration, SqlStore, TaskUpdate
from tracker.store.records import AttemptResult, DeliveryJob, DeliveryRecord, DueTask
from tracker.store.sql import deliveries
from tracker.testing.receiver import Received, Reply, WebhookReceiver

SECRET = signing.new_secret()
#: rand that makes the jitter factor exactly 1
MID = 0.5


@pytest.fixture(name="store")
def _store(sqlite_url: str) -> Iterator[SqlStore]:
    """SQLite only (conftest's store also runs PostgreSQL): these tests are about HTTP."""
    store = SqlStore.from_url(sqlite_url)
    store.create_schema()
    yield store
    store.close()


@pytest.fixture(name="clock")
def _clock() -> FakeClock:
    # Near the real time: standardwebhooks checks webhook-timestamp against the wall clock.
    return FakeClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture(name="other")
def _other() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as other:
        yield other


def hook_settings(url: str | None = None, **overrides: Any) -> config.WebhookSettings:
    """[webhooks] with a slow retry schedule, so each test moves the clock itself."""
    document: dict[str, Any] = {
        "secret": SECRET,
        "retry_delays": [10, 20, 40],
        "timeout": 2,
        "allow_private": ["127.0.0.0/8"],
    }
    if url is not None:
        document["url"] = url
    document.update(overrides)
    return config.WebhookSettings.model_validate(document)


@contextlib.asynccontextmanager
async def deliverer_for(
    store: SqlStore, clock: FakeClock, settings: config.WebhookSettings, **options: Any
) -> AsyncIterator[Deliverer]:
    """A Deliverer with real clients; the guarded one honours settings.allow_private."""
    guard = ssrf.guarded_transport(ssrf.parse_allow(settings.allow_private))
    async with httpx.AsyncClient() as client, httpx.AsyncClient(transport=guard) as guarded:
        options.setdefault("rand", lambda: MID)
        yield Deliverer(
            store=store,
            client=client,
            guarded_client=guarded,
            clock=clock,
            settings=settings,
            metrics=Metrics(),
            **options,
        )


def register(
    store: SqlStore,
    clock: Clock,
    task_id: str = "task-1",
    **registration: Any,
) -> DueTask:
    """Register one task and claim it for a poll, as the poller would."""
    store.register(Registration(platform="suno", ids=[task_id], **registration), clock.now())
    claimed = store.claim_due(clock.now(), 1000, lease=10)
    [task] = [t for t in claimed if t.task_id == task_id]
    return task


def observe(
    store: SqlStore,
    clock: Clock,
    settings: config.WebhookSettings,
    task: DueTask,
    new: TaskStatus,
    *,
    progress: int | None = None,
) -> DueTask:
    """Record what a poll saw, with its outbox rows; returns the task as it is now."""
    observation = status.Observation(
        task_id=task.task_id,
        upstream_status=new.value.upper(),
        status=new,
        progress=progress,
        result={"url": "https://cdn.example/out.mp4"} if new == TaskStatus.COMPLETED else {},
    )
    change = status.apply(task.snapshot, observation)
    assert change is not None
    target = events.Targets(settings).for_task(task)
    entries = events.outbox_entries(task, change, target, clock.now())
    assert 1 == store.record([TaskUpdate(task, change, entries)], clock.now())
    return task._replace(snapshot=change.after)


def complete(
    store: SqlStore,
    clock: Clock,
    settings: config.WebhookSettings,
    task_id: str = "task-1",
    **registration: Any,
) -> None:
    """Register a task and record its completion: one task.completed in the outbox."""
    task = register(store, clock, task_id, **registration)
    observe(store, clock, settings, task, TaskStatus.COMPLETED)


def outbox(store: SqlStore) -> list[DeliveryRecord]:
    """Every delivery with its attempt log, oldest first."""
    rows, _ = store.list_deliveries(limit=1000)
    return list(reversed(rows))


def only(store: SqlStore) -> DeliveryRecord:
    """The one delivery in the outbox."""
    [delivery] = outbox(store)
    return delivery


def retry_in(delivery: DeliveryRecord, clock: FakeClock) -> float:
    """Seconds from now until the delivery's next attempt."""
    assert delivery.state == "pending"
    assert delivery.next_attempt_at is not None
    return (delivery.next_attempt_at - clock.now()).total_seconds()


def verify(received: Received, secret: str = SECRET) -> Any:
    """Check a request with the reference standardwebhooks library; returns the body."""
    return standardwebhooks.Webhook(secret).verify(received.body, received.headers)


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def arrival_gaps(requests: Sequence[Received]) -> list[float]:
    """Seconds between consecutive arrivals."""
    times = sorted(r.at for r in requests)
    return [b - a for a, b in itertools.pairwise(times)]


# -- a delivery and its retries -----------------------------------------------------------------


async def test_a_completed_task_is_posted_signed_with_the_contract_body(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """The POST carries the JSON body, the content type and a verifiable signature."""
    settings = hook_settings(receiver.url)
    complete(store, clock, settings, metadata={"user": "u-1"})

    async with deliverer_for(store, clock, settings) as deliverer:
        assert 1 == await deliverer.run_once()

    [request] = receiver.received
    body = verify(request)
    assert ("POST", "/hooks") == (request.method, request.path)
    assert "application/json" == request.headers["content-type"]
    assert str(int(clock.now().timestamp())) == request.headers["webhook-timestamp"]
    assert request.headers["webhook-signature"].startswith("v1,")
    assert {"type", "timestamp", "data"} == set(body)
    assert ("task.completed", "task-1", "completed", {"user": "u-1"}) == (
        body["type"],
        body["data"]["task_id"],
        body["data"]["status"],
        body["data"]["metadata"],
    )
    delivery = only(store)
    assert request.headers["webhook-id"] == delivery.webhook_id
    assert ("delivered", 1, 204) == (
        delivery.state,
        delivery.attempts,
        delivery.last_status_code,
    )


async def test_a_500_is_retried_after_the_delay_with_the_same_id(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """500 then 204: retried only once due, same webhook-id, a fresh timestamp, both logged."""
    settings = hook_settings(receiver.url)
    complete(store, clock, settings)
    receiver.reply(Reply(status=500, body=b"boom"), Reply(status=204))

    async with deliverer_for(store, clock, settings) as deliverer:
        assert 1 == await deliverer.run_once()
        failed = only(store)
        assert 10 == retry_in(failed, clock)
        assert ("HTTP 500", 500) == (failed.last_error, failed.last_status_code)

        assert 0 == await deliverer.run_once()  # not due yet
        assert 1 == receiver.count

        clock.advance(10)
        assert 1 == await deliverer.run_once()

    first, second = receiver.received
    verify(first)
    verify(second)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert int(second.headers["webhook-timestamp"]) == int(first.headers["webhook-timestamp"]) + 10
    assert first.body == second.body
    delivery = only(store)
    assert ("delivered", 2) == (delivery.state, delivery.attempts)
    assert [500, 204] == [a.status_code for a in delivery.log]
    assert ["boom", ""] == [a.response_excerpt for a in delivery.log]
    assert all(a.url == receiver.url and a.latency_ms > 0 for a in delivery.log)


async def test_the_wait_before_a_retry_runs_from_the_answer_not_from_the_post(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """A receiver that answers 500 four seconds (of the fake clock) after the POST: the retry
    waits the whole first delay, 10 s, from the answer. (It was counted from the POST: 6 s
    after the answer; a timeout as long as the 60 s floor was retried at once.)"""
    settings = hook_settings(receiver.url)
    complete(store, clock, settings)
    receiver.default = Reply(status=500)
    receiver.on_receive = lambda _request: clock.advance(4)

    async with deliverer_for(store, clock, settings) as deliverer:
        await deliverer.run_once()

    failed = only(store)
    assert 10 == retry_in(failed, clock)
    assert 4 == (clock.now() - failed.log[0].at).total_seconds()  # the attempt: when it began


@pytest.mark.parametrize(("rand", "delay"), [(0.0, 8.0), (0.5, 10.0), (0.75, 11.0)])
async def test_retry_delays_are_jittered_by_twenty_percent(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver, rand: float, delay: float
) -> None:
    """The scheduled delay is scaled into [0.8, 1.2] by the injected random number."""
    settings = hook_settings(receiver.url)
    complete(store, clock, settings)
    receiver.default = Reply(status=503)

    async with deliverer_for(store, clock, settings, rand=lambda: rand) as deliverer:
        await deliverer.run_once()

    assert delay == pytest.approx(retry_in(only(store), clock))


@pytest.mark.parametrize(
    ("retry_after", "delay"),
    [("150", 150.0), ("5", 100.0), ("1000", 200.0), ("soon", 100.0)],
    ids=["inside", "clamped-up", "clamped-down", "unparsable"],
)
async def test_retry_after_seconds_is_honoured_within_bounds(
    store: SqlStore,
    clock: FakeClock,
    receiver: WebhookReceiver,
    retry_after: str,
    delay: float,
) -> None:
    """Retry-After in seconds is followed but kept within [scheduled, 2x scheduled]."""
    settings = hook_settings(receiver.url, retry_delays=[100, 200])
    complete(store, clock, settings)
    receiver.reply(Reply(status=503, headers={"Retry-After": retry_after}))

    async with deliverer_for(store, clock, settings) as deliverer:
        await deliverer.run_once()

    assert delay == retry_in(only(store), clock)


async def test_retry_after_as_an_http_date(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """An HTTP-date Retry-After counts from the attempt's time."""
    settings = hook_settings(receiver.url, retry_delays=[100])
    complete(store, clock, settings)
    when = format_datetime(clock.now() + timedelta(seconds=170), usegmt=True)
    receiver.reply(Reply(status=503, headers={"Retry-After": when}))

    async with deliverer_for(store, clock, settings) as deliverer:
        await deliverer.run_once()

    assert 170 == retry_in(only(store), clock)


@pytest.mark.parametrize(
    "headers", [{}, {"Retry-After": "3"}, {"Retry-After": "Thu, 01 Jan 1970 00:00:00 GMT"}]
)
async def test_a_429_waits_at_least_the_overload_floor(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver, headers: dict[str, str]
) -> None:
    """429 Too Many Requests waits at least 60 s, whatever the schedule or Retry-After say."""
    settings = hook_settings(receiver.url, retry_delays=[5])
    complete(store, clock, settings)
    receiver.reply(Reply(status=429, headers=headers))

    async with deliverer_for(store, clock, settings) as deliverer:
        await deliverer.run_once()

    delivery = only(store)
    assert 60 == retry_in(delivery, clock)
    assert (429, "HTTP 429") == (delivery.last_status_code, delivery.last_error)


async def test_a_slow_answer_times_out_and_waits_the_overload_floor(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """An answer slower than the timeout is abandoned at the timeout and retried after 60 s."""
    settings = hook_settings(receiver.url, timeout=0.3)
    complete(store, clock, settings)
    receiver.reply(Reply(status=204, delay=1))

    async with deliverer_for(store, clock, settings) as deliverer:
        started = time.monotonic()
        await deliverer.run_once()
        took = time.monotonic() - started

    delivery = only(store)
    assert 0.3 <= took < 0.9
    assert ("timeout", None) == (delivery.last_error, delivery.last_status_code)
    assert 60 == retry_in(delivery, clock)
    assert 250 <= delivery.log[0].latency_ms < 900


async def test_a_huge_answer_is_read_only_in_part(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """A 10 MB answer does not slow the attempt, and only the first bytes are kept."""
    settings = hook_settings(receiver.url)
    complete(store, clock, settings)
    receiver.reply(Reply(status=200, body_size=10_000_000))

    async with deliverer_for(store, clock, settings) as deliverer:
        started = time.monotonic()
        await deliverer.run_once()
        took = time.monotonic() - started

    delivery = only(store)
    assert "delivered" == delivery.state
    assert "x" * EXCERPT_BYTES == delivery.log[0].response_excerpt
    assert took < 1.0


@pytest.mark.parametrize(("code", "state"), [(200, "delivered"), (503, "pending")])
async def test_an_answer_over_max_response_bytes_is_cut_and_judged_by_its_status(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver, code: int, state: str
) -> None:
    """With [webhooks].max_response_bytes at 1024, only 1024 bytes of a 5,000-byte answer are
    read (less than the 2 KiB the log would keep), and the attempt counts by its status code.
    """
    settings = hook_settings(receiver.url, max_response_bytes=1024)
    complete(store, clock, settings)
    receiver.reply(Reply(status=code, body=b"y" * 5000))

    async with deliverer_for(store, clock, settings) as deliverer:
        await deliverer.run_once()

    delivery = only(store)
    assert (state, code) == (delivery.state, delivery.last_status_code)
    assert "y" * 1024 == delivery.log[0].response_excerpt


async def test_a_reload_changes_the_answer_cap_for_the_next_attempt(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """max_response_bytes is read at each attempt, so a reloaded value applies at once."""
    settings = hook_settings(receiver.url, max_response_bytes=1024)
    complete(store, clock, settings)
    receiver.reply(Reply(status=503, body=b"z" * 5000), Reply(status=503, body=b"z" * 5000))

    async with deliverer_for(store, clock, settings) as deliverer:
        await deliverer.run_once()
        deliverer.configure(settings.model_copy(update={"max_response_bytes": 1500}))
        clock.advance(10)
        await deliverer.run_once()

    assert [1024, 1500] == [len(a.response_excerpt or "") for a in only(store).log]


@pytest.mark.parametrize("code", [301, 302, 307, 308])
async def test_redirects_are_failures_and_never_followed(
    store: SqlStore,
    clock: FakeClock,
    receiver: WebhookReceiver,
    other: WebhookReceiver,
    code: int,
) -> None:
    """A 3xx is a failed attempt; the Location it names is never contacted."""
    settings = hook_settings(receiver.url)
    complete(store, clock, settings)
    receiver.default = Reply(status=code, headers={"Location": other.url})

    async with deliverer_for(store, clock, settings) as deliverer:
        await deliverer.run_once()
        clock.advance(10)
        await deliverer.run_once()

    delivery = only(store)
    assert 2 == receiver.count
    assert 0 == other.count
    assert all(verify(r) for r in receiver.received)
    assert (code, f"HTTP {code} (redirects are not followed)") == (
        delivery.last_status_code,
        delivery.last_error,
    )
    assert "pending" == delivery.state


async def test_410_gone_kills_the_delivery_at_once(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """410 Gone ends the delivery after one attempt, with retries left."""
    settings = hook_settings(receiver.url)
    complete(store, clock, settings)
    receiver.reply(Reply(status=410, body=b"unsubscribed"))

    async with deliverer_for(store, clock, settings) as deliverer:
        await deliverer.run_once()
        clock.advance(100)
        assert 0 == await deliverer.run_once()

    delivery = only(store)
    assert ("dead", 1, "410 Gone") == (delivery.state, delivery.attempts, delivery.last_error)
    assert "unsubscribed" == delivery.log[0].response_excerpt
    assert 1 == receiver.count


async def test_a_closed_port_is_retried(store: SqlStore, clock: FakeClock) -> None:
    """A refused connection is a failed attempt with the error kept, retried on schedule."""
    url = f"http://127.0.0.1:{closed_port()}/hooks"
    settings = hook_settings(url)
    complete(store, clock, settings)

    async with deliverer_for(store, clock, settings) as deliverer:
        await deliverer.run_once()

    delivery = only(store)
    assert delivery.last_status_code is None
    assert delivery.last_error is not None
    assert delivery.last_error.startswith("ConnectError")
    assert 10 == retry_in(delivery, clock)
    assert url == delivery.log[0].url


async def test_exhausted_retries_leave_a_dead_delivery_and_an_error_log(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """After the last delay the delivery is dead, kept, and logged at error with its details."""
    settings = hook_settings(receiver.url, retry_delays=[1, 2])
    complete(store, clock, settings)
    receiver.default = Reply(status=500)

    async with deliverer_for(store, clock, settings) as deliverer:
        with structlog.testing.capture_logs() as logged:
            await deliverer.run_once()
            clock.advance(1)
            await deliverer.run_once()
            clock.advance(2)
            await deliverer.run_once()
            clock.advance(100)
            assert 0 == await deliverer.run_once()

    delivery = only(store)
    assert ("dead", 3) == (delivery.state, delivery.attempts)
    assert [500, 500, 500] == [a.status_code for a in delivery.log]
    assert 3 == receiver.count
    assert 1 == len({r.headers["webhook-id"] for r in receiver.received})
    assert 3 == len({r.headers["webhook-timestamp"] for r in receiver.received})
    assert all(verify(r) for r in receiver.received)
    [dead] = [e for e in logged if e["event"] == "webhook_dead"]
    assert "error" == dead["log_level"]
    assert ("task-1", receiver.url) == (dead["task_id"], dead["url"])
    assert "retries exhausted after 3 attempts (last: HTTP 500)" == dead["error"]
    assert 2 == sum(1 for e in logged if e["event"] == "webhook_retry")


# -- secrets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("named", [False, True], ids=["default", "endpoint"])
async def test_rotation_signs_with_both_secrets_until_the_old_one_expires(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver, named: bool
) -> None:
    """An unexpired previous secret adds a second signature; once expired only one is sent."""
    old, new = signing.new_secret(), signing.new_secret()
    rotation = {
        "secret": new,
        "previous_secrets": [{"secret": old, "expires_at": clock.now() + timedelta(seconds=30)}],
    }
    if named:
        settings = hook_settings(endpoints={"ops": {"url": receiver.url, **rotation}})
        registration = {"endpoint": "ops"}
    else:
        settings = hook_settings(receiver.url, **rotation)
        registration = {}
    complete(store, clock, settings, "task-1", **registration)

    async with deliverer_for(store, clock, settings) as deliverer:
        await deliverer.run_once()
        clock.advance(60)
        complete(store, clock, settings, "task-2", **registration)
        await deliverer.run_once()

    during, after = receiver.received
    assert 2 == len(during.headers["webhook-signature"].split(" "))
    verify(during, new)
    verify(during, old)
    assert 1 == len(after.headers["webhook-signature"].split(" "))
    verify(after, new)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verify(after, old)


async def test_an_unusable_secret_keeps_the_event_for_later(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """A secret that cannot sign fails the attempt without a request; the event is retried."""
    # config refuses such a secret; model_copy skips validation, as a bug elsewhere might
    settings = hook_settings(receiver.url).model_copy(
        update={"secret": SecretStr("whsec_not*base64")}
    )
    complete(store, clock, settings)

    async with deliverer_for(store, clock, settings) as deliverer:
        await deliverer.run_once()

    delivery = only(store)
    assert 0 == receiver.count
    assert delivery.last_error is not None
    assert delivery.last_error.startswith("cannot sign")
    assert 10 == retry_in(delivery, clock)


# -- ordering and isolation --------------------------------------------------------------------


async def test_a_tasks_later_event_waits_until_the_earlier_one_is_delivered(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """task.started fails; task.completed of the same task is not sent until it went through."""
    settings = hook_settings(receiver.url, events=["task.started", "task.completed"])
    task = register(store, clock)
    task = observe(store, clock, settings, task, TaskStatus.IN_PROGRESS)
    observe(store, clock, settings, task, TaskStatus.COMPLETED)
    receiver.reply(Reply(status=500))

    async with deliverer_for(store, clock, settings) as deliverer:
        assert 1 == await deliverer.run()
        assert 0 == await deliverer.run()
        assert ["task.started"] == [r.json()["type"] for r in receiver.received]

        clock.advance(10)
        assert 2 == await deliverer.run()

    assert ["task.started", "task.started", "task.completed"] == [
        r.json()["type"] for r in receiver.received
    ]
    assert ["delivered", "delivered"] == [d.state for d in outbox(store)]
    assert all(verify(r) for r in receiver.received)


async def test_a_hanging_receiver_does_not_hold_up_another(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver, other: WebhookReceiver
) -> None:
    """While one receiver sits on its requests, another gets and records all of its own."""
    settings = hook_settings(
        per_host=1,
        endpoints={
            "slow": {"url": receiver.url, "secret": SECRET},
            "fast": {"url": other.url, "secret": SECRET},
        },
    )
    for n in range(2):
        complete(store, clock, settings, f"slow-{n}", endpoint="slow")
    for n in range(3):
        complete(store, clock, settings, f"fast-{n}", endpoint="fast")
    receiver.default = Reply(status=204, delay=0.6)

    async with deliverer_for(store, clock, settings) as deliverer:
        started = time.monotonic()
        running = asyncio.create_task(deliverer.run_once())
        await asyncio.to_thread(other.wait_for, 3, 2.0)
        fast_done = time.monotonic() - started
        # The first slow one is held 0.6 s; the second waits for the host's only slot. (On a
        # loaded machine the first may reach its receiver after the fast ones: wait for it.)
        await asyncio.to_thread(receiver.wait_for, 1, 2.0)
        assert 1 == receiver.count
        while sum(d.state == "delivered" for d in outbox(store)) < 3:
            assert not running.done()
            await asyncio.sleep(0.02)
        assert not running.done()  # the fast ones were recorded while the slow ones hang
        assert 5 == await running
        took = time.monotonic() - started

    assert fast_done < 0.4
    assert took >= 1.2
    assert 5 * ["delivered"] == [d.state for d in outbox(store)]
    assert all(verify(r) for r in [*receiver.received, *other.received])


async def test_deliveries_that_cannot_start_in_time_are_left_for_a_later_pass(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a hanging receiver, what would wait too long for a slot is not attempted: it is
    held back for the wait budget, the timeout and 30 s, and a later pass takes it then.
    """
    monkeypatch.setattr("tracker.limits.MIN_WAIT_BUDGET", 0.5)
    settings = hook_settings(receiver.url, timeout=0.3, per_host=1)
    for n in range(4):
        complete(store, clock, settings, f"task-{n}")
    receiver.default = Reply(status=204, delay=1)

    async with deliverer_for(store, clock, settings) as deliverer:
        with structlog.testing.capture_logs() as logged:
            # one at a time, 0.3 s each: the third would start after its 0.5 s budget
            assert 2 == await deliverer.run_once()
        assert [1, 1, 0, 0] == [d.attempts for d in outbox(store)]
        [left] = [e for e in logged if e["event"] == "webhooks_left_for_later"]
        assert (2, 2, 0) == (left["count"], left["waited_too_long"], left["receiver_busy"])

        receiver.default = Reply(status=204)
        assert 0 == await deliverer.run_once()  # still claimed
        clock.advance(LEASE + 1)
        assert 0 == await deliverer.run_once()  # held back beyond the lease, not renewed
        clock.advance(31 - LEASE - 1)  # the hold: budget + timeout + 30 s
        assert 2 == await deliverer.run_once()

    assert ["pending", "pending", "delivered", "delivered"] == [d.state for d in outbox(store)]
    assert 4 == receiver.count


async def test_an_attempt_longer_than_the_lease_keeps_its_claim_while_the_pass_renews_it(
    store: SqlStore, receiver: WebhookReceiver
) -> None:
    """A receiver slower than the lease: the pass renews its claim every third of the lease,
    so another daemon's claims never take the delivery while the attempt is in flight.
    """
    clock = SystemClock()  # the other claims read the lease against the real time
    settings = hook_settings(receiver.url, timeout=3)
    complete(store, clock, settings)
    receiver.default = Reply(status=204, delay=1.5)

    async with deliverer_for(store, clock, settings) as deliverer:
        deliverer.outbox.lease = 0.5
        running = asyncio.create_task(deliverer.run_once())
        await asyncio.to_thread(receiver.wait_for, 1, 2.0)
        taken = []
        while not running.done():
            taken += await asyncio.to_thread(store.claim_deliveries, clock.now(), 10, lease=30)
            await asyncio.sleep(0.1)
        assert 1 == await running

    assert [] == taken
    assert 1 == receiver.count
    assert ("delivered", 1) == (only(store).state, only(store).attempts)


async def test_a_queued_delivery_taken_over_by_another_claim_is_dropped_unsent(
    store: SqlStore, receiver: WebhookReceiver
) -> None:
    """When a renewal finds that another claim took a delivery (its lease had lapsed), the
    pass does not send it: the other holder does.
    """
    clock = SystemClock()
    settings = hook_settings(receiver.url, timeout=3, per_host=1)
    for task_id in ("first", "second"):
        complete(store, clock, settings, task_id)
    receiver.default = Reply(status=204, delay=1.0)
    first, second = outbox(store)

    async with deliverer_for(store, clock, settings) as deliverer:
        deliverer.outbox.lease = 0.6
        running = asyncio.create_task(deliverer.run_once())
        await asyncio.to_thread(receiver.wait_for, 1, 2.0)  # the second waits for the slot
        # What another daemon does once the lease has lapsed: claim it for itself.
        with store.engine.begin() as conn:
            lapsed = clock.now().timestamp() - 1
            conn.execute(
                deliveries.update().where(deliveries.c.id == second.id).values(claimed_until=lapsed)
            )
        [job] = store.claim_deliveries(clock.now(), 10, lease=30)
        with structlog.testing.capture_logs() as logged:
            assert 1 == await running

    assert job.pk == second.id
    assert [first.webhook_id] == [r.headers["webhook-id"] for r in receiver.received]
    assert ["delivered", "pending"] == [d.state for d in outbox(store)]
    assert 0 == outbox(store)[1].attempts
    assert [1] == [e["count"] for e in logged if e["event"] == "webhooks_taken_over"]


async def test_a_receiver_known_to_hang_gets_only_what_it_can_start_in_time(
    store: SqlStore,
    clock: FakeClock,
    receiver: WebhookReceiver,
    other: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once a receiver has timed out, a claim takes on only a few of its deliveries (the rest
    keep their claim for a later pass), and another receiver's deliveries still go out.
    """
    monkeypatch.setattr("tracker.limits.MIN_WAIT_BUDGET", 0.5)
    settings = hook_settings(
        timeout=0.3,
        per_host=1,
        endpoints={
            "slow": {"url": receiver.url, "secret": SECRET},
            "fast": {"url": other.url, "secret": SECRET},
        },
    )
    receiver.default = Reply(status=204, delay=1)
    complete(store, clock, settings, "probe", endpoint="slow")

    async with deliverer_for(store, clock, settings) as deliverer:
        assert 1 == await deliverer.run_once()  # a timeout: the receiver is known to hang
        for n in range(10):
            complete(store, clock, settings, f"slow-{n}", endpoint="slow")
        for n in range(3):
            complete(store, clock, settings, f"fast-{n}", endpoint="fast")
        with structlog.testing.capture_logs() as logged:
            await deliverer.run_once()

    [left] = [e for e in logged if e["event"] == "webhooks_left_for_later"]
    # one slot, 0.3 s per answer: about 1 + 4 x 0.5 / 0.3 of the ten are taken on
    assert 2 <= left["receiver_busy"] <= 5
    assert receiver.count <= 3  # the probe, then what starts within the 0.5 s budget
    assert 3 == other.count
    fast = [d for d in outbox(store) if d.task_id.startswith("fast")]
    assert 3 * ["delivered"] == [d.state for d in fast]


async def test_endpoint_max_in_flight_limits_concurrent_requests(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver, other: WebhookReceiver
) -> None:
    """An endpoint with max_in_flight = 1 gets one request at a time; an unlimited one all."""
    settings = hook_settings(
        endpoints={
            "single": {"url": receiver.url, "secret": SECRET, "max_in_flight": 1},
            "open": {"url": other.url, "secret": SECRET},
        },
    )
    for n in range(3):
        complete(store, clock, settings, f"single-{n}", endpoint="single")
        complete(store, clock, settings, f"open-{n}", endpoint="open")
    receiver.default = other.default = Reply(status=204, delay=0.15)

    async with deliverer_for(store, clock, settings) as deliverer:
        assert 6 == await deliverer.run_once()

    assert all(gap >= 0.14 for gap in arrival_gaps(receiver.received))
    assert all(gap < 0.1 for gap in arrival_gaps(other.received))


async def test_per_host_limits_concurrent_requests_to_one_host(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """[webhooks].per_host = 1 sends one request at a time to a host."""
    settings = hook_settings(receiver.url, per_host=1)
    for n in range(3):
        complete(store, clock, settings, f"task-{n}")
    receiver.default = Reply(status=204, delay=0.15)

    async with deliverer_for(store, clock, settings) as deliverer:
        assert 3 == await deliverer.run_once()

    assert all(gap >= 0.14 for gap in arrival_gaps(receiver.received))


async def test_endpoint_rate_limit_spaces_requests(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """rate_limit = 10/s starts requests to the endpoint at least 0.1 s apart."""
    settings = hook_settings(
        endpoints={"paced": {"url": receiver.url, "secret": SECRET, "rate_limit": 10}}
    )
    for n in range(4):
        complete(store, clock, settings, f"task-{n}", endpoint="paced")

    async with deliverer_for(store, clock, settings) as deliverer:
        assert 4 == await deliverer.run_once()

    gaps = arrival_gaps(receiver.received)
    assert 3 == len(gaps)
    assert all(gap >= 0.08 for gap in gaps)


async def test_run_drains_more_than_one_claim_batch(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run() keeps claiming until nothing is due; each event is delivered exactly once."""
    monkeypatch.setattr("tracker.delivery.passes.CLAIM_BATCH", 4)
    settings = hook_settings(receiver.url)
    for n in range(10):
        complete(store, clock, settings, f"task-{n}")

    async with deliverer_for(store, clock, settings) as deliverer:
        assert 10 == await deliverer.run()

    ids = [r.headers["webhook-id"] for r in receiver.received]
    assert 10 == len(set(ids)) == len(ids)
    assert all(verify(r) for r in receiver.received)
    assert 10 * ["delivered"] == [d.state for d in outbox(store)]


class SlowWritingStore(SqlStore):
    """A real SQLite store whose result writes first wait ``delay`` seconds, as a write does
    behind a lock another daemon or the poller holds.
    """

    delay = 0.6
    writes: list[tuple[float, float]]  #: monotonic (start, end) of each write

    def finish_attempts(self, results: Sequence[Any]) -> None:
        started = time.monotonic()
        time.sleep(self.delay)
        super().finish_attempts(results)
        self.writes.append((started, time.monotonic()))


async def test_a_slow_store_write_holds_up_neither_the_event_loop_nor_the_sends(
    sqlite_url: str, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """Store rounds run on their own thread: while a write waits, the event loop keeps turning
    and the pass keeps sending.
    """
    store = SlowWritingStore.from_url(sqlite_url)
    store.writes = []
    store.create_schema()
    settings = hook_settings(receiver.url, per_host=1)
    for n in range(8):
        complete(store, clock, settings, f"task-{n}")
    # one at a time, 0.15 s each: the first write (after 0.5 s) starts while sends remain
    receiver.default = Reply(status=204, delay=0.15)
    gaps: list[float] = []

    async def heartbeat() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    beating = asyncio.create_task(heartbeat())
    try:
        async with deliverer_for(store, clock, settings) as deliverer:
            assert 8 == await deliverer.run_once()
    finally:
        beating.cancel()
        store.close()

    first_start, first_end = store.writes[0]
    assert any(first_start < r.at < first_end for r in receiver.received)
    assert max(gaps) < store.delay / 2
    assert 8 * ["delivered"] == [d.state for d in outbox(store)]


async def test_run_claims_nothing_once_told_to_stop(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """run(until=...) with the event set leaves due deliveries alone."""
    settings = hook_settings(receiver.url)
    complete(store, clock, settings)
    stop = asyncio.Event()
    stop.set()

    async with deliverer_for(store, clock, settings) as deliverer:
        assert 0 == await deliverer.run(until=stop)

    assert 0 == receiver.count
    assert "pending" == only(store).state


# -- the SSRF guard ----------------------------------------------------------------------------


async def test_a_registered_url_on_loopback_is_blocked_without_the_allow_list(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """A guarded delivery to 127.0.0.1 is dead at once with the reason; nothing is sent."""
    settings = hook_settings(allow_private=[])
    complete(store, clock, settings, webhook_url=receiver.url)

    async with deliverer_for(store, clock, settings) as deliverer:
        with structlog.testing.capture_logs() as logged:
            await deliverer.run_once()

    delivery = only(store)
    assert ("dead", 1) == (delivery.state, delivery.attempts)
    assert delivery.last_error is not None
    assert delivery.last_error.startswith("blocked")
    assert "loopback" in delivery.last_error
    assert 0 == receiver.count
    assert ["error"] == [e["log_level"] for e in logged if e["event"] == "webhook_dead"]


async def test_a_registered_url_on_an_allowed_network_is_delivered(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """allow_private = ["127.0.0.0/8"] lets a guarded delivery reach loopback."""
    settings = hook_settings(allow_private=["127.0.0.0/8"])
    complete(store, clock, settings, webhook_url=receiver.url)

    async with deliverer_for(store, clock, settings) as deliverer:
        await deliverer.run_once()

    assert "delivered" == only(store).state
    verify(receiver.received[0])


async def test_the_configured_url_is_trusted_without_the_allow_list(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """The operator's own [webhooks].url is not subject to the guard."""
    settings = hook_settings(receiver.url, allow_private=[])
    complete(store, clock, settings)

    async with deliverer_for(store, clock, settings) as deliverer:
        await deliverer.run_once()

    assert "delivered" == only(store).state


# -- events and targets, end to end ------------------------------------------------------------


async def test_events_reach_their_endpoint_signed_with_its_secret(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver, other: WebhookReceiver
) -> None:
    """A registration naming an endpoint gets task.started there, signed with that secret."""
    ops_secret = signing.new_secret()
    settings = hook_settings(
        receiver.url,
        endpoints={"ops": {"url": other.url, "secret": ops_secret, "events": ["task.started"]}},
    )
    task = register(store, clock, endpoint="ops")
    task = observe(store, clock, settings, task, TaskStatus.IN_PROGRESS, progress=10)
    observe(store, clock, settings, task, TaskStatus.COMPLETED)

    async with deliverer_for(store, clock, settings) as deliverer:
        await deliverer.run()

    assert 0 == receiver.count
    assert ["task.started", "task.completed"] == [
        verify(r, ops_secret)["type"] for r in other.received
    ]
    started = json.loads(other.received[0].body)["data"]
    assert ("in_progress", "pending", 10) == (
        started["status"],
        started["previous_status"],
        started["progress"],
    )


async def test_each_delivery_logs_one_info_line(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """A delivered webhook logs exactly one info line naming the task, URL and webhook-id."""
    settings = hook_settings(receiver.url)
    complete(store, clock, settings)

    async with deliverer_for(store, clock, settings) as deliverer:
        with structlog.testing.capture_logs() as logged:
            await deliverer.run_once()

    [line] = [e for e in logged if e["event"] == "webhook_delivered"]
    assert ("info", "task-1", receiver.url) == (line["log_level"], line["task_id"], line["url"])
    assert receiver.received[0].headers["webhook-id"] == line["webhook_id"]


async def test_answers_are_asked_for_uncompressed_so_the_attempt_log_reads_as_text(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """httpx offers gzip by default, and a receiver behind a compressing proxy would take it:
    the attempt log, which keeps the answer's first bytes as they came, would hold gzip. Each
    attempt asks for the answer as it is (accept-encoding: identity)."""
    settings = hook_settings(receiver.url)
    complete(store, clock, settings)
    receiver.default = Reply(status=500, body=b'{"error": "database is down"}')

    async with deliverer_for(store, clock, settings) as deliverer:
        await deliverer.run_once()

    assert "identity" == receiver.received[0].headers["accept-encoding"]
    assert '{"error": "database is down"}' == only(store).log[0].response_excerpt


async def test_a_password_in_a_tasks_webhook_url_stays_out_of_the_delivery_log_lines(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """A task's webhook_url may carry a receiver's user and password (basic auth, given at
    registration, so the log redactor does not know it): the retry and delivered lines name
    the URL without them. The webhook still goes to that URL, user and password included."""
    settings = hook_settings(receiver.url)
    with_password = receiver.url.replace("://", "://hook:S3cretPw-4d2a@", 1)
    complete(store, clock, settings, webhook_url=with_password)
    receiver.reply(Reply(status=500), Reply(status=204))
    async with deliverer_for(store, clock, settings) as deliverer:
        with structlog.testing.capture_logs() as logged:
            await deliverer.run_once()
            clock.advance(retry_in(only(store), clock))
            await deliverer.run_once()

    lines = [e for e in logged if e["event"] in {"webhook_retry", "webhook_delivered"}]
    assert ["webhook_retry", "webhook_delivered"] == [e["event"] for e in lines]
    assert [receiver.url, receiver.url] == [e["url"] for e in lines]
    assert not [e for e in logged if "S3cretPw-4d2a" in repr(e)]
    assert 2 == len(receiver.received)
    assert receiver.received[-1].headers["authorization"].startswith("Basic ")


async def test_a_recovered_dead_delivery_gets_the_whole_retry_schedule_again(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """A delivery that died after the whole schedule, recovered once the receiver is back,
    is retried on the schedule from its start when its next attempt fails too; the attempt
    log keeps every try."""
    settings = hook_settings(receiver.url)  # retry_delays [10, 20, 40]: dead at the 4th
    complete(store, clock, settings)
    receiver.default = Reply(status=500)
    async with deliverer_for(store, clock, settings) as deliverer:
        for _ in range(4):
            await deliverer.run_once()
            clock.advance(100)
        assert ("dead", 4) == (only(store).state, only(store).attempts)
        assert [only(store).id] == store.requeue(clock.now(), since=clock.now() - timedelta(1))
        await deliverer.run_once()  # the receiver fails once more

    recovered = only(store)
    assert ("pending", 1) == (recovered.state, recovered.attempts)
    assert 10 == retry_in(recovered, clock)
    assert 5 == len(recovered.log)


async def test_one_slow_store_round_never_sends_a_delivery_twice(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write round longer than what was left of the lease lets the pass's next claim take
    a delivery the pass still has in flight: that one is sent once all the same, its result
    written under the new claim."""
    # A pass that keeps claiming while one receiver is slow (as a busy daemon's pace allows).
    monkeypatch.setattr("tracker.delivery.passes.HELD_SHARE_OF_BUDGET", 1000.0)
    store = SlowWritingStore.from_url(sqlite_url)
    store.writes = []
    store.delay = 0.7
    store.create_schema()
    clock = SystemClock()
    with WebhookReceiver() as slow, WebhookReceiver() as fast, WebhookReceiver() as medium:
        slow.default = Reply(status=204, delay=3.0)
        medium.default = Reply(status=204, delay=0.5)
        settings = hook_settings(timeout=6, url=fast.url)
        complete(store, clock, settings, "slow", webhook_url=slow.url)
        complete(store, clock, settings, "fast", webhook_url=fast.url)
        complete(store, clock, settings, "medium", webhook_url=medium.url)
        async with deliverer_for(store, clock, settings) as deliverer:
            deliverer.outbox.lease = 0.6  # renewed every 0.2 s; a write takes 0.7 s
            await deliverer.run()
        posts = [r.headers["webhook-id"] for r in slow.received]
    delivered = {d.task_id: (d.state, len(d.log)) for d in outbox(store)}
    store.close()

    assert 1 == len(posts)
    assert ("delivered", 1) == delivered["slow"]


async def test_events_for_an_endpoint_removed_from_the_config_wait_for_it_to_come_back(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver, other: WebhookReceiver
) -> None:
    """A task registered for an endpoint a reload then removed: its final event is still
    written; it is neither sent elsewhere nor signed with another secret but retried, and
    delivered once the endpoint is configured again (at its URL then, with its secret)."""
    ops_secret = signing.new_secret()
    task = register(store, clock, endpoint="ops")
    without = hook_settings(receiver.url)
    observe(store, clock, without, task, TaskStatus.COMPLETED)
    assert [("ops", "task.completed")] == [(d.endpoint, d.event_type) for d in outbox(store)]

    async with deliverer_for(store, clock, without) as deliverer:
        await deliverer.run_once()
        held = only(store)
        assert (0, "pending", 1) == (receiver.count, held.state, held.attempts)
        assert "endpoint 'ops' is not in [webhooks.endpoints]: not sent" == held.last_error
        back = {"ops": {"url": other.url, "secret": ops_secret}}
        deliverer.configure(hook_settings(receiver.url, endpoints=back))
        clock.advance(100)
        await deliverer.run_once()

    assert 0 == receiver.count
    assert ["task.completed"] == [verify(r, ops_secret)["type"] for r in other.received]
    assert ("delivered", other.url) == (only(store).state, only(store).url)
    assert other.url == only(store).log[-1].url


async def test_events_for_the_default_url_follow_it_when_a_reload_moves_it(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver, other: WebhookReceiver
) -> None:
    """The app moved: [webhooks].url changes while its event is being retried. The next
    attempt goes to the new URL (not to the old host until it dies); with no default URL at
    all the event is held, not sent, and retried."""
    complete(store, clock, hook_settings(receiver.url))
    receiver.default = Reply(status=503)
    async with deliverer_for(store, clock, hook_settings(receiver.url)) as deliverer:
        await deliverer.run_once()
        assert ("pending", 1) == (only(store).state, receiver.count)
        deliverer.configure(hook_settings(None))
        clock.advance(100)
        await deliverer.run_once()
        held = only(store)
        assert ("pending", 1) == (held.state, receiver.count)
        assert "no [webhooks].url in the config: not sent" == held.last_error
        deliverer.configure(hook_settings(other.url))
        clock.advance(100)
        await deliverer.run_once()

    assert ["task.completed"] == [verify(r, SECRET)["type"] for r in other.received]
    assert ("delivered", other.url) == (only(store).state, only(store).url)


async def test_an_event_decided_while_webhooks_url_is_unset_is_kept_until_it_is_back(
    store: SqlStore, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    """A task registered for the default target completes while [webhooks].url is unset (a
    reload took it out): its event is written all the same, held (not sent) and retried, and
    delivered once the URL is back. (It was not written at all: lost, nothing to recover.)"""
    task = register(store, clock)
    observe(store, clock, hook_settings(None), task, TaskStatus.COMPLETED)
    async with deliverer_for(store, clock, hook_settings(None)) as deliverer:
        await deliverer.run_once()
        held = only(store)
        assert ("pending", 0) == (held.state, receiver.count)
        assert "no [webhooks].url in the config: not sent" == held.last_error
        deliverer.configure(hook_settings(receiver.url))
        clock.advance(100)
        await deliverer.run_once()

    assert ["task.completed"] == [verify(r)["type"] for r in receiver.received]
    assert ("delivered", receiver.url) == (only(store).state, only(store).url)


# -- a re-queue while the pass holds the delivery ----------------------------------------------


@pytest.mark.parametrize("moment", ["queued", "in flight"])
async def test_a_delivery_requeued_while_this_pass_holds_it_is_sent_once_on_the_new_schedule(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    """An operator re-queues a delivery on its last retry while this daemon has it queued
    behind a slow receiver, or in flight. The pass claims it again at once; it is POSTed once
    (no second copy from the claim before), and its failure counts as the first attempt of
    the schedule started again: pending, 1 attempt, not dead."""
    monkeypatch.setattr(passes, "HELD_SHARE_OF_BUDGET", 1000.0)  # keeps claiming: a busy pass
    clock = SystemClock()
    with WebhookReceiver() as receiver:
        settings = hook_settings(receiver.url, timeout=3, per_host=1)
        complete(store, clock, settings, "first")
        complete(store, clock, settings, "last-try")
        _first, last_try = outbox(store)
        with store.engine.begin() as conn:
            conn.execute(
                deliveries.update().where(deliveries.c.id == last_try.id).values(attempts=3)
            )
        receiver.default = Reply(status=500, delay=1.0)
        async with deliverer_for(store, clock, settings) as deliverer:
            deliverer.outbox.lease = 0.6  # renewed every 0.2 s: the re-queue is seen at once
            running = asyncio.create_task(deliverer.run())
            await asyncio.to_thread(receiver.wait_for, 1 if moment == "queued" else 2, 3.0)
            assert [last_try.id] == store.requeue(clock.now(), pk=last_try.id)
            await running

    webhook_ids = [r.headers["webhook-id"] for r in receiver.received]
    assert 1 == webhook_ids.count(last_try.webhook_id)
    after = outbox(store)[1]
    assert ("pending", 1) == (after.state, after.attempts)
    assert 1 == len(after.log)


class _HeldSender:
    """Sends nothing until told: each attempt fails, dead from the 4th on (the schedule)."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.sent: list[DeliveryJob] = []

    async def send(
        self, job: DeliveryJob, *, decide_as: Callable[[], DeliveryJob] | None = None
    ) -> AttemptResult:
        self.sent.append(job)
        await self.go.wait()
        decided = job if decide_as is None else decide_as()
        state = DeliveryState.DEAD if decided.attempts >= 3 else DeliveryState.PENDING
        return AttemptResult(decided, datetime.now(UTC), 500, "refused", 1.0, "", state, None)


class _ScriptedOutbox:
    """Each store round answers what the test scripted for it, and keeps what it was given."""

    lease = 6.0

    def __init__(self) -> None:
        self.rounds: list[Callable[[], Awaitable[Round]]] = []
        self.written: list[list[AttemptResult]] = []

    async def round(self, batch: list[AttemptResult], claim: int, **_: object) -> Round:
        self.written.append(list(batch))
        return await self.rounds.pop(0)()


class _OpenAdmission:
    settings = hook_settings("http://h.example/hooks")

    def admit(self, job: DeliveryJob) -> Ticket:
        return Ticket(job, "h.example", Load(), None, math.inf)

    async def take_slots(self, _ticket: Ticket) -> list[asyncio.Semaphore]:
        return []

    def release(self, _ticket: Ticket) -> None:
        pass


def _claimed(attempts: int, token: float) -> DeliveryJob:
    return DeliveryJob(
        pk=1, webhook_id="msg_1", task_pk=1, platform="luma", task_id="t", payload=b"{}",
        event_type=EventType.COMPLETED, url="http://h.example/hooks", endpoint=None,
        guarded=False, attempts=attempts, lease_until=token,
    )  # fmt: skip


async def test_an_attempt_ended_in_the_round_reclaiming_it_after_a_requeue_moves_nothing() -> None:
    """The narrowest case of a re-queue: the attempt on the last retry is in flight, a renewal
    finds the claim gone (re-queued), and the attempt ends while the round claiming the
    delivery again runs. That attempt is written to move nothing (its schedule was replaced),
    and the delivery is sent again under the new claim, on the schedule started again."""
    sender, outbox = _HeldSender(), _ScriptedOutbox()
    work = passes.DeliveryPass(
        admission=_OpenAdmission(),  # type: ignore[arg-type]
        sender=sender,  # type: ignore[arg-type]
        outbox=outbox,  # type: ignore[arg-type]
        refill=True,
        until=None,
    )

    async def first() -> Round:
        return Round(jobs=[_claimed(3, 100.0)], renewed=set(), until=0.0)

    async def requeued_and_claimed_again() -> Round:
        sender.go.set()  # the attempt ends while this round runs
        for _ in range(3):
            await asyncio.sleep(0)
        return Round(jobs=[_claimed(0, 200.0)], renewed=set(), until=0.0)

    async def last() -> Round:
        return Round(jobs=[], renewed=set(), until=0.0)

    outbox.rounds += [first, requeued_and_claimed_again, last]
    [(_, _, ticket)] = (await work.round([], 1, renew=False)).units
    attempt = asyncio.create_task(work.perform(ticket))
    await asyncio.sleep(0)
    again = await work.round([], 1, renew=True)
    stale = await attempt
    assert stale is not None
    await work.round([stale], 0, renew=False)

    assert [0] == [job.attempts for _, _, t in again.units for job in [t.job]]
    [written] = outbox.written[-1]
    assert math.isnan(written.job.lease_until or 0.0)  # no lease equals it: moves nothing
