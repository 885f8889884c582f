"""The Daemon in-process: readiness, reload, drain and delivery timing, faster than a subprocess."""

from __future__ import annotations

import asyncio
import functools
import json
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from conftest import WEBHOOK_SECRET, RecordingNotifier, eventually, merge, toml_text

from tracker import config, database, jobs, logs, routines, signing
from tracker import metrics as metrics_module
from tracker.app import Daemon
from tracker.clock import FakeClock
from tracker.metrics import HELD_LAG, Metrics
from tracker.reload import plan_reload
from tracker.status import TaskStatus
from tracker.store import Registration, SqlStore
from tracker.store.records import Stats
from tracker.testing.receiver import Reply, WebhookReceiver
from tracker.testing.simulator import SimulatedRelay

TOKEN = "test-token"


@pytest.fixture(name="make_daemon")
async def _make_daemon() -> AsyncIterator[Callable[..., Daemon]]:
    """Builds daemons and stops every one of them after the test."""
    made: list[Daemon] = []

    def make(settings: config.Settings, **kwargs: Any) -> Daemon:
        kwargs.setdefault("notifier", RecordingNotifier())
        daemon = Daemon(settings, **kwargs)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        await daemon.stop()


def client_for(daemon: Daemon, token: str | None = TOKEN) -> httpx.AsyncClient:
    """An HTTP client for a started daemon's API."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=daemon.api_url, headers=headers, timeout=5)


# -- plan_reload -----------------------------------------------------------------------------


def test_reload_plan_applies_live_keys_and_lists_the_ones_needing_a_restart(
    document: dict[str, Any],
) -> None:
    """Poll, webhooks, logging and tokens apply; database, port and allow_private wait."""
    old = config.parse(document, environ={})
    new = config.parse(
        merge(
            document,
            {
                "poll": {"interval": 5, "max_interval": 10},
                "database": {"url": "sqlite:///elsewhere.db"},
                "server": {"port": 9999, "api_tokens": [TOKEN, "second"]},
                "webhooks": {"retry_delays": [1.0], "allow_private": ["10.0.0.0/8"]},
                "logging": {"level": "debug"},
            },
        ),
        environ={},
    )

    plan = plan_reload(old, new)

    assert {
        "poll.interval",
        "server.api_tokens",
        "poll.max_interval",
        "webhooks.retry_delays",
        "logging.level",
    } == set(plan.applied)
    assert {"database.url", "server.port", "webhooks.allow_private"} == set(plan.needs_restart)
    assert [] == plan.refused
    current = plan.settings
    assert (5.0, (1.0,), "debug") == (
        current.poll.interval,
        current.webhooks.retry_delays,
        current.logging.level,
    )
    assert ["test-token", "second"] == [t.get_secret_value() for t in current.server.api_tokens]
    assert old.database == current.database
    assert old.server.port == current.server.port
    assert old.webhooks.allow_private == current.webhooks.allow_private


def test_reload_plan_applies_a_platforms_rate_limit_and_batch_size_and_waits_for_the_rest(
    document: dict[str, Any],
) -> None:
    """[platforms.NAME] rate_limit and batch_size apply (the lag warning names rate_limit: a
    restart should not be the price of following it); the platform's path, a platform added
    and one removed wait for a restart, and keep their old values meanwhile."""
    old = config.parse(
        merge(
            document,
            {
                "platforms": {
                    "luma": {"rate_limit": 2},
                    "gone": {"style": "replicate", "path": "/p"},
                }
            },
        ),
        environ={},
    )
    new = config.parse(
        merge(
            document,
            {
                "platforms": {
                    "luma": {"rate_limit": 5, "batch_size": 50, "path": "/other/tasks"},
                    "added": {"style": "replicate", "path": "/q"},
                }
            },
        ),
        environ={},
    )

    plan = plan_reload(old, new)

    assert ["platforms.luma.batch_size", "platforms.luma.rate_limit"] == sorted(plan.applied)
    assert {"platforms.added", "platforms.gone", "platforms.luma.path"} == set(plan.needs_restart)
    luma = plan.settings.platforms["luma"]
    assert (5.0, 50, None) == (luma.rate_limit, luma.batch_size, luma.path)
    assert ["gone", "luma"] == sorted(plan.settings.platforms)
    # A built-in platform's section added (or removed) is its keys set (or unset).
    base = config.parse(document, environ={})
    added = config.parse(merge(document, {"platforms": {"suno": {"rate_limit": 3}}}), environ={})
    assert (["platforms.suno.rate_limit"], []) == (
        plan_reload(base, added).applied,
        plan_reload(base, added).needs_restart,
    )
    assert 3.0 == plan_reload(base, added).settings.platforms["suno"].rate_limit
    assert ["platforms.suno.rate_limit"] == plan_reload(added, base).applied


def test_reload_plan_of_an_unchanged_config_changes_nothing(document: dict[str, Any]) -> None:
    """Reloading the same file applies nothing and asks for no restart."""
    settings = config.parse(document, environ={})

    plan = plan_reload(settings, config.parse(document, environ={}))

    assert ([], [], []) == (plan.applied, plan.needs_restart, plan.refused)
    assert settings == plan.settings


def test_reload_plan_never_opens_the_api_on_a_public_host(document: dict[str, Any]) -> None:
    """Dropping every token is refused while the host in force is not loopback."""
    public = config.parse(merge(document, {"server": {"host": "0.0.0.0"}}), environ={})
    loopback_open = config.parse(
        merge(document, {"server": {"host": "127.0.0.1", "api_tokens": []}}), environ={}
    )

    plan = plan_reload(public, loopback_open)

    assert public.server.api_tokens == plan.settings.server.api_tokens
    assert "server.host" in plan.needs_restart
    assert any(r.startswith("server.api_tokens") for r in plan.refused)


# -- readiness -------------------------------------------------------------------------------


async def test_readiness_follows_the_scheduler_and_the_poll_lag_only(
    document: dict[str, Any], make_daemon: Callable[..., Daemon]
) -> None:
    """Not ready before start; ready while polls keep up, however long ago the last drain
    ended; not ready once the most overdue task is later than [poll].max_lag.
    """
    clock = FakeClock()
    settings = config.parse(
        merge(document, {"poll": {"interval": 30, "max_interval": 60, "max_lag": 90}}),
        environ={},
    )
    daemon = make_daemon(settings, clock=clock)

    assert "scheduler is not running" in await daemon.parts.readiness.run()
    await daemon.start()
    assert [] == await daemon.parts.readiness.run()
    clock.advance(3600)  # an hour without a drain and nothing live: nothing is late
    assert [] == await daemon.parts.readiness.run()

    daemon.parts.store.register(
        Registration("luma", ["late-1"]), clock.now() - timedelta(seconds=89)
    )
    assert [] == await daemon.parts.readiness.run()
    daemon.parts.store.register(
        Registration("luma", ["late-2"]), clock.now() - timedelta(seconds=91)
    )
    reasons = await daemon.parts.readiness.run()
    assert ["polls of luma are 91 s late (more than [poll].max_lag = 90 s)"] == reasons

    await daemon.stop()
    assert "shutting down" == await daemon.parts.jobs.check()


async def test_lag_is_a_gauge_a_status_figure_and_a_warning_naming_a_setting(
    relay: SimulatedRelay, document: dict[str, Any], make_daemon: Callable[..., Daemon]
) -> None:
    """tracker_poll_lag_seconds and the STATUS= line show how late the most overdue task is;
    a drain that claimed late tasks logs poll_lagging with the setting that would help.
    """
    clock = FakeClock()
    notifier = RecordingNotifier()
    settings = config.parse(
        merge(document, {"poll": {"interval": 10, "max_interval": 20}}), environ={}
    )
    daemon = make_daemon(settings, clock=clock, notifier=notifier)
    await asyncio.to_thread(daemon.parts.store.create_schema)
    daemon.parts.store.register(Registration("luma", ["old"]), clock.now() - timedelta(seconds=42))

    assert "tracker_poll_lag_seconds 42.0" in daemon.parts.metrics.render().decode()
    await daemon.parts.chores.status()
    assert "poll lag 42.0s" in notifier.sent[-1]
    with structlog.testing.capture_logs() as logs:
        await daemon.parts.poller.run_cycle()

    [warning] = [e for e in logs if e["event"] == "poll_lagging"]
    # batch_size is at 100 already, past which some relays cut their answers
    assert ("warning", 42.0, "luma", "poll.concurrency") == (
        warning["log_level"],
        warning["lag_seconds"],
        warning["platform"],
        warning["setting"],
    )
    assert "tracker_poll_lag_seconds 0.0" in daemon.parts.metrics.render().decode()


async def test_tasks_claimed_on_time_that_wait_for_the_rate_limit_count_in_every_lag_figure(
    relay: SimulatedRelay,
    document: dict[str, Any],
    make_daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    """Real time: sixteen tasks due at once, one id a request, sixteen lanes, two requests a
    second. One claim takes them all on time and moves their next polls to the lease's end,
    so the store alone sees nothing overdue, while the last batches wait seconds for the rate
    limit. Meanwhile the gauge, the STATUS= line, /readyz (max_lag 1 s) and `tracker stats`
    all count those tasks; once they are asked, nothing is held and the figures fall back."""
    notifier = RecordingNotifier()
    document = merge(
        document,
        {
            "poll": {
                "interval": 30,
                "max_interval": 60,
                "batch_size": 1,
                # A claim's size (batch_size x concurrency) takes every task at once: with
                # fewer lanes the later claims wait for answers, and the tasks left unclaimed
                # meanwhile are overdue in the store too.
                "concurrency": 16,
                "max_lag": 1,
            },
            "platforms": {"luma": {"rate_limit": 2}},
        },
    )
    config_path = tmp_path / "tracker.toml"
    config_path.write_text(toml_text(document))
    daemon = make_daemon(config.parse(document, environ={}), notifier=notifier)
    ids = [f"r{n:02d}" for n in range(16)]
    for task_id in ids:
        relay.set("luma", task_id, "IN_PROGRESS", "50%")
    await daemon.start()
    parts = daemon.parts
    await asyncio.to_thread(parts.store.register, Registration("luma", ids), parts.clock.now())
    parts.engine.wake()
    await eventually(lambda: len(relay.requests) >= 5, 10, "five requests at the relay")

    stats = await asyncio.to_thread(parts.store.stats)
    store_alone = routines.poll_lag(stats, parts.clock.now().timestamp())
    gauge = metric(parts.metrics, "tracker_poll_lag_seconds")
    reasons = await parts.readiness.run()
    await parts.chores.status()
    status_lag = float(notifier.sent[-1].split("poll lag ")[1].split("s,")[0])
    await parts.chores.note_held()
    stats_lag = await stats_poll_lag(config_path)

    assert store_alone < 1.0  # the bug this guards against: every claimed task looked on time
    assert gauge >= 1.5
    assert status_lag >= 1.5
    assert stats_lag >= 1.5
    [reason] = reasons
    assert reason.startswith("polls of luma are ")
    assert reason.endswith(" s late (more than [poll].max_lag = 1 s)")
    await eventually(lambda: len(relay.requests) >= 16, 15, "every task asked")
    await eventually(lambda: parts.poller.earliest_held() is None, 5, "nothing held")
    assert metric(parts.metrics, "tracker_poll_lag_seconds") < 1.0
    assert [] == await parts.readiness.run()
    await parts.chores.note_held()
    assert await stats_poll_lag(config_path) < 1.0  # said once it is over, not kept


async def stats_poll_lag(config_path: Path) -> float:
    """poll_lag_seconds as a real `tracker stats --json` process prints it."""
    stats_cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tracker", "stats", "--config", str(config_path), "--json",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await stats_cli.communicate()
    assert 0 == stats_cli.returncode
    lag: float = json.loads(out)["poll_lag_seconds"]
    return lag


def test_a_held_lag_is_believed_while_fresh_and_only_if_readable() -> None:
    """`tracker stats` takes a daemon's figure for HELD_FRESH after it was written: not once
    that daemon stopped writing it, nor a value it cannot read."""
    now = 1_800_000_000.0
    fresh = metrics_module.held_lag_text(12.5, now - 3, "a-daemon")
    stale = metrics_module.held_lag_text(12.5, now - metrics_module.HELD_FRESH - 1, "a-daemon")

    assert 12.5 == metrics_module.reported_held_lag(fresh, now)
    assert 0.0 == metrics_module.reported_held_lag(stale, now)
    for unreadable in (None, "", "12.5", '{"lag": "x", "at": 1}', '{"at": 1}', "[1, 2]"):
        assert 0.0 == metrics_module.reported_held_lag(unreadable, now)


async def test_several_daemons_on_one_database_leave_the_largest_held_lag_for_stats(
    document: dict[str, Any], make_daemon: Callable[..., Daemon]
) -> None:
    """Two daemons on one SQLite file hold late tasks (20 s and 5 s late). Whichever writes
    last, `tracker stats` is told the larger figure; once that daemon has caught up, the
    other's 5 s is what it is told at that one's next write, and then nothing once both are
    on time."""
    settings = config.parse(document, environ={})
    held: dict[str, tuple[float, str] | None] = {}
    daemons = {name: make_daemon(settings) for name in ("far", "near")}
    await asyncio.to_thread(daemons["far"].parts.store.create_schema)
    for name, daemon in daemons.items():
        daemon.parts.poller.earliest_held = functools.partial(held.get, name)  # type: ignore[method-assign]
    store = daemons["far"].parts.store

    async def told_after(*writers: str) -> float:
        for name in writers:
            await daemons[name].parts.chores.note_held()
        return metrics_module.reported_held_lag(store.get_meta(HELD_LAG), time.time())

    now = time.time()
    held.update(far=(now - 20, "luma"), near=(now - 5, "luma"))
    assert 20 <= await told_after("far", "near") < 21
    assert 20 <= await told_after("near") < 21
    held["far"] = None
    assert 0.0 == await told_after("far")
    assert 5 <= await told_after("near") < 6
    held["near"] = None
    assert 0.0 == await told_after("near")


def metric(metrics: Metrics, name: str) -> float:
    """The value of an unlabelled metric in the exposition."""
    [line] = [row for row in metrics.render().decode().splitlines() if row.startswith(f"{name} ")]
    return float(line.split()[1])


async def test_a_step_back_of_the_clock_moves_polls_retries_and_jobs_back_as_far(
    document: dict[str, Any],
    make_daemon: Callable[..., Daemon],
    relay: SimulatedRelay,
    receiver: WebhookReceiver,
) -> None:
    """The daemon's wall clock steps back an hour: the engine moves the live task's next poll
    and its webhook's next attempt back an hour (the retry is sent when its delay has run, not
    an hour later) and logs the step once; the periodic jobs move back an hour too, as
    APScheduler waits for wall-clock times. Here only the daemon's clock steps, not the
    scheduler's, so the status job, next due 15 s after the start, runs at once."""
    started = time.monotonic()
    clock = FakeClock()
    notifier = RecordingNotifier()
    changes = {
        "poll": {"interval": 30, "max_interval": 60},
        "webhooks": {"retry_delays": [60], "events": ["task.started"]},
    }
    daemon = make_daemon(
        config.parse(merge(document, changes), environ={}), clock=clock, notifier=notifier
    )
    await daemon.start()
    receiver.reply(Reply(500))
    relay.set("luma", "waiting", "IN_PROGRESS", "50%")
    daemon.parts.store.register(Registration("luma", ["waiting"]), clock.now())
    daemon.parts.engine.wake()
    await eventually(lambda: receiver.count, 5, "the first attempt of task.started")

    def retry_planned() -> bool:
        (delivery,), _ = daemon.parts.store.list_deliveries()
        return delivery.attempts == 1

    await eventually(retry_planned, 5, "the failed attempt's retry to be planned")
    planned = await daemon.parts.poller.earliest()
    assert planned is not None
    statuses = sum(m.startswith("STATUS=") for m in notifier.sent)

    with structlog.testing.capture_logs() as logs:
        clock.step(-3600)
        daemon.parts.engine.wake()
        step = await eventually(
            lambda: [e for e in logs if e["event"] == "clock_stepped_back"], 5, "the step"
        )
        await eventually(
            lambda: sum(m.startswith("STATUS=") for m in notifier.sent) > statuses,
            5,
            "the status job's run, moved back an hour",
        )
        clock.advance(60 * 1.2 + 1)  # the retry's delay: 60 s, give or take 20 % of jitter
        # On the real clock the deliverer's timer fires as the delay runs out; a fake clock's
        # minute passes at once, so the deliverer is told to look.
        daemon.parts.delivering.kick()
        await eventually(lambda: receiver.count >= 2, 5, "the retry, once its delay ran")

    assert 1 == len([e for e in logs if e["event"] == "clock_stepped_back"])
    assert (1, 1) == (step[0]["polls_moved"], step[0]["deliveries_moved"])
    assert timedelta(hours=-1) == await daemon.parts.poller.earliest() - planned
    assert time.monotonic() - started < routines.STATUS_EVERY - 1  # not its own next run


async def test_readyz_names_an_unreachable_database_without_its_error_text(
    document: dict[str, Any], make_daemon: Callable[..., Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    """/readyz answers 503 with the failing check; the driver's message stays in the log."""
    daemon = make_daemon(config.parse(document, environ={}))
    await daemon.start()

    def unreachable() -> None:
        raise sqlite3.OperationalError("unable to open database file at secret-host")

    monkeypatch.setattr(daemon.parts.store, "ping", unreachable)
    async with client_for(daemon, token=None) as client:
        answer = await client.get("/readyz")
        health = await client.get("/healthz")

    assert 503 == answer.status_code
    assert ["database unreachable: OperationalError"] == answer.json()["reasons"]
    assert "secret-host" not in answer.text
    assert 200 == health.status_code


def test_the_sqlite_probe_reads_the_path_afresh(tmp_path: Path) -> None:
    """The probe passes on a tracker database and fails on a path that holds none."""
    store = SqlStore.from_url(f"sqlite:///{tmp_path / 'real.db'}")
    store.create_schema()
    path = database.sqlite_file(store)
    store.close()

    assert tmp_path / "real.db" == path
    database.probe_sqlite_file(tmp_path / "real.db")
    (tmp_path / "junk.db").write_bytes(b"not a database" * 500)
    with pytest.raises(sqlite3.DatabaseError):
        database.probe_sqlite_file(tmp_path / "junk.db")
    with pytest.raises(sqlite3.OperationalError):
        database.probe_sqlite_file(tmp_path / "missing.db")
    memory = SqlStore.from_url("sqlite:///:memory:")
    postgres = SqlStore.from_url("postgresql://postgres@127.0.0.1:5432/none")
    assert (None, None) == (database.sqlite_file(memory), database.sqlite_file(postgres))


async def test_metrics_and_readyz_require_the_token_when_configured(
    document: dict[str, Any], make_daemon: Callable[..., Daemon]
) -> None:
    """metrics_require_auth puts /metrics and /readyz behind the token; /healthz stays open."""
    settings = config.parse(merge(document, {"server": {"metrics_require_auth": True}}), environ={})
    daemon = make_daemon(settings)
    await daemon.start()

    async with client_for(daemon, token=None) as anonymous, client_for(daemon) as holder:
        assert 401 == (await anonymous.get("/metrics")).status_code
        assert 401 == (await anonymous.get("/readyz")).status_code
        assert 200 == (await anonymous.get("/healthz")).status_code
        scrape = await holder.get("/metrics")
        assert 200 == scrape.status_code
        assert "tracker_outbox_depth" in scrape.text
        # No task at all yet: every configured platform's statuses read 0, not "no data".
        assert 'tracker_tasks{platform="luma",status="queued"} 0.0' in scrape.text
        assert 200 == (await holder.get("/readyz")).status_code


def test_task_counts_read_zero_for_every_status_rather_than_going_missing() -> None:
    """tracker_tasks has a series for every status of every configured platform, and of any
    other platform with tasks: a count that drops to 0 reads 0. (Its series went missing, so a
    sum over queued tasks, or an alert on them, read "no data".)"""
    metrics = Metrics()
    stats = Stats(tasks={("kling", "completed"): 1}, deliveries={}, oldest_pending_delivery=None)
    metrics.watch_store(lambda: stats, time.time, platforms=["luma"])
    text = metrics.render().decode()

    series = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tracker_tasks{")
    }
    assert {
        f'tracker_tasks{{platform="{platform}",status="{status.value}"}}': (
            1.0 if (platform, status) == ("kling", TaskStatus.COMPLETED) else 0.0
        )
        for platform in ("kling", "luma")
        for status in TaskStatus
    } == series


def test_a_scrape_survives_an_unreachable_database() -> None:
    """Without a database the scrape still renders, with tracker_database_up 0."""
    metrics = Metrics()

    def broken() -> Any:
        raise sqlite3.OperationalError("disk I/O error")

    metrics.watch_store(broken, time.time)
    text = metrics.render().decode()

    assert "tracker_database_up 0.0" in text
    assert "tracker_poll_cycle_duration_seconds_count 0.0" in text
    assert "tracker_outbox_depth" not in text


# -- reload ----------------------------------------------------------------------------------


async def test_reload_applies_live_settings_to_the_running_parts(
    tmp_path: Path, document: dict[str, Any], make_daemon: Callable[..., Daemon]
) -> None:
    """A reload gives the poller and the platforms the new [poll] settings (batch size
    included) and the new webhook target, re-keys the deliverer, accepts the new token and
    brackets the work with RELOADING=1 and READY=1.
    """
    path = tmp_path / "tracker.toml"
    path.write_text(toml_text(document))
    notifier = RecordingNotifier()
    daemon = make_daemon(config.load(path, environ={}), config_path=path, notifier=notifier)
    await daemon.start()
    secret = signing.new_secret()
    path.write_text(
        toml_text(
            merge(
                document,
                {
                    "poll": {"interval": 0.5, "batch_size": 7},
                    "webhooks": {"secret": secret, "url": "http://127.0.0.1:9/new-hooks"},
                    "server": {"api_tokens": ["new-token"]},
                },
            )
        )
    )
    notifier.sent.clear()

    daemon.reload()

    assert (0.5, 7) == (
        daemon.parts.poller.settings.interval,
        daemon.parts.poller.settings.batch_size,
    )
    # The platforms ask with the new size; per-id ones still ask one id at a time.
    assert (7, 7, 1) == tuple(
        daemon.parts.platforms[n].batch_size for n in ("luma", "suno", "video")
    )
    assert secret == daemon.parts.deliverer.secrets_for(None)[0]
    target = daemon.parts.poller.planner.targets.resolve(None, None, None)
    assert target is not None
    assert "http://127.0.0.1:9/new-hooks" == target.url
    assert daemon.parts.state.settings is daemon.settings
    assert ["RELOADING=1", "READY=1"] == [m.split("\n")[0] for m in notifier.sent]
    async with client_for(daemon, "new-token") as fresh, client_for(daemon) as stale:
        assert 200 == (await fresh.get("/v1/tasks")).status_code
        assert 401 == (await stale.get("/v1/tasks")).status_code


async def test_reload_applies_retention_logging_and_metrics_auth_as_the_readme_says(
    tmp_path: Path, document: dict[str, Any], make_daemon: Callable[..., Daemon]
) -> None:
    """The README's list of what a reload applies, beyond [poll], [webhooks] and the tokens:
    [retention] (the pruning job's pace too), [logging] (format as well as level) and
    [server].metrics_require_auth, which puts /metrics behind the token at once."""
    path = tmp_path / "tracker.toml"
    path.write_text(toml_text(document))
    daemon = make_daemon(config.load(path, environ={}), config_path=path)
    await daemon.start()
    async with client_for(daemon, token=None) as anonymous:
        assert 200 == (await anonymous.get("/metrics")).status_code
    path.write_text(
        toml_text(
            merge(
                document,
                {
                    "retention": {"dead_days": 7, "interval": 600},
                    "logging": {"format": "json"},
                    "server": {"metrics_require_auth": True},
                },
            )
        )
    )

    daemon.reload()

    live = daemon.parts.state.settings
    assert (7.0, 600.0, "json") == (
        live.retention.dead_days,
        live.retention.interval,
        live.logging.format,
    )
    job = daemon.parts.jobs.scheduler.get_job("retention")
    assert job is not None
    assert 600 == job.trigger.interval.total_seconds()
    async with client_for(daemon, token=None) as anonymous, client_for(daemon) as holder:
        assert 401 == (await anonymous.get("/metrics")).status_code
        assert 200 == (await holder.get("/metrics")).status_code


async def test_a_broken_config_on_reload_keeps_the_old_settings(
    tmp_path: Path, document: dict[str, Any], make_daemon: Callable[..., Daemon]
) -> None:
    """An invalid file leaves every setting as it was and still ends the reload with READY=1."""
    path = tmp_path / "tracker.toml"
    path.write_text(toml_text(document))
    notifier = RecordingNotifier()
    daemon = make_daemon(config.load(path, environ={}), config_path=path, notifier=notifier)
    await daemon.start()
    before = daemon.settings
    path.write_text(toml_text(merge(document, {"poll": {"interval": "fast"}})))
    notifier.sent.clear()

    daemon.reload()

    assert before is daemon.settings
    assert 0.2 == daemon.parts.poller.settings.interval
    assert ["RELOADING=1", "READY=1"] == [m.split("\n")[0] for m in notifier.sent]


async def test_a_reload_while_stopping_is_ignored(
    tmp_path: Path, document: dict[str, Any], make_daemon: Callable[..., Daemon]
) -> None:
    """SIGHUP during the drain neither reloads nor tells systemd it is reloading."""
    path = tmp_path / "tracker.toml"
    path.write_text(toml_text(document))
    notifier = RecordingNotifier()
    daemon = make_daemon(config.load(path, environ={}), config_path=path, notifier=notifier)
    daemon.parts.stop.set()
    path.write_text(toml_text(merge(document, {"poll": {"interval": 5}})))

    daemon.reload()

    assert [] == notifier.sent
    assert 0.2 == daemon.settings.poll.interval


@pytest.mark.usefixtures("restore_logging")
async def test_secrets_added_by_a_reload_are_redacted_from_then_on(
    document: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """A token that arrives with a reload is redacted like the ones known at start."""
    settings = config.parse(document, environ={})
    logs.configure(fmt="json", secrets=settings.secrets())
    daemon = Daemon(settings, notifier=RecordingNotifier())
    new = config.parse(merge(document, {"server": {"api_tokens": ["rotated-7f3a"]}}), environ={})
    try:
        daemon.apply(new)
        structlog.get_logger("test").info("probe", url=f"http://x/?a=rotated-7f3a&b={TOKEN}")
    finally:
        await daemon.stop()

    out = capsys.readouterr().out
    probe = next(json.loads(line) for line in out.splitlines() if '"probe"' in line)
    assert "http://x/?a=[redacted]&b=[redacted]" == probe["url"]
    assert WEBHOOK_SECRET not in out


# -- stopping and delivery timing ------------------------------------------------------------


async def test_stop_cuts_off_a_poll_that_outlasts_the_deadline_without_half_writes(
    relay: SimulatedRelay,
    document: dict[str, Any],
    make_daemon: Callable[..., Daemon],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past STOP_DEADLINE the in-flight poll is cancelled; its task is left as it was."""
    monkeypatch.setattr(jobs, "STOP_DEADLINE", 0.3)
    relay.slow_seconds = 2.0
    relay.fail_next("slow")
    notifier = RecordingNotifier()
    daemon = make_daemon(config.parse(document, environ={}), notifier=notifier)
    await daemon.start()
    async with client_for(daemon) as client:
        assert (
            201
            == (await client.post("/v1/tasks", json={"platform": "luma", "ids": ["x"]})).status_code
        )
    await eventually(lambda: relay.requests, 5, "the slow poll request")

    started = time.monotonic()
    await daemon.stop()

    assert time.monotonic() - started < 1.5
    reopened = SqlStore.from_url(document["database"]["url"])
    task = reopened.get("luma", "x")
    reopened.close()
    assert task is not None
    assert ("pending", ()) == (task.status, task.transitions)
    assert "STOPPING=1" in notifier.sent
    await daemon.stop()  # a second stop is harmless


async def test_work_that_outlives_its_cancel_is_left_behind_after_a_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past STOP_DEADLINE the work in flight is cancelled; what still runs CANCEL_GRACE later
    (here a coroutine that swallows its cancel) is left behind with an error line, and the
    stop goes on, so systemd's TimeoutStopSec never has to kill the process."""
    monkeypatch.setattr(jobs, "STOP_DEADLINE", 0.2)
    monkeypatch.setattr(jobs, "CANCEL_GRACE", 0.3)
    inflight = jobs.InFlight(RecordingNotifier())
    release = asyncio.Event()

    async def stubborn() -> None:
        with inflight.tracked():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                await release.wait()

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        await inflight.drain()
    took = time.monotonic() - started
    release.set()
    await task

    assert 0.45 <= took < 1.5
    assert ["drain_abandoned"] == [e["event"] for e in logs if e["log_level"] == "error"]


async def test_a_short_retry_is_attempted_on_time_not_at_the_next_tick(
    receiver: WebhookReceiver,
    document: dict[str, Any],
    make_daemon: Callable[..., Daemon],
) -> None:
    """A retry due in 0.3 s goes out well before the one-second delivery tick."""
    receiver.reply(Reply(500))
    settings = config.parse(merge(document, {"webhooks": {"retry_delays": [0.3]}}), environ={})
    daemon = make_daemon(settings)
    await daemon.start()
    async with client_for(daemon) as client:
        answer = await client.post("/v1/tasks", json={"platform": "luma", "ids": ["r-1"]})
        assert 201 == answer.status_code

    hooks = await asyncio.to_thread(receiver.wait_for, 2, 10)

    assert [500, 204] == [h.status for h in hooks[:2]]
    assert hooks[1].at - hooks[0].at < 0.8 * routines.DELIVERY_TICK
