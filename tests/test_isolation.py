"""One bad value, item, answer or delivery result affects only itself (SQLite and PostgreSQL)."""

from __future__ import annotations

import collections
import itertools
import json
import math
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from conftest import WEBHOOK_SECRET
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from test_sanitize import dirty_json, dirty_scalars, dirty_text

from tracker import config, events, platforms, sanitize, status
from tracker.clock import FakeClock
from tracker.metrics import Metrics
from tracker.platforms import NewApiBatch
from tracker.platforms.answers import UpstreamError
from tracker.platforms.base import Glance, Platform
from tracker.platforms.observations import clean_observation, read_progress
from tracker.poller import Poller
from tracker.status import Change, Observation, Snapshot, TaskStatus
from tracker.store import AttemptResult, Registration, Replan, SqlStore, TaskUpdate
from tracker.store.outbox import UNRECORDED_WAIT
from tracker.store.records import DueTask
from tracker.store.refusals import MEMORY_REASONS, RefusalMemory
from tracker.store.sql import deliveries
from tracker.testing.simulator import FAULT_KINDS, POISON_KINDS, SimulatedRelay

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TLS = ssl.create_default_context()
HEALTHY = [f"ok-{n}" for n in range(6)]
#: answers that are a relay error for that request; the others are usable (maybe empty)
RELAY_ERRORS = FAULT_KINDS - {"slow", "null_envelope", "junk_items"}
#: examples of the store fuzz, per database; docs/reliability.md quotes the total
FUZZ_STORE_EXAMPLES = 100


@pytest.fixture(name="client")
async def _client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(verify=TLS) as client:
        yield client


def built(relay: SimulatedRelay, **upstream: Any) -> dict[str, Platform]:
    document = {
        "upstream": {"base_url": relay.base_url, "api_key": "sk-sim", **upstream},
        "webhooks": {"url": "http://127.0.0.1:9/hooks", "secret": WEBHOOK_SECRET},
    }
    return platforms.build(config.parse(document, environ={}))


def storable(observation: Any) -> None:
    """Everything an observation carries is strict JSON, UTF-8, NUL-free and within its cap."""
    for text, cap in (
        (observation.upstream_status, sanitize.MAX_WORD),
        (observation.upstream_progress or "", sanitize.MAX_WORD),
        (observation.fail_reason, sanitize.MAX_REASON),
    ):
        assert len(text) <= cap
        assert "\x00" not in text
        text.encode("utf-8")
    dumped = json.dumps(observation.result, allow_nan=False, ensure_ascii=False)
    assert "\x00" not in dumped
    dumped.encode("utf-8")


# -- relay answers, read by the adapters ---------------------------------------------------


@pytest.mark.parametrize("family", ["luma", "midjourney", "video", "replicate"])
@pytest.mark.parametrize("kind", sorted(RELAY_ERRORS))
async def test_every_malformed_answer_is_a_relay_error_and_the_next_is_read(
    client: httpx.AsyncClient, family: str, kind: str
) -> None:
    """Each malformed answer (status, body, encoding, nesting, stall, trickle, size, reset)
    is an UpstreamError or an httpx error within the deadline; the next request is read.
    """
    with SimulatedRelay(step=0.0) as relay:
        relay.trickle_seconds = 0.05
        platform = built(relay, timeout=0.5, max_response_bytes=1024 * 1024)[family]
        relay.fail_next(kind)
        with pytest.raises((UpstreamError, httpx.HTTPError)):
            await platform.fetch(client, ["ok-1"])
        [observation] = await platform.fetch(client, ["ok-1"])
    assert TaskStatus.COMPLETED == observation.status


async def test_an_answer_no_adapter_foresaw_is_a_relay_error_not_a_crash(
    client: httpx.AsyncClient,
) -> None:
    """A parsing bug tripped by an odd answer (here a TypeError) is an UpstreamError."""

    class Brittle(NewApiBatch):
        async def ask(self, client: httpx.AsyncClient, ids: Sequence[str]) -> list[Observation]:
            items = await self.post_ids(client, ids)
            return [items[0]["status"] + 1]  # a str + int: the kind of slip odd data trips

    with SimulatedRelay(step=0.0) as relay:
        platform = built(relay)["luma"]
        brittle = Brittle("luma", platform.upstream, "/luma/tasks", platform.statuses, batch_size=9)
        with pytest.raises(UpstreamError, match="unreadable answer: TypeError"):
            await brittle.fetch(client, ["ok-1"])


@pytest.mark.parametrize("kind", ["null_envelope", "junk_items"])
async def test_answers_without_usable_items_observe_nothing(
    client: httpx.AsyncClient, kind: str
) -> None:
    """A null `data` or items of the wrong types give no observation and no error."""
    with SimulatedRelay(step=0.0) as relay:
        relay.fail_next(kind)
        assert [] == await built(relay)["luma"].fetch(client, ["ok-1"])


async def test_an_answer_declaring_400_mb_is_refused_unread(client: httpx.AsyncClient) -> None:
    """The Content-Length alone refuses a 400 MB answer, naming the limit."""
    with SimulatedRelay(step=0.0) as relay:
        relay.fail_next("huge_body")
        with pytest.raises(UpstreamError, match="over the 33554432 byte limit"):
            await built(relay)["luma"].fetch(client, ["ok-1"])


async def test_a_relay_echoing_its_key_leaves_no_part_of_it_in_the_error() -> None:
    """An error page quoting the request's key is redacted before it is cut to an excerpt."""
    key = "sk-live-" + "k" * 40
    # Cut at 300 characters, the page would keep the key's first 12.
    page = b"x" * (sanitize.EXCERPT_CHARS - 12) + key.encode()

    def echo(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, content=page, headers={"content-type": "text/html"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(echo)) as client:
        with SimulatedRelay(step=0.0) as relay:
            platform = built(relay)["luma"]
            platform.upstream = platforms.Upstream("r", relay.base_url, key)
            with pytest.raises(UpstreamError) as caught:
                await platform.fetch(client, ["ok-1"])
    assert key[:9] not in str(caught.value)
    assert "[redacted]" in str(caught.value)


@pytest.mark.parametrize("family", ["luma", "suno", "midjourney", "video", "kling", "replicate"])
@pytest.mark.parametrize("kind", sorted(POISON_KINDS))
async def test_a_poisoned_item_is_cleaned_and_its_neighbours_read(
    client: httpx.AsyncClient, family: str, kind: str
) -> None:
    """Beside a malformed item, every healthy id reads COMPLETED; what the bad one gives, if
    anything, is clean enough for any database and strict JSON.
    """
    with SimulatedRelay(step=0.0) as relay:
        relay.poison(family, "bad", kind)
        platform = built(relay)[family]
        with capture_logs() as logs:
            if platform.per_id:
                # One id per request: a bad answer may be a relay error, for itself alone.
                seen = []
                for task_id in ("ok-1", "bad", "ok-2"):
                    try:
                        seen += await platform.fetch(client, [task_id])
                    except UpstreamError:
                        assert "bad" == task_id
            else:
                seen = await platform.fetch(client, ["ok-1", "bad", "ok-2"])
    by_id = {o.task_id: o for o in seen}
    assert {"ok-1", "ok-2"} <= set(by_id)
    assert {"ok-1", "ok-2", "bad"} >= set(by_id)
    for observation in seen:
        storable(observation)
    assert TaskStatus.COMPLETED == by_id["ok-1"].status == by_id["ok-2"].status
    if kind == "duplicate_conflict" and not platform.per_id:
        [line] = [e for e in logs if e["event"] == "upstream_conflicting_duplicates"]
        assert {"bad": ["IN_PROGRESS", by_id["bad"].upstream_status]} == line["statuses"]
        assert TaskStatus.COMPLETED == by_id["bad"].status  # the most advanced copy wins
    if kind == "unasked_extra" and not platform.per_id:
        [line] = [e for e in logs if e["event"] == "upstream_unasked_ids"]
        assert ["unasked-bad"] == line["ids"]


@pytest.mark.parametrize("family", ["luma", "suno", "midjourney"])
@pytest.mark.parametrize("kind", sorted(POISON_KINDS))
async def test_fetch_seen_reads_every_id_as_fetch_does(
    client: httpx.AsyncClient, family: str, kind: str
) -> None:
    """What the drain asks with (`fetch_seen`: glances where a platform takes them, each read
    in full here) gives per id the very observations `fetch` gives, poisoned answers too."""
    ids = ["ok-1", "bad", "ok-2"]
    with SimulatedRelay(step=0.0) as relay:
        relay.poison(family, "bad", kind)
        platform = built(relay)[family]
        fetched = {o.task_id: o for o in await platform.fetch(client, ids)}
        seen = await platform.fetch_seen(client, ids)
    read = {
        task_id: platform.observe_glance(value) if isinstance(value, Glance) else value
        for task_id, value in seen.items()
    }
    assert read == fetched


@pytest.mark.parametrize(("family", "glances"), [("luma", True), ("suno", True), ("kling", False)])
async def test_a_plain_batch_answer_is_glanced_at(
    client: httpx.AsyncClient, family: str, glances: bool
) -> None:
    """luma and suno hand the drain a glance per id of a plain answer (no Observation built);
    other platforms hand out observations."""
    with SimulatedRelay(step=1000.0) as relay:
        seen = await built(relay)[family].fetch_seen(client, ["a", "b"])
    assert {"a", "b"} == set(seen)
    assert all(isinstance(v, Glance) == glances for v in seen.values())


# -- the poll cycle and the store, on both databases ---------------------------------------


@pytest.fixture(name="poller_for")
async def _poller_for(
    store: SqlStore, relay: SimulatedRelay
) -> AsyncIterator[Callable[[], Poller]]:
    async with httpx.AsyncClient(verify=TLS) as client:
        settings = config.parse(
            {
                "upstream": {"base_url": relay.base_url, "api_key": "sk-sim"},
                "webhooks": {"url": "http://127.0.0.1:9/hooks", "secret": WEBHOOK_SECRET},
            },
            environ={},
        )

        def make() -> Poller:
            return Poller(
                store=store,
                platforms=platforms.build(settings),
                client=client,
                clock=FakeClock(T0),
                settings=settings.poll,
                targets=events.Targets(settings.webhooks),
                metrics=Metrics(),
            )

        yield make


async def test_poisoned_items_in_one_batch_stop_none_of_the_healthy_tasks(
    store: SqlStore, relay: SimulatedRelay, poller_for: Callable[[], Poller]
) -> None:
    """Every poison kind in the same batch as healthy tasks: each healthy task completes with
    its final event in the outbox, on SQLite and PostgreSQL, and the cycle reports no error.
    """
    poisoned = [f"bad-{kind}" for kind in sorted(POISON_KINDS)]
    for task_id, kind in zip(poisoned, sorted(POISON_KINDS), strict=True):
        relay.poison("luma", task_id, kind)
    store.register(
        Registration("luma", [*HEALTHY, *poisoned], metadata={"m": 1}), T0 - timedelta(seconds=1)
    )
    report = await poller_for().run_cycle()

    assert 0 == report.errors
    for task_id in HEALTHY:
        task = store.get("luma", task_id)
        assert task is not None
        assert "completed" == task.status
    with store.engine.connect() as conn:
        finals = conn.execute(
            sa.select(deliveries.c.task_id).where(deliveries.c.event_type == "task.completed")
        ).scalars()
        assert set(HEALTHY) <= set(finals)


def bad_change(task: Any, **after: Any) -> Change:
    before = task.snapshot
    return Change(
        before=before,
        after=Snapshot(status=TaskStatus.FAILED, **after),
        result=None,
        events=("task.failed",),
    )


def test_record_writes_every_task_but_those_whose_values_the_database_refuses(
    store: SqlStore,
) -> None:
    """Values that slipped past cleaning (a lone surrogate; on PostgreSQL also NUL, a 200-char
    status and NaN in JSON) cost only their own task, logged once each; the rest is written.
    """
    ids = [f"t{n}" for n in range(9)]
    store.register(Registration("luma", ids), T0)
    due = {t.task_id: t for t in store.claim_due(T0, 100, lease=10)}
    bad = {
        "t1": {"fail_reason": "lone \ud800"},
        "t4": {"fail_reason": "nul \x00"},
        "t6": {"upstream_status": "X" * 200},
    }
    updates = [
        TaskUpdate(due[i], bad_change(due[i], **bad.get(i, {"fail_reason": "fine"}))) for i in ids
    ]
    nan_result = dataclass_replace_result(updates[7], {"score": math.nan})
    updates[7] = nan_result
    with capture_logs() as logs:
        written = store.record(updates, T0)

    refused = sorted(e["task_id"] for e in logs if e["event"] == "task_write_refused")
    expected = ["t1"] if store.dialect == "sqlite" else ["t1", "t4", "t6", "t7"]
    assert expected == refused
    assert len(ids) - len(expected) == written
    for task_id in ids:
        task = store.get("luma", task_id)
        assert task is not None
        assert ("pending" if task_id in expected else "failed") == task.status


def dataclass_replace_result(update: TaskUpdate, result: dict[str, Any]) -> TaskUpdate:
    assert update.change is not None
    change = Change(update.change.before, update.change.after, result, update.change.events)
    return TaskUpdate(update.task, change)


def test_a_result_the_database_refuses_is_written_without_the_answer_text(
    store: SqlStore,
) -> None:
    """An attempt whose answer text the database refuses (NUL on PostgreSQL, a lone surrogate
    anywhere) is still recorded, so the delivery is not sent again; its neighbours are whole.
    """
    store.register(Registration("luma", ["a", "b", "c"], webhook_url="http://h/x"), T0)
    due = store.claim_due(T0, 10, lease=10)
    entries = {
        t.task_id: events.outbox_entries(
            t,
            bad_change(t, fail_reason="r"),
            events.Target("http://h/x", None, guarded=False, events=frozenset()),
            T0,
        )
        for t in due
    }
    store.record(
        [TaskUpdate(t, bad_change(t, fail_reason="r"), entries[t.task_id]) for t in due], T0
    )
    jobs = store.claim_deliveries(T0, 10, lease=60)
    answers = {"a": "fine", "b": "nul \x00 here", "c": "lone \ud800"}
    results = [
        AttemptResult(
            job=job,
            at=T0,
            status_code=200,
            error=None,
            latency_ms=1.0,
            response_excerpt=answers[job.task_id],
            state="delivered",
            next_attempt_at=None,
        )
        for job in jobs
    ]
    with capture_logs() as logs:
        store.finish_attempts(results)

    refused = sorted(e["task_id"] for e in logs if e["event"] == "attempt_write_refused")
    assert (["c"] if store.dialect == "sqlite" else ["b", "c"]) == refused
    rows, _ = store.list_deliveries()
    assert {"delivered"} == {d.state for d in rows}
    assert [1, 1, 1] == [len(d.log) for d in rows]  # each attempt on record, once
    excerpts = {d.task_id: d.log[0].response_excerpt for d in rows}
    assert "fine" == excerpts["a"]
    assert "" == excerpts["c"]


def refuse_upstream_word(store: SqlStore, word: str) -> None:
    """Make the database refuse any task row taking ``word`` as its upstream status, as a
    constraint would: a real refusal, from the database itself."""
    statements = {
        "sqlite": [
            f"CREATE TRIGGER refuse_word BEFORE UPDATE ON tasks WHEN NEW.upstream_status = "
            f"'{word}' BEGIN SELECT RAISE(ABORT, 'the test refuses {word}'); END"
        ],
        "postgresql": [
            "CREATE FUNCTION refuse_word() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.upstream_status = '{word}' THEN RAISE EXCEPTION 'the test refuses {word}' "
            "USING ERRCODE = 'check_violation'; END IF; RETURN NEW; END $$",
            "CREATE TRIGGER refuse_word BEFORE UPDATE ON tasks FOR EACH ROW "
            "EXECUTE FUNCTION refuse_word()",
        ],
    }
    with store.engine.begin() as conn:
        for statement in statements[store.dialect]:
            conn.exec_driver_sql(statement)


async def test_a_task_the_database_refuses_is_logged_once_and_asked_once_per_max_interval(
    store: SqlStore, relay: SimulatedRelay, poller_for: Callable[[], Poller]
) -> None:
    """A task whose answer the database refuses is logged once, set aside and asked again
    once per [poll].max_interval (120 s) instead of at every claim's end (one interval), costs its
    neighbour nothing, and is written as usual once its answer can be stored.
    """
    refuse_upstream_word(store, "REFUSED")
    relay.set("luma", "bad", "REFUSED")
    relay.set("luma", "ok", "SUCCESS")
    store.register(Registration("luma", ["bad", "ok"]), T0 - timedelta(seconds=1))
    poller = poller_for()
    with capture_logs() as logs:
        for _ in range(36):  # six minutes, a cycle every 10 s
            await poller.run_cycle()
            poller.clock.advance(10)
        asked = collections.Counter(i for r in relay.requests for i in r.json_body["ids"])
        refused = [e for e in logs if e["event"] == "task_write_refused"]

        relay.set("luma", "bad", "SUCCESS")
        for _ in range(12):
            await poller.run_cycle()
            poller.clock.advance(10)

    assert 3 == asked["bad"]  # at 0, 120 and 240 s; when its claim ended (each 10 s) it was 36
    assert 1 == asked["ok"]
    [line] = refused
    assert ("bad", "2026-01-01T00:02:00+00:00") == (line["task_id"], line["next_poll"])
    assert "the test refuses REFUSED" in line["error"]
    assert ["bad"] == [e["task_id"] for e in logs if e["event"] == "task_write_accepted"]
    for task_id in ("bad", "ok"):
        task = store.get("luma", task_id)
        assert task is not None
        assert "completed" == task.status


async def test_a_refused_task_whose_answer_returns_to_what_it_holds_is_accepted_again(
    store: SqlStore, relay: SimulatedRelay, poller_for: Callable[[], Poller]
) -> None:
    """A refused task whose next answer is the one it holds (a glance, replanned without an
    update) is logged as accepted by name, and a later refusal is news again."""
    refuse_upstream_word(store, "REFUSED")
    relay.set("luma", "t", "QUEUED")
    store.register(Registration("luma", ["t"]), T0 - timedelta(seconds=1))
    poller = poller_for()
    with capture_logs() as logs:
        for word in ("QUEUED", "REFUSED", "QUEUED", "REFUSED"):
            relay.set("luma", "t", word)
            await poller.run_cycle()
            poller.clock.advance(130)  # past the set-aside of a refusal (max_interval)

    events_seen = [e["event"] for e in logs if e["event"].startswith("task_write_")]
    assert events_seen == ["task_write_refused", "task_write_accepted", "task_write_refused"]
    assert [e.get("task_id") for e in logs if e["event"] == "task_write_accepted"] == ["t"]
    task = store.get("luma", "t")
    assert task is not None
    assert (task.status, task.upstream_status) == ("queued", "QUEUED")


def test_a_refused_task_is_logged_again_only_for_a_new_reason(store: SqlStore) -> None:
    """The same refusal at the next poll writes no line; a different one does."""
    store.register(Registration("luma", ["t"]), T0)
    attempts = [
        {"fail_reason": "lone \ud800"},
        {"fail_reason": "lone \ud800"},
        {"fail_reason": "ok", "progress": 2**70},  # no integer column holds it
    ]
    with capture_logs() as logs:
        for n, values in enumerate(attempts):
            now = T0 + timedelta(seconds=100 * n)
            [due] = store.claim_due(now, 10, lease=10)
            aside = now.timestamp() + 50
            update = TaskUpdate(due, bad_change(due, **values), set_aside_until=aside)
            assert 0 == store.record([update], now)
            assert [] == store.claim_due(now + timedelta(seconds=49), 10, lease=10)

    errors = [e["error"] for e in logs if e["event"] == "task_write_refused"]
    assert 2 == len(errors)
    assert errors[0] != errors[1]
    task = store.get("luma", "t")
    assert task is not None
    assert "pending" == task.status


def test_a_result_no_write_can_record_sets_its_delivery_aside_and_is_logged_once(
    store: SqlStore,
) -> None:
    """An attempt the database refuses even without the answer text (a status code no
    integer column holds) puts the delivery's next attempt UNRECORDED_WAIT later, instead of
    sending it again when its claim ends, and is logged once however often it recurs.
    """
    store.register(Registration("luma", ["a"], webhook_url="http://h/x"), T0)
    [due] = store.claim_due(T0, 10, lease=10)
    target = events.Target("http://h/x", None, guarded=False, events=frozenset())
    change = bad_change(due, fail_reason="r")
    store.record([TaskUpdate(due, change, events.outbox_entries(due, change, target, T0))], T0)

    def attempt(at: datetime, status_code: int) -> None:
        [job] = store.claim_deliveries(at, 10, lease=60)
        store.finish_attempts(
            [
                AttemptResult(
                    job=job,
                    at=at,
                    status_code=status_code,
                    error=None,
                    latency_ms=1.0,
                    response_excerpt="",
                    state="pending" if status_code != 200 else "delivered",
                    next_attempt_at=(at + timedelta(seconds=5)).timestamp(),
                )
            ]
        )

    later = T0 + timedelta(seconds=UNRECORDED_WAIT)
    with capture_logs() as logs:
        attempt(T0, 2**70)
        assert [] == store.claim_deliveries(T0 + timedelta(seconds=61), 10, lease=60)
        assert later == store.next_delivery_at()
        attempt(later, 2**70)
        attempt(later + timedelta(seconds=UNRECORDED_WAIT), 200)

    kinds = collections.Counter(e["event"] for e in logs)
    assert (1, 1) == (kinds["attempt_write_refused"], kinds["attempt_unrecorded"])
    [delivery] = store.list_deliveries()[0]
    assert ("delivered", 1, [200]) == (
        delivery.state,
        delivery.attempts,
        [a.status_code for a in delivery.log],
    )


def test_the_refusal_memory_is_bounded() -> None:
    """The longest-remembered row is forgotten first, and a row's reasons are capped."""
    memory = RefusalMemory(rows=2)
    assert memory.first("a", "x")
    assert not memory.first("a", "x")
    assert memory.first("b", "x")
    assert memory.first("c", "x")  # forgets "a"
    assert memory.first("a", "x")
    reasons = [memory.first("d", f"reason {n}") for n in range(MEMORY_REASONS + 2)]
    assert [True] * MEMORY_REASONS + [False, False] == reasons
    assert memory.forget("d")
    assert not memory.forget("d")


def test_event_building_never_raises_for_metadata_stored_before_validation() -> None:
    """Metadata with a lone surrogate and NaN gives a strict-JSON, UTF-8 webhook body."""
    task = DueTask(
        pk=1,
        platform="luma",
        task_id="t",
        snapshot=Snapshot(TaskStatus.IN_PROGRESS),
        created_at=T0,
        missing_since=None,
        webhook_url=None,
        endpoint=None,
        events=None,
        metadata={"name": "\ud800", "score": math.nan, "big": math.inf},
    )
    change = bad_change(task, fail_reason="r")
    body = events.payload(task, change, "task.failed", T0)
    data = json.loads(body.decode("utf-8"), parse_constant=pytest.fail)
    assert {"name": "\ufffd", "score": None, "big": None} == data["data"]["metadata"]


_fuzz_ids = itertools.count()


@settings(
    max_examples=FUZZ_STORE_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    word=dirty_text,
    progress=dirty_scalars,
    reason=dirty_text,
    result=st.dictionaries(dirty_text, dirty_json, max_size=4),
    metadata=st.dictionaries(dirty_text, dirty_json, max_size=3),
)
def test_fuzz_whatever_a_relay_says_once_cleaned_both_databases_store_it(
    store: SqlStore,
    *,
    word: str,
    progress: object,
    reason: str,
    result: dict[str, Any],
    metadata: dict[str, Any],
) -> None:
    """A dirty status word, progress, reason and result (NUL, surrogates, NaN, huge numbers,
    any length), cleaned by the adapters' one path, is written whole with its event, even
    beside metadata that was stored dirty.
    """
    task_id = f"fuzz-{next(_fuzz_ids)}"
    store.register(Registration("luma", [task_id], metadata=sanitize.clean_json(metadata)), T0)
    claimed = store.claim_due(T0, 1000, lease=10)
    [task] = [t for t in claimed if t.task_id == task_id]
    task = task._replace(metadata=metadata)  # as if stored before validation
    numbers, text = read_progress(progress)
    observation = clean_observation(
        Observation(
            task_id=task_id,
            upstream_status=word,
            status=TaskStatus.FAILED,
            progress=numbers,
            upstream_progress=text,
            fail_reason=reason,
            # What an adapter keeps comes out of sanitize.loads.
            result=sanitize.loads(json.dumps(result)),
        )
    )
    change = status.apply(task.snapshot, observation)
    assert change is not None
    target = events.Target("http://h/x", None, guarded=False, events=frozenset())
    update = TaskUpdate(task, change, events.outbox_entries(task, change, target, T0))
    assert 1 == store.record([update], T0)


def test_a_replan_under_a_lapsed_claim_leaves_a_refused_task_refused(store: SqlStore) -> None:
    """A refused task counts as accepted again only once a replan of it is written: one from
    a claim that no longer holds the task writes nothing, and logs nothing."""
    refuse_upstream_word(store, "REFUSED")
    store.register(Registration("luma", ["t"]), T0)
    (slow,) = store.claim_due(T0, 10, lease=5)
    observation = Observation(task_id="t", upstream_status="REFUSED", status=TaskStatus.QUEUED)
    change = status.apply(slow.snapshot, observation)
    assert change is not None

    def at(seconds: float) -> datetime:
        return T0 + timedelta(seconds=seconds)

    def replan(task: DueTask, seconds: float) -> Replan:
        assert task.lease_until is not None
        return Replan(at(seconds).timestamp(), task.pk, task.lease_until)

    with capture_logs() as logs:
        refused = TaskUpdate(
            slow, change, next_poll_at=at(10).timestamp(), set_aside_until=at(60).timestamp()
        )
        assert 0 == store.record([refused], T0)  # set aside until 60 s: the claim ends there
        store.record([], at(30), [replan(slow, 70)])
        accepted_late = [e for e in logs if e["event"] == "task_write_accepted"]
        (fresh,) = store.claim_due(at(60), 10, lease=5)
        store.record([], at(60), [replan(fresh, 90)])

    assert [] == accepted_late
    assert ["t"] == [e["task_id"] for e in logs if e["event"] == "task_write_accepted"]
