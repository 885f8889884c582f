"""The real `tracker` process end to end: signals, crash recovery, webhooks, health and metrics."""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    WEBHOOK_SECRET,
    all_pages,
    base_config,
    merge,
    toml_text,
    verified,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

from tracker.testing.daemon import Daemon, clean_env
from tracker.testing.receiver import Reply, WebhookReceiver
from tracker.testing.simulator import SimulatedRelay

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token"
FINAL_STATUSES = {"completed", "failed", "canceled"}
FINAL_EVENTS = {"task.completed", "task.failed", "task.canceled"}
#: every metric family the README documents
METRIC_FAMILIES = {
    "tracker_tasks",
    "tracker_transitions",
    "tracker_upstream_requests",
    "tracker_upstream_errors",
    "tracker_poll_cycle_duration_seconds",
    "tracker_upstream_ids_per_request",
    "tracker_deliveries",
    "tracker_delivery_latency_seconds",
    "tracker_outbox_depth",
    "tracker_oldest_pending_delivery_age_seconds",
    "tracker_database_up",
}


# -- helpers -------------------------------------------------------------------------------


def start_daemon(config: Path, env: dict[str, str] | None = None) -> Daemon:
    """A started `tracker run` for ``config``, with an API client holding the test token."""
    return Daemon(config, token=TOKEN, cwd=REPO, env=env)


@pytest.fixture(name="spawn")
def _spawn() -> Iterator[Callable[..., Daemon]]:
    """Starts tracker processes; kills whichever a test left running."""
    started: list[Daemon] = []

    def spawn(config: Path, env: dict[str, str] | None = None) -> Daemon:
        tracker = start_daemon(config, env)
        started.append(tracker)
        return tracker

    yield spawn
    for tracker in started:
        tracker.close()


@pytest.fixture(name="write_config")
def _write_config(
    tmp_path: Path, relay: SimulatedRelay, receiver: WebhookReceiver
) -> Callable[..., Path]:
    """Writes config.toml for the fixture relay and receiver, with overrides; fast polling."""
    database = f"sqlite:///{tmp_path / 'tracker.db'}"
    fast = {"poll": {"interval": 0.2, "max_interval": 1}}

    def write(overrides: dict[str, Any] | None = None, name: str = "config.toml") -> Path:
        document = merge(base_config(relay.base_url, receiver.url, database), fast)
        path = tmp_path / name
        path.write_text(toml_text(merge(document, overrides or {})))
        return path

    return write


def check_history(task: dict[str, Any]) -> None:
    """The transitions start at pending, chain from one to the next and end at the status."""
    steps = task["transitions"]
    assert steps, task
    assert "pending" == steps[0]["from"]
    for earlier, later in itertools.pairwise(steps):
        assert earlier["to"] == later["from"], steps
        assert earlier["at"] <= later["at"], steps
    assert task["status"] == steps[-1]["to"]
    assert 1 == sum(1 for s in steps if s["to"] in FINAL_STATUSES), steps


# -- webhooks, end to end -----------------------------------------------------------------


def test_each_task_sends_one_signed_final_webhook_and_keeps_its_history(
    relay: SimulatedRelay,
    receiver: WebhookReceiver,
    write_config: Callable[..., Path],
    spawn: Callable[..., Daemon],
) -> None:
    """Registered luma ids end with one verified webhook each; a failing id gives task.failed."""
    relay.step = 0.2
    tracker = spawn(write_config())
    ids = ["e2e-ok-1", "e2e-ok-2", "e2e-fail-1"]

    answer = tracker.register(ids, metadata={"order": 7})
    assert 201 == answer.status_code, answer.text
    assert {"registered": ids, "existing": []} == answer.json()
    assert 401 == httpx.post(f"{tracker.api}/v1/tasks", json={"platform": "luma"}).status_code

    hooks = receiver.wait_for(3, timeout=15)
    bodies = {verified(h)["data"]["task_id"]: (h, verified(h)) for h in hooks}
    assert set(ids) == set(bodies)
    assert 3 == len({h.headers["webhook-id"] for h in hooks})
    for task_id, (_, body) in bodies.items():
        data = body["data"]
        assert {"order": 7} == data["metadata"]
        assert "luma" == data["platform"]
        assert data["finished_at"] is not None
        if "fail" in task_id:
            assert "task.failed" == body["type"]
            assert "failed" == data["status"]
            assert f"simulated failure of {task_id}" == data["fail_reason"]
        else:
            assert "task.completed" == body["type"]
            assert ("completed", 100, "") == (data["status"], data["progress"], data["fail_reason"])

    done = tracker.client.get("/v1/tasks/luma/e2e-ok-1").json()
    assert ("completed", "SUCCESS", 100) == (
        done["status"],
        done["upstream_status"],
        done["progress"],
    )
    assert done["finished_at"] is not None
    assert {"order": 7} == done["metadata"]
    check_history(done)
    failed = tracker.client.get("/v1/tasks/luma/e2e-fail-1").json()
    assert ("failed", "simulated failure of e2e-fail-1") == (
        failed["status"],
        failed["fail_reason"],
    )
    check_history(failed)

    outbox = all_pages(tracker.client, "/v1/deliveries", "deliveries")
    assert 3 == len(outbox)
    assert {("delivered", 1)} == {(d["state"], d["attempts"]) for d in outbox}
    assert {h.headers["webhook-id"] for h in hooks} == {d["webhook_id"] for d in outbox}
    assert 0 == tracker.stop()
    assert not [line for line in tracker.stderr if line.strip()], tracker.tail()


def test_receiver_failing_twice_gets_the_event_on_the_third_attempt_with_the_same_id(
    relay: SimulatedRelay,
    receiver: WebhookReceiver,
    write_config: Callable[..., Path],
    spawn: Callable[..., Daemon],
) -> None:
    """Two 500 answers are retried; the third attempt carries the same webhook-id and body."""
    receiver.reply(Reply(500), Reply(500))
    tracker = spawn(write_config({"webhooks": {"retry_delays": [0.2, 0.2, 0.2]}}))

    assert 201 == tracker.register(["retry-1"]).status_code
    hooks = receiver.wait_for(3, timeout=15)

    assert [500, 500, 204] == [h.status for h in hooks]
    assert 1 == len({h.headers["webhook-id"] for h in hooks})
    assert 1 == len({h.body for h in hooks})
    assert all(verified(h)["type"] == "task.completed" for h in hooks)

    def delivered() -> dict[str, Any] | None:
        rows = tracker.client.get("/v1/tasks/luma/retry-1/deliveries").json()["deliveries"]
        return rows[0] if rows and rows[0]["state"] == "delivered" else None

    delivery = wait_until(delivered, 5, "the delivery to be recorded as delivered")
    assert 3 == delivery["attempts"]
    assert [500, 500, 204] == [a["status_code"] for a in delivery["log"]]
    assert hooks[0].headers["webhook-id"] == delivery["webhook_id"]
    assert 0 == tracker.stop()


# -- crashes and graceful stops -------------------------------------------------------------


def check_one_final_webhook_each(
    ids: list[str], outbox: list[dict[str, Any]], receiver: WebhookReceiver
) -> None:
    """Each id has one delivery of its final event (task.failed for ids ending in -fail), and
    the receiver saw each under that delivery's webhook-id only."""
    by_task = collections.defaultdict(list)
    for delivery in outbox:
        by_task[delivery["task_id"]].append(delivery)
    assert set(ids) == set(by_task)
    for task_id, rows in by_task.items():
        assert 1 == len(rows), rows
        expected = "task.failed" if task_id.endswith("-fail") else "task.completed"
        assert expected == rows[0]["event_type"]

    seen = collections.defaultdict(set)
    # A request cut off by a kill arrives without its whole body; no receiver would take it.
    whole = [h for h in receiver.received if len(h.body) == int(h.headers["content-length"])]
    assert len(receiver.received) - len(whole) <= 8  # at most the per-host slots in flight
    for hook in whole:
        seen[verified(hook)["data"]["task_id"]].add(hook.headers["webhook-id"])
    assert {task_id: {rows[0]["webhook_id"]} for task_id, rows in by_task.items()} == dict(seen)


def test_kill_9_mid_run_then_restart_loses_nothing_and_duplicates_nothing(
    relay: SimulatedRelay,
    receiver: WebhookReceiver,
    write_config: Callable[..., Path],
    spawn: Callable[..., Daemon],
) -> None:
    """After SIGKILL while tasks move and webhooks flow, a restart finishes every task with
    exactly one final event each, all delivered, duplicates only under the same webhook-id.
    """
    relay.step = 0.15
    config = write_config()
    tracker = spawn(config)
    ids = [
        f"crash-{wave}-{n}" + ("-fail" if n % 10 == 0 else "")
        for wave in range(4)
        for n in range(50)
    ]
    for wave in range(4):
        assert 201 == tracker.register(ids[wave * 50 : (wave + 1) * 50]).status_code
        time.sleep(0.25)  # waves at different stages when the kill lands
    wait_until(lambda: receiver.count >= 30, 15, "webhooks to start flowing")
    tracker.kill()
    at_kill = receiver.count
    assert at_kill < len(ids), "the kill came too late to interrupt anything"

    restarted = spawn(config)

    def all_final() -> bool:
        tasks = all_pages(restarted.client, "/v1/tasks", "tasks")
        return len(tasks) == len(ids) and all(t["status"] in FINAL_STATUSES for t in tasks)

    # Tasks the killed daemon had claimed wait for the claim's lease to lapse (timeout + 30 s).
    wait_until(all_final, 45, "every task to reach a final status", every=0.2)

    def all_delivered() -> list[dict[str, Any]] | None:
        rows = all_pages(restarted.client, "/v1/deliveries", "deliveries")
        return rows if rows and all(d["state"] == "delivered" for d in rows) else None

    # Deliveries in flight at the kill are released by the restart (SQLite serves one daemon).
    outbox = wait_until(all_delivered, 75, "every delivery to be delivered", every=0.3)
    check_one_final_webhook_each(ids, outbox, receiver)
    for task_id in ids:
        task = restarted.client.get(f"/v1/tasks/luma/{task_id}").json()
        check_history(task)
    assert 0 == restarted.stop()


def test_sigterm_during_a_slow_poll_finishes_the_batch_refuses_work_and_exits_0(
    relay: SimulatedRelay,
    receiver: WebhookReceiver,
    write_config: Callable[..., Path],
    spawn: Callable[..., Daemon],
) -> None:
    """SIGTERM mid-request: registrations get 503, the batch is recorded, exit 0 within seconds,
    and a restart delivers everything.
    """
    relay.step = 0.2
    relay.slow_seconds = 1.5
    config = write_config()
    tracker = spawn(config)
    relay.fail_next("slow")
    ids = ["drain-1", "drain-2-fail"]
    assert 201 == tracker.register(ids).status_code
    wait_until(
        lambda: any(r.path == "/luma/tasks" for r in relay.requests), 5, "the slow poll request"
    )

    signalled = time.monotonic()
    tracker.signal(signal.SIGTERM)
    tracker.wait_for_log(lambda e: e.get("event") == "stopping", 5)
    refused = tracker.register(["drain-late"])
    not_ready = httpx.get(f"{tracker.api}/readyz")
    code = tracker.wait(10)
    took = time.monotonic() - signalled

    assert 0 == code, tracker.tail()
    assert took < 6, f"took {took:.1f} s to stop"
    assert 503 == refused.status_code, refused.text
    assert "shutting down" in refused.json()["error"]
    assert 503 == not_ready.status_code
    assert "shutting down" in not_ready.json()["reasons"]
    events = [e["event"] for e in tracker.events]
    assert "drained" in events, tracker.tail()
    cycle = [e for e in tracker.events if e["event"] == "poll_cycle" and e["claimed"]]
    assert cycle, tracker.tail()
    assert 2 == cycle[0]["changed"], "the in-flight batch was not recorded"
    assert events.index("stopped") > events.index("drained")

    restarted = spawn(config)
    hooks = receiver.wait_for(2, timeout=15)
    assert {"drain-1", "drain-2-fail"} == {verified(h)["data"]["task_id"] for h in hooks}
    assert 404 == restarted.client.get("/v1/tasks/luma/drain-late").status_code
    assert 0 == restarted.stop()


def test_run_takes_the_config_from_tracker_config_and_stops_on_sigint(
    write_config: Callable[..., Path], spawn: Callable[..., Daemon]
) -> None:
    """Without --config, `tracker run` reads TRACKER_CONFIG; SIGINT stops it cleanly, exit 0."""
    config = write_config()
    tracker = spawn(config, clean_env(TRACKER_CONFIG=str(config)))
    assert "--config" not in tracker.proc.args

    assert 200 == tracker.client.get("/healthz").status_code
    tracker.signal(signal.SIGINT)
    assert 0 == tracker.wait(10), tracker.tail()
    assert "stopped" == tracker.events[-1]["event"]


# -- reload ---------------------------------------------------------------------------------


def test_sighup_changes_the_poll_interval_live_and_survives_a_broken_config(
    relay: SimulatedRelay,
    write_config: Callable[..., Path],
    spawn: Callable[..., Daemon],
) -> None:
    """SIGHUP applies a new poll.interval (relay sees the new rate), names what needs a restart,
    and a broken file leaves the daemon running on the settings it had.
    """
    relay.set("luma", "hup-1", "IN_PROGRESS", "50%")  # never finishes: polled forever
    slow = {"poll": {"interval": 1.0, "max_interval": 1.0}}
    config = write_config(slow)
    tracker = spawn(config)
    assert 201 == tracker.register(["hup-1"]).status_code

    def polls() -> list[float]:
        return [r.at for r in relay.requests if r.path == "/luma/tasks"]

    wait_until(lambda: len(polls()) >= 2, 6, "two polls at the slow interval")
    assert polls()[1] - polls()[0] > 0.8

    fast = {
        "poll": {"interval": 0.2, "max_interval": 0.2},
        "server": {"port": 1, "api_tokens": [TOKEN, "second-token"]},
    }
    write_config(merge(slow, fast))
    before = len(polls())
    tracker.signal(signal.SIGHUP)
    reloaded = tracker.wait_for_log(lambda e: e.get("event") == "reloaded", 5)
    assert {"poll.interval", "poll.max_interval", "server.api_tokens"} <= set(reloaded["applied"])
    assert ["server.port"] == reloaded["needs_restart"]
    tracker.wait_for_log(lambda e: e.get("event") == "restart_needed", 5)

    wait_until(lambda: len(polls()) >= before + 6, 5, "polls at the new interval")
    gaps = [b - a for a, b in zip(polls()[before + 1 :], polls()[before + 2 :], strict=False)]
    assert statistics.median(gaps) < 0.6, gaps
    second = {"Authorization": "Bearer second-token"}
    assert 200 == httpx.get(f"{tracker.api}/v1/tasks", headers=second).status_code

    config.write_text(config.read_text().replace("interval = 0.2", 'interval = "fast"', 1))
    tracker.signal(signal.SIGHUP)
    failed = tracker.wait_for_log(lambda e: e.get("event") == "reload_failed", 5)
    assert any(p.startswith("poll.interval") for p in failed["problems"]), failed
    assert failed["level"] == "error"
    count = len(polls())
    wait_until(lambda: len(polls()) >= count + 3, 3, "polls going on at the fast interval")
    assert 200 == tracker.client.get("/healthz").status_code
    assert 200 == httpx.get(f"{tracker.api}/v1/tasks", headers=second).status_code
    assert 0 == tracker.stop()


# -- health, metrics, notify ------------------------------------------------------------------


def test_readyz_fails_with_the_reason_when_the_database_file_is_replaced(
    tmp_path: Path, write_config: Callable[..., Path], spawn: Callable[..., Daemon]
) -> None:
    """/readyz answers 503 naming the database while its path holds no database, 200 again once
    the file is back; /healthz stays 200 throughout.

    Tests run as root, where chmod 000 stops no read, and the daemon's pooled connections keep
    the file they opened even after a rename. So the database is renamed away and a directory
    put in its place: the readiness check opens the path afresh, as a restart would, and fails.
    """
    tracker = spawn(write_config())
    database = tmp_path / "tracker.db"
    aside = tmp_path / "aside.db"
    wait_until(lambda: tracker.client.get("/readyz").status_code == 200, 5, "ready")

    database.rename(aside)
    database.mkdir()
    try:
        answer = tracker.client.get("/readyz")
        health = tracker.client.get("/healthz")
    finally:
        database.rmdir()
        aside.rename(database)

    assert 503 == answer.status_code, answer.text
    reasons = answer.json()["reasons"]
    assert any(r.startswith("database file tracker.db unusable") for r in reasons), reasons
    assert 200 == health.status_code
    wait_until(lambda: tracker.client.get("/readyz").status_code == 200, 5, "ready again")
    assert 200 == httpx.get(f"{tracker.api}/readyz").status_code  # no token needed
    not_ready = tracker.wait_for_log(lambda e: e.get("event") == "not_ready", 2)
    assert "database" == not_ready["check"]
    tracker.wait_for_log(lambda e: e.get("event") == "ready_again", 2)
    assert 0 == tracker.stop()


def metric_samples(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Family name -> {sorted labels of a sample + its name: value}."""
    families: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        samples = families.setdefault(family.name, {})
        for sample in family.samples:
            key = (("__name__", sample.name), *sorted(sample.labels.items()))
            samples[key] = sample.value
    return families


def total(families: dict[str, Any], name: str, sample: str, **labels: str) -> float:
    """The sum of one family's samples named ``sample`` whose labels include ``labels``."""
    return sum(
        value
        for key, value in families.get(name, {}).items()
        if dict(key)["__name__"] == sample and labels.items() <= dict(key).items()
    )


def test_metrics_expose_every_family_and_move_with_work(
    relay: SimulatedRelay,
    receiver: WebhookReceiver,
    write_config: Callable[..., Path],
    spawn: Callable[..., Daemon],
) -> None:
    """/metrics parses as Prometheus text with every documented family, and the figures follow
    a relay error, transitions and deliveries.
    """
    relay.step = 0.1
    tracker = spawn(write_config())
    scrape = httpx.get(f"{tracker.api}/metrics")  # no token by default
    assert 200 == scrape.status_code
    assert scrape.headers["content-type"].startswith("text/plain")
    before = metric_samples(scrape.text)
    assert METRIC_FAMILIES <= set(before), sorted(before)
    assert 0 == total(before, "tracker_transitions", "tracker_transitions_total")

    relay.fail_next("http_500")
    assert 201 == tracker.register(["metrics-ok", "metrics-fail"]).status_code
    receiver.wait_for(2, timeout=15)

    def settled() -> dict[str, Any] | None:
        families = metric_samples(httpx.get(f"{tracker.api}/metrics").text)
        done = total(families, "tracker_deliveries", "tracker_deliveries_total")
        return families if done >= 2 else None

    after = wait_until(settled, 5, "both deliveries in the metrics")
    assert 1 == total(after, "tracker_database_up", "tracker_database_up")
    assert 1 == total(after, "tracker_tasks", "tracker_tasks", platform="luma", status="completed")
    assert 1 == total(after, "tracker_tasks", "tracker_tasks", platform="luma", status="failed")
    assert 2 == total(after, "tracker_transitions", "tracker_transitions_total", to="completed") + (
        total(after, "tracker_transitions", "tracker_transitions_total", to="failed")
    )
    assert 1 == total(after, "tracker_upstream_errors", "tracker_upstream_errors_total", code="500")
    assert 1 <= total(
        after, "tracker_upstream_requests", "tracker_upstream_requests_total", code="200"
    )
    assert 1 <= total(
        after,
        "tracker_poll_cycle_duration_seconds",
        "tracker_poll_cycle_duration_seconds_count",
    )
    assert 2 <= total(
        after,
        "tracker_upstream_ids_per_request",
        "tracker_upstream_ids_per_request_sum",
        platform="luma",
    )
    assert 2 == total(after, "tracker_deliveries", "tracker_deliveries_total", outcome="delivered")
    assert 2 == total(
        after, "tracker_delivery_latency_seconds", "tracker_delivery_latency_seconds_count"
    )
    assert 2 == total(after, "tracker_outbox_depth", "tracker_outbox_depth", state="delivered")
    assert 0 == total(after, "tracker_outbox_depth", "tracker_outbox_depth", state="pending")
    assert 0 == total(
        after,
        "tracker_oldest_pending_delivery_age_seconds",
        "tracker_oldest_pending_delivery_age_seconds",
    )
    assert 0 == tracker.stop()


@pytest.fixture(name="notify_socket")
def _notify_socket() -> Iterator[tuple[str, list[str]]]:
    """A datagram socket playing systemd: its path, and every message received, in order."""
    directory = tempfile.mkdtemp(prefix="trk-", dir="/tmp")  # AF_UNIX paths: 108 bytes at most
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.05)
    messages: list[str] = []
    done = threading.Event()

    def listen() -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                messages.append(sock.recv(65536).decode())

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    yield path, messages
    done.set()
    listener.join(5)
    sock.close()
    shutil.rmtree(directory, ignore_errors=True)


def test_notify_protocol_ready_status_watchdog_reloading_and_stopping(
    notify_socket: tuple[str, list[str]],
    write_config: Callable[..., Path],
    spawn: Callable[..., Daemon],
) -> None:
    """With NOTIFY_SOCKET and WATCHDOG_USEC set, the process sends READY=1, STATUS=, WATCHDOG=1
    every 0.1 s, RELOADING=1 then READY=1 on SIGHUP, and STOPPING=1 on SIGTERM.
    """
    path, messages = notify_socket
    env = clean_env(NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")
    tracker = spawn(write_config(), env)

    def count(prefix: str) -> int:
        return sum(1 for m in list(messages) if m.startswith(prefix))

    wait_until(lambda: count("READY=1") == 1, 5, "READY=1")
    wait_until(lambda: count("STATUS=") >= 1, 5, "a STATUS= line")
    ready_at = len(messages)
    wait_until(lambda: count("WATCHDOG=1") >= 5, 2, "watchdog pings every 0.1 s")

    tracker.signal(signal.SIGHUP)
    wait_until(lambda: count("READY=1") == 2, 5, "READY=1 after the reload")
    reloading = [i for i, m in enumerate(messages) if m.startswith("RELOADING=1")]
    readies = [i for i, m in enumerate(messages) if m.startswith("READY=1")]
    assert 1 == len(reloading)
    assert reloading[0] < readies[1]
    assert "MONOTONIC_USEC=" in messages[reloading[0]]

    assert 0 == tracker.stop()
    stopping = [i for i, m in enumerate(messages) if m.startswith("STOPPING=1")]
    assert 1 == len(stopping)
    assert stopping[0] > reloading[0] > ready_at
    status = next(m for m in messages if m.startswith("STATUS="))
    assert "active tasks" in status


# -- configuration and logs -------------------------------------------------------------------


def test_check_config_accepts_a_good_file_and_names_the_key_of_a_bad_one(
    tmp_path: Path, relay: SimulatedRelay, receiver: WebhookReceiver
) -> None:
    """`tracker check-config` exits 0 on a valid file and 2 naming the unknown, mistyped or
    missing key.
    """
    good = base_config(relay.base_url, receiver.url, f"sqlite:///{tmp_path / 'c.db'}")
    missing = merge(good, {})
    del missing["webhooks"]["secret"]
    cases = {
        "good": (good, 0, '"ok": true'),  # JSON: stdout is a pipe
        "unknown": (merge(good, {"server": {"bogus": 1}}), 2, "server.bogus: unknown key"),
        "mistyped": (merge(good, {"poll": {"interval": "fast"}}), 2, "poll.interval"),
        "missing": (missing, 2, "webhooks.secret: required key is missing"),
    }
    runs: dict[str, subprocess.Popen[str]] = {}
    for name, (document, _, _) in cases.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(toml_text(document))
        runs[name] = subprocess.Popen(
            [sys.executable, "-m", "tracker", "check-config", "--config", str(path)],
            cwd=REPO,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for name, (_, code, says) in cases.items():
        out, err = runs[name].communicate(timeout=30)
        assert code == runs[name].returncode, (name, out, err)
        assert says in (out if code == 0 else err), (name, out, err)


def test_logs_are_json_lines_and_never_carry_a_secret(
    relay: SimulatedRelay,
    receiver: WebhookReceiver,
    write_config: Callable[..., Path],
    spawn: Callable[..., Daemon],
) -> None:
    """Every stdout line is JSON; the api key, webhook secret and tokens (one added by a reload)
    are redacted even from a logged webhook URL that contains them.
    """
    relay.step = 0.1
    config = write_config({"logging": {"level": "debug"}})
    tracker = spawn(config)
    leaky = f"{receiver.url}?t={TOKEN}&k=sk-sim&s={WEBHOOK_SECRET}"
    assert 201 == tracker.register(["logs-1"], webhook_url=leaky).status_code
    receiver.wait_for(1, timeout=15)

    rotated = "rotated-token-7f3a9c"
    write_config({"logging": {"level": "debug"}, "server": {"api_tokens": [TOKEN, rotated]}})
    tracker.signal(signal.SIGHUP)
    tracker.wait_for_log(lambda e: e.get("event") == "reloaded", 5)
    assert (
        201 == tracker.register(["logs-2"], webhook_url=f"{receiver.url}?t={rotated}").status_code
    )
    receiver.wait_for(2, timeout=15)
    tracker.wait_for_log(
        lambda e: e.get("event") == "webhook_delivered" and e.get("task_id") == "logs-2", 5
    )
    relay.fail_next("http_500")  # an error line too
    assert 201 == tracker.register(["logs-3"]).status_code
    tracker.wait_for_log(lambda e: e.get("event") == "upstream_error", 5)
    assert 0 == tracker.stop()

    lines = [line for line in tracker.stdout if line.strip()]
    for line in lines:
        assert isinstance(json.loads(line), dict), line
    everything = "\n".join([*tracker.stdout, *tracker.stderr])
    for secret in ("sk-sim", WEBHOOK_SECRET, TOKEN, rotated):
        assert secret not in everything, f"{secret!r} leaked into the logs"
    urls = [e["url"] for e in tracker.events if e.get("event") == "webhook_delivered"]
    assert 2 == len(urls)
    assert all("[redacted]" in url for url in urls), urls
