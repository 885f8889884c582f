"""kill -9 over and over under load: no final event lost, none sent under two webhook-ids."""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import all_pages, wait_until
from faultrig import (
    DATABASES,
    FINAL_EVENTS,
    REPO,
    TOKEN,
    database_url,
    final_hooks,
    running,
    write_config,
)

from tracker.testing.daemon import Forkserver
from tracker.testing.receiver import WebhookReceiver
from tracker.testing.simulator import SimulatedRelay

pytestmark = pytest.mark.e2e

#: kill -9s per database
KILLS = 20
#: ids registered while each daemon lives
PER_ROUND = 10


@pytest.mark.parametrize("db", DATABASES)
def test_kill_9_loop_under_load_loses_no_final_event_and_keeps_one_webhook_id(
    db: str,
    tmp_path: Path,
    make_pg_url: Callable[[], str],
    relay: SimulatedRelay,
    receiver: WebhookReceiver,
) -> None:
    """Twenty SIGKILLs land at random moments while tasks register, move and deliver; a last
    daemon then finishes the work: every registered task has exactly one final event, it was
    delivered, and the receiver saw it under one webhook-id only (retries reuse it).
    """
    relay.step = 0.1
    rng = random.Random(20)
    config = write_config(
        tmp_path, relay.base_url, receiver.url, database_url(db, tmp_path, make_pg_url)
    )
    registered: list[str] = []
    forkserver = Forkserver(cwd=REPO)
    try:
        for round_ in range(KILLS):
            daemon = forkserver.spawn(config, tmp_path / f"round-{round_}.log", token=TOKEN)
            try:
                ids = [f"k{round_}-{n}" + ("-fail" if n % 5 == 0 else "") for n in range(PER_ROUND)]
                answer = daemon.client.post("/v1/tasks", json={"platform": "luma", "ids": ids})
                if answer.status_code == 201:
                    registered += ids
                time.sleep(rng.uniform(0.05, 0.4))
            finally:
                daemon.kill()
    finally:
        forkserver.close()
    with running(config) as last:

        def settled() -> list[dict[str, Any]] | None:
            rows = all_pages(last.client, "/v1/deliveries", "deliveries")
            finals = [d for d in rows if d["event_type"] in FINAL_EVENTS]
            done = len(finals) == len(registered) and all(d["state"] == "delivered" for d in finals)
            return finals if done else None

        # On PostgreSQL, deliveries in flight at the last kill wait for their lease (6 s).
        finals = wait_until(settled, 60, "every final event to be delivered", every=0.3)
        per_task = collections.Counter(d["task_id"] for d in finals)
        assert dict.fromkeys(registered, 1) == dict(per_task)
        hooks = final_hooks(receiver)
        sent = {t: hooks.get(t) for t in registered}
        assert {d["task_id"]: {d["webhook_id"]} for d in finals} == sent
        assert 0 == last.stop()
