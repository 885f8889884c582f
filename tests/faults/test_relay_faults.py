"""A relay answering every malformed way, beside healthy tasks in the same batches."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import wait_until
from faultrig import DATABASES, database_url, hooks_for, running, write_config

from tracker.testing.receiver import WebhookReceiver
from tracker.testing.simulator import FAULT_KINDS, POISON_KINDS, SimulatedRelay

pytestmark = pytest.mark.e2e

#: every answer fault but `slow`, which is only a late healthy answer
INJECTED = sorted(FAULT_KINDS - {"slow"})
#: faults whose answer is still usable (no items in it), so no relay error is logged
USABLE = {"null_envelope", "junk_items"}
HEALTHY = [f"ok-{n}" for n in range(30)]
HEALTHY_VIDEO = [f"vid-{n}" for n in range(4)]
POISONED = {f"bad-{kind}": kind for kind in sorted(POISON_KINDS)}
MIB = 1024 * 1024


@pytest.mark.parametrize("db", DATABASES)
def test_every_relay_fault_and_poison_leaves_healthy_tasks_finishing_with_one_webhook(
    db: str,
    tmp_path: Path,
    make_pg_url: Callable[[], str],
    relay: SimulatedRelay,
    receiver: WebhookReceiver,
) -> None:
    """Every answer fault (statuses, HTML, truncated and deep JSON, NaN, huge numbers,
    text/plain, stalls, trickles, 400 MB bodies, resets, refused connections) lands in turn
    while poisoned items (NUL, surrogates, NaN, long strings, odd types, duplicates, unasked
    ids) share the batches of healthy tasks: each healthy task ends final with exactly one
    verified webhook, each fault is one relay error, no cycle fails, and the 400 MB answers
    cost less than three times the 32 MiB read cap in peak memory.
    """
    relay.step = 0.25
    relay.trickle_seconds = 0.05
    for task_id, kind in POISONED.items():
        relay.poison("luma", task_id, kind)
    url = database_url(db, tmp_path, make_pg_url)
    with running(write_config(tmp_path, relay.base_url, receiver.url, url)) as daemon:
        before = daemon.peak_rss_bytes()
        for kind in INJECTED:
            relay.fail_next(kind)
        answer = daemon.client.post(
            "/v1/tasks", json={"platform": "luma", "ids": [*HEALTHY, *POISONED]}
        )
        assert 201 == answer.status_code, answer.text
        answer = daemon.client.post("/v1/tasks", json={"platform": "video", "ids": HEALTHY_VIDEO})
        assert 201 == answer.status_code, answer.text
        wait_until(lambda: relay.pending_faults == 0, 60, "every fault to be served")
        # Refused connections: the relay goes away for a few cycles, then comes back.
        relay.stop()
        time.sleep(0.8)
        relay.start()

        healthy = {*HEALTHY, *HEALTHY_VIDEO}
        hooks = wait_until(
            lambda: hooks_for(receiver, healthy),
            30,
            "a final webhook for every healthy task",
        )
        assert dict.fromkeys(healthy, 1) == {t: len(hooks[t]) for t in healthy}

        # The 400 MB answers (one declared, one streamed) are read no further than the 32 MiB
        # `max_response_bytes`; shown with -s, quoted in docs/reliability.md.
        peak = daemon.peak_rss_bytes()
        print(f"peak RSS {before / MIB:.1f} MiB at start, {peak / MIB:.1f} MiB at most")  # noqa: T201
        assert peak - before < 3 * 32 * MIB
        refused = [e for e in daemon.events if "byte limit" in str(e.get("error"))]
        assert 2 <= len(refused)
        errors = [e for e in daemon.events if e.get("event") == "upstream_error"]
        assert len(INJECTED) - len(USABLE) + 1 <= len(errors)
        assert [] == [e for e in daemon.events if e.get("event") == "poll_cycle_failed"]
        assert "Traceback" not in daemon.output()
        assert 0 == daemon.stop()
