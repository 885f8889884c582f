"""Receivers answering every malformed way: each delivery is judged alone, none loops."""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import WEBHOOK_SECRET, wait_until
from faultrig import DATABASES, database_url, hooks_for, running, write_config

from tracker.testing.receiver import Reply, WebhookReceiver
from tracker.testing.simulator import SimulatedRelay

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
#: one reply of each bad kind, in the order the bad receiver gives them
BAD_REPLIES = {
    "http_500_html": Reply(500, {"Content-Type": "text/html"}, b"<html>500 oops</html>"),
    "http_503_empty": Reply(503),
    "redirect": Reply(302, {"Location": "http://127.0.0.1:9/elsewhere"}),
    "gone": Reply(410, body=b"unsubscribed"),
    "nul_body": Reply(200, body=b"ok\x00with a NUL"),
    "invalid_utf8": Reply(200, body=b"\xff\xfe\xed\xa0\x80 not UTF-8"),
    "secret_echo": Reply(200, body=f"you signed with {WEBHOOK_SECRET}".encode()),
    "huge_body": Reply(200, body_size=400 * MIB),
    "trickle": Reply(200, body=b"x" * 200, trickle=0.05),
    "stall": Reply(200, delay=4),
    "reset": Reply(drop="reset"),
    "hang_up": Reply(drop="hang_up"),
}
HEALTHY = [f"ok-{n}" for n in range(20)]
#: [webhooks].max_response_bytes for the run: below the 2 KiB the delivery log keeps, so the
#: cut is visible there
READ_CAP = 1024
SENT_TO_BAD = [f"to-bad-{n}" for n in range(len(BAD_REPLIES))]


@pytest.mark.parametrize("db", DATABASES)
def test_misbehaving_receivers_affect_only_their_own_deliveries(
    db: str,
    tmp_path: Path,
    make_pg_url: Callable[[], str],
    relay: SimulatedRelay,
    receiver: WebhookReceiver,
) -> None:
    """A receiver answering with errors, HTML, NUL bytes, bad UTF-8, an echoed secret, 400 MB,
    a trickle, a stall, a reset or a hang-up costs only its own deliveries: healthy tasks beside
    it get exactly one verified webhook each, every attempt is recorded exactly once (a NUL
    answer on PostgreSQL no longer makes the event go out again at each lease), and the
    delivery log holds neither NUL nor the secret. The 400 MB answer is read only up to
    [webhooks].max_response_bytes, costs no memory to speak of, and is delivered by its 200.
    """
    url = database_url(db, tmp_path, make_pg_url)
    overrides = {"webhooks": {"max_response_bytes": READ_CAP}}
    with (
        WebhookReceiver() as bad,
        running(write_config(tmp_path, relay.base_url, receiver.url, url, overrides)) as daemon,
    ):
        before = daemon.peak_rss_bytes()
        bad.reply(*BAD_REPLIES.values())
        answer = daemon.client.post(
            "/v1/tasks", json={"platform": "luma", "ids": SENT_TO_BAD, "webhook_url": bad.url}
        )
        assert 201 == answer.status_code, answer.text
        answer = daemon.client.post("/v1/tasks", json={"platform": "luma", "ids": HEALTHY})
        assert 201 == answer.status_code, answer.text

        hooks = wait_until(
            lambda: hooks_for(receiver, HEALTHY),
            20,
            "a final webhook for every healthy task",
        )
        assert dict.fromkeys(HEALTHY, 1) == {t: len(hooks[t]) for t in HEALTHY}
        wait_until(lambda: bad.count >= len(BAD_REPLIES), 20, "every bad reply to be given")

        def settled() -> tuple[list[dict[str, Any]], dict[str, int]] | None:
            page = daemon.client.get("/v1/deliveries", params={"limit": 200}).json()
            rows = [d for d in page["deliveries"] if d["task_id"] in SENT_TO_BAD]
            sent = collections.Counter(h.headers["webhook-id"] for h in bad.received)
            recorded = {d["webhook_id"]: d["attempts"] for d in rows}
            return (rows, recorded) if recorded == dict(sent) else None

        # Every request the bad receiver saw is one attempt on record: none was lost (which
        # would send the event again at the lease's end), none counted twice.
        rows, _ = wait_until(settled, 15, "every attempt to be recorded")
        excerpts = " ".join(str(a.get("response")) for d in rows for a in d["log"])
        assert "\x00" not in excerpts
        assert "[redacted]" in excerpts  # the receiver that echoed the signing secret
        assert WEBHOOK_SECRET[:9] not in daemon.client.get("/v1/deliveries").text
        [huge] = [a for d in rows for a in d["log"] if a.get("response") == "x" * READ_CAP]
        assert 200 == huge["status_code"]
        # Reading all of it would cost 400 MiB; shown with -s, quoted in docs/reliability.md.
        peak = daemon.peak_rss_bytes()
        print(f"peak RSS {before / MIB:.1f} MiB at start, {peak / MIB:.1f} MiB at most")  # noqa: T201
        assert peak - before < 32 * MIB
        failures = {"delivery_run_failed", "delivery_results_unrecorded", "attempt_unrecorded"}
        assert [] == [e for e in daemon.events if e.get("event") in failures]
        assert "Traceback" not in daemon.output()
        assert 0 == daemon.stop()
