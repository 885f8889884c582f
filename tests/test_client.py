"""tracker.client against the real `tracker` process: typed answers, errors, webhook checks."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import standardwebhooks
from conftest import WEBHOOK_SECRET, base_config, toml_text

from tracker import client, signing
from tracker.client import (
    AsyncTrackerClient,
    InvalidRequestError,
    InvalidSignature,
    NotFoundError,
    TrackerClient,
    UnauthorizedError,
    verify_webhook,
)
from tracker.status import EventType, TaskStatus
from tracker.store import Registration, SqlStore
from tracker.testing.receiver import WebhookReceiver
from tracker.testing.simulator import SimulatedRelay

TOKEN = "test-token"


class Served:
    """A `tracker run` process against a simulated relay, with a receiver for its webhooks."""

    def __init__(self, workdir: Path) -> None:
        self.relay = SimulatedRelay(step=0.0).__enter__()
        self.receiver = WebhookReceiver().__enter__()
        path = workdir / "tracker.toml"
        document = base_config(
            self.relay.base_url, self.receiver.url, f"sqlite:///{workdir / 't.db'}"
        )
        document["poll"]["interval"] = 0.3
        document["webhooks"]["events"] = ["task.started", "task.completed", "task.failed"]
        path.write_text(toml_text(document))
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tracker", "run", "--config", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.url = ""
        self.db_url = f"sqlite:///{workdir / 't.db'}"
        started = threading.Event()

        def read() -> None:
            for line in self.proc.stdout or ():
                if not self.url and '"started"' in line:
                    self.url = json.loads(line)["api"]
                    started.set()

        threading.Thread(target=read, daemon=True).start()
        if not started.wait(30):
            self.close()
            pytest.fail("the tracker process did not start")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.receiver.__exit__(None, None, None)
        self.relay.__exit__(None, None, None)


@pytest.fixture(name="served", scope="module")
def _served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = Served(tmp_path_factory.mktemp("client"))
    yield served
    served.close()


def test_the_sync_client_registers_reads_lists_and_removes(served: Served) -> None:
    """register, get, list and remove answer typed values; errors arrive as exceptions."""
    with TrackerClient(served.url, TOKEN) as tracker:
        first = tracker.register("luma", ["c-1", "c/2"], metadata={"user": 42})
        again = tracker.register("luma", ["c-1"])
        task = tracker.get("luma", "c/2")
        listed = tracker.list(platform="luma", limit=100)
        tracker.remove("luma", "c-1")
        with pytest.raises(NotFoundError) as gone:
            tracker.get("luma", "c-1")
        with pytest.raises(InvalidRequestError) as refused:
            tracker.register("lumaa", ["x"])
    with TrackerClient(served.url, "wrong") as stranger, pytest.raises(UnauthorizedError):
        stranger.list()

    assert (["c-1", "c/2"], []) == (sorted(first.registered), first.existing)
    assert (["c-1"], []) == (again.existing, again.registered)
    assert ("c/2", {"user": 42}) == (task.task_id, task.metadata)
    assert isinstance(task.status, TaskStatus)
    assert isinstance(task.created_at, datetime)
    assert {"c-1", "c/2"} <= {t.task_id for t in listed.tasks}
    assert 404 == gone.value.status_code
    assert any("platform" in p for p in refused.value.problems), refused.value.problems


def test_the_client_reaches_a_task_stored_under_a_dot_id(served: Served) -> None:
    """A task stored under ".." (before registration refused it) is read and removed by the
    client under its own name, not by a request to the parent path /v1/tasks/luma."""
    store = SqlStore.from_url(served.db_url)
    store.register(Registration("luma", [".."]), datetime.now(UTC))
    store.close()
    with TrackerClient(served.url, TOKEN) as tracker:
        task = tracker.get("luma", "..")
        tracker.remove("luma", "..")
        with pytest.raises(NotFoundError):
            tracker.get("luma", "..")

    assert ".." == task.task_id


async def test_the_async_client_and_the_webhook_helper(served: Served) -> None:
    """The async client registers, reads, lists (with its filters) and raises the API's errors;
    the webhook that follows verifies into a typed event."""
    async with AsyncTrackerClient(served.url, TOKEN) as tracker:
        registered = await tracker.register("luma", ["a-1"], metadata={"order": 7})
        deadline = time.monotonic() + 20
        while (await tracker.get("luma", "a-1")).status is not TaskStatus.COMPLETED:
            assert time.monotonic() < deadline, "a-1 never completed"
            await asyncio.sleep(0.1)
        task = await tracker.get("luma", "a-1")
        listed = await tracker.list(platform="luma", status="completed", limit=100)
        with pytest.raises(NotFoundError):
            await tracker.remove("luma", "never-registered")
        with pytest.raises(InvalidRequestError):
            await tracker.register("luma", [""])

    hook = next(
        h
        for h in served.receiver.wait_for(1, timeout=10) + served.receiver.received
        if h.json()["data"]["task_id"] == "a-1" and h.json()["type"] == "task.completed"
    )
    event = verify_webhook(WEBHOOK_SECRET, hook.body, hook.headers)

    assert ["a-1"] == registered.registered
    assert "a-1" in {t.task_id for t in listed.tasks}
    assert all(TaskStatus.COMPLETED is t.status for t in listed.tasks)
    assert [TaskStatus.PENDING, TaskStatus.COMPLETED] == [
        task.transitions[0].from_,
        task.transitions[-1].to,
    ]
    assert (EventType.COMPLETED, TaskStatus.COMPLETED) == (event.type, event.data.status)
    assert ("a-1", {"order": 7}) == (event.data.task_id, event.data.metadata)
    assert hook.headers["webhook-id"] == event.webhook_id


def test_verify_webhook_agrees_with_the_standardwebhooks_library() -> None:
    """A webhook the reference library signs verifies; a changed body or secret does not."""
    body = json.dumps(
        {
            "type": "task.failed",
            "timestamp": "2026-11-25T10:00:00Z",
            "data": {
                "platform": "luma",
                "task_id": "t",
                "status": "failed",
                "previous_status": "queued",
                "fail_reason": "boom",
            },
        }
    )
    now = datetime.now(UTC)
    signature = standardwebhooks.Webhook(WEBHOOK_SECRET).sign("msg_1", now, body)
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
    }

    event = verify_webhook(WEBHOOK_SECRET, body.encode(), headers)

    assert (EventType.FAILED, "boom", "msg_1") == (
        event.type,
        event.data.fail_reason,
        event.webhook_id,
    )
    with pytest.raises(InvalidSignature, match="no matching v1 signature"):
        verify_webhook(WEBHOOK_SECRET, body.replace("boom", "fine").encode(), headers)
    with pytest.raises(InvalidSignature):
        verify_webhook(signing.new_secret(), body.encode(), headers)
    not_an_event = b'{"hello": 1}'
    timestamp = int(now.timestamp())
    signed = signing.webhook_headers([WEBHOOK_SECRET], "msg_2", timestamp, not_an_event)
    with pytest.raises(InvalidSignature, match="not a tracker event"):
        verify_webhook(WEBHOOK_SECRET, not_an_event, signed)


def test_the_readme_names_the_error_classes_the_client_exports() -> None:
    """The README's Python client section names each error class tracker.client exports, by
    the names an app imports (it named Unauthorized, NotFound, ..., which do not exist)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Python client", 1)[1].split("\n#", 1)[0]

    named = set(re.findall(r"`(\w+Error)`", section))
    assert {name for name in client.__all__ if name.endswith("Error")} == named
