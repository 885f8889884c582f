"""Two real `tracker run` processes on one PostgreSQL database: deliveries in flight at one
that is SIGKILLed are taken over by the other within seconds, and not before.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import all_pages, base_config, merge, toml_text, verified, wait_until
from test_e2e import start_daemon

from tracker.delivery.outbox import LEASE
from tracker.routines import DELIVERY_TICK
from tracker.store.sql import deliveries, make_engine
from tracker.testing.daemon import Daemon
from tracker.testing.receiver import Reply, WebhookReceiver
from tracker.testing.simulator import SimulatedRelay

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

TASKS = 12
#: the receiver sits this long on the first instance's requests: they are in flight at the kill
SLOW = 12.0
#: what a takeover may take beyond the lease and two delivery ticks: a claim and a POST
SLACK = 1.0


def claimed(url: str) -> int:
    """How many pending deliveries are claimed right now."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            query = sa.select(sa.func.count()).where(
                deliveries.c.state == "pending",
                deliveries.c.claimed_until > time.time(),
            )
            return int(conn.execute(query).scalar_one())
    finally:
        engine.dispose()


def test_a_killed_instances_deliveries_are_taken_over_within_the_lease_and_two_ticks(
    tmp_path: Path, make_pg_url: Callable[[], str], instances: list[Daemon]
) -> None:
    """While the first instance lives, its renewed claims keep the second off its deliveries
    for longer than a lease; once it is SIGKILLed mid-attempt, the second sends every one of
    them within the lease and two delivery ticks, and each ends delivered under its own
    webhook-id with one recorded attempt.
    """
    url = make_pg_url()
    with SimulatedRelay(step=0.05) as relay, WebhookReceiver() as receiver:
        receiver.default = Reply(status=204, delay=SLOW)
        document = merge(
            base_config(relay.base_url, receiver.url, url),
            {"webhooks": {"timeout": SLOW + 5, "per_host": 2 * TASKS}},
        )
        path = tmp_path / "config.toml"
        path.write_text(toml_text(document))
        ids = [f"h-{n}" for n in range(TASKS)]
        for task_id in ids:
            relay.add("luma", task_id)

        first = start_daemon(path)
        instances.append(first)
        assert 201 == first.register(ids).status_code
        receiver.wait_for(TASKS, 20)  # every final event in flight at the first instance
        sent_at = max(r.at for r in receiver.received)
        instances.append(start_daemon(path))
        # Past the lease the first instance claimed with: only its renewals hold them now.
        time.sleep(max(0.0, sent_at + LEASE + 1 - time.monotonic()))
        assert TASKS == receiver.count, "the second instance took a delivery of a live one"
        assert TASKS == claimed(url)
        assert time.monotonic() < sent_at + SLOW - 1, "too slow to kill mid-attempt"

        receiver.default = Reply(status=204)
        first.kill()
        killed_at = time.monotonic()
        survivor = instances[1]

        def all_delivered() -> list[dict[str, object]] | None:
            rows = all_pages(survivor.client, "/v1/deliveries", "deliveries")
            done = len(rows) == TASKS and all(d["state"] == "delivered" for d in rows)
            return rows if done else None

        outbox = wait_until(all_delivered, 30, "every final event to be delivered", every=0.2)

    resent: dict[str, float] = {}
    for hook in receiver.received:
        if hook.at > killed_at:
            resent.setdefault(hook.headers["webhook-id"], round(hook.at - killed_at, 2))
    assert {d["webhook_id"] for d in outbox} == set(resent)
    late = {hook: took for hook, took in resent.items() if took > LEASE + 2 * DELIVERY_TICK + SLACK}
    assert {} == late
    assert [1] * TASKS == [d["attempts"] for d in outbox]
    seen = collections.defaultdict(set)
    for hook in receiver.received:
        seen[verified(hook)["data"]["task_id"]].add(hook.headers["webhook-id"])
    assert {d["task_id"]: {d["webhook_id"]} for d in outbox} == dict(seen)
    assert 0 == survivor.stop()
