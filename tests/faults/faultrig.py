"""What the fault suite's tests share: databases, configs, the daemon, webhook checks.

Plain functions and context managers rather than fixtures: a second conftest.py would shadow
the `conftest` module the other test files import from.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import base_config, merge, toml_text, verified

from tracker.testing.daemon import Daemon
from tracker.testing.receiver import WebhookReceiver

REPO = Path(__file__).resolve().parents[2]
TOKEN = "fault-token-5d1c0a9e"
FINAL_EVENTS = frozenset({"task.completed", "task.failed", "task.canceled"})
#: the daemon's databases, each test runs on both
DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
#: fast polling and retries, short timeouts, so each fault costs at most a few seconds
FAST: dict[str, Any] = {
    "server": {"api_tokens": [TOKEN]},
    "upstream": {"timeout": 1},
    "poll": {"interval": 0.2, "max_interval": 1, "batch_size": 50},
    "webhooks": {"timeout": 1, "retry_delays": [0.2, 0.3, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]},
}

T = TypeVar("T")


def database_url(kind: str, tmp_path: Path, make_pg_url: Callable[[], str]) -> str:
    """A fresh database of ``kind`` ("sqlite" or "postgres") for one daemon."""
    return f"sqlite:///{tmp_path / 'faults.db'}" if kind == "sqlite" else make_pg_url()


def register(daemon: Daemon, ids: list[str], **fields: Any) -> None:
    """POST /v1/tasks for luma ids (or ``platform=...``); fails the test unless 201."""
    answer = daemon.register(ids, **fields)
    assert 201 == answer.status_code, answer.text


def write_config(
    tmp_path: Path,
    relay_url: str,
    hook_url: str,
    db_url: str,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """config.toml for a relay, a receiver and a database, fast settings and overrides on top."""
    document = merge(merge(base_config(relay_url, hook_url, db_url), FAST), overrides or {})
    path = tmp_path / "config.toml"
    path.write_text(toml_text(document))
    return path


@contextlib.contextmanager
def running(config: Path) -> Iterator[Daemon]:
    """A started daemon, killed at the end if the test left it running."""
    daemon = Daemon(config, token=TOKEN, cwd=REPO)
    try:
        yield daemon
    finally:
        daemon.close()


def hooks_for(receiver: WebhookReceiver, task_ids: Iterable[str]) -> dict[str, set[str]] | None:
    """`final_hooks` once it has every one of ``task_ids``, else None."""
    hooks = final_hooks(receiver)
    return hooks if set(task_ids) <= set(hooks) else None


def final_hooks(receiver: WebhookReceiver) -> dict[str, set[str]]:
    """task id -> the webhook-ids of its verified final events that arrived whole."""
    seen: dict[str, set[str]] = collections.defaultdict(set)
    for hook in receiver.received:
        if len(hook.body) != int(hook.headers.get("content-length", -1)):
            continue  # cut off by a kill: no receiver would take it
        body = verified(hook)
        if body["type"] in FINAL_EVENTS:
            seen[body["data"]["task_id"]].add(hook.headers["webhook-id"])
    return dict(seen)
