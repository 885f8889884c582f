"""`tracker demo`: the whole path on loopback, with the simulated relay and a local receiver."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from tracker import config, logs, signing, status
from tracker.testing.receiver import Received, WebhookReceiver
from tracker.testing.simulator import SimulatedRelay

#: the demo gives up after this long (it needs about ten seconds)
DEADLINE = 55.0
#: what the demo says last: the way from here to the newcomer's own first webhook
NEXT = (
    "next: `tracker init` writes a config of your own, then "
    "`tracker run --config tracker.toml --simulate --receiver` and register a task with curl "
    "(the README's five-minute path)"
)
FINAL_TYPES = status.FINAL_EVENT_TYPES


def _settings(
    relay: SimulatedRelay, receiver: WebhookReceiver, workdir: Path, token: str, secret: str
) -> config.Settings:
    return config.parse(
        {
            "server": {"host": "127.0.0.1", "port": 0, "api_tokens": [token]},
            "database": {"url": f"sqlite:///{workdir / 'tracker.db'}"},
            "upstream": {"base_url": relay.base_url, "api_key": relay.api_key, "timeout": 5},
            "poll": {"interval": 1, "batch_size": 100, "concurrency": 2},
            "webhooks": {
                "url": receiver.url,
                "secret": secret,
                "retry_delays": [1, 2, 4],
                "timeout": 5,
                "events": ["task.started", "task.completed", "task.failed"],
            },
            "logging": {"level": "warning"},
        },
        environ={},
    )


_say_lock = threading.Lock()


def say(text: str, *, err: bool = False) -> None:
    """Print one line of the demo's narration (the receiver prints from its own threads)."""
    with _say_lock:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)


def show_webhook(hook: Received) -> None:
    """Print one received webhook on one line, saying whether its signature verified."""
    body = hook.json()
    data = body["data"]
    mark = "verified" if hook.verified else "NOT VERIFIED"
    extra = f" ({data['fail_reason']})" if data["fail_reason"] else ""
    result = data.get("result") or {}
    vendor = result.get("data") if isinstance(result, Mapping) else None
    video = vendor.get("video") if isinstance(vendor, Mapping) else None
    url = f" -> {video['url']}" if isinstance(video, Mapping) and video.get("url") else ""
    say(
        f"  webhook {body['type']:<15} {data['platform']}/{data['task_id']}: "
        f"{data['previous_status']} -> {data['status']}{extra}{url}  "
        f"[{mark}, webhook-id {hook.headers.get('webhook-id')}]",
    )


async def _run(
    settings: config.Settings, receiver: WebhookReceiver, token: str, ids: list[str]
) -> int:
    from tracker.app import Daemon  # noqa: PLC0415 - heavy import, only when running

    daemon = Daemon(settings)
    await daemon.start()
    try:
        base = f"http://127.0.0.1:{daemon.api_port}"
        say(f"tracker API on {base}; registering {len(ids)} luma tasks")
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as client:
            answer = await client.post(
                f"{base}/v1/tasks",
                json={
                    "platform": "luma",
                    "ids": ids,
                    "metadata": {"source": "tracker demo"},
                },
            )
            answer.raise_for_status()
            say(f"  POST /v1/tasks -> {answer.status_code} {answer.json()}")
            deadline = time.monotonic() + DEADLINE
            while time.monotonic() < deadline:
                finals = [h for h in receiver.received if h.json().get("type") in FINAL_TYPES]
                if len(finals) >= len(ids):
                    break
                await asyncio.sleep(0.2)
            else:
                say("demo timed out before every task finished", err=True)
                return 1
            task = (await client.get(f"{base}/v1/tasks/luma/{ids[0]}")).json()
        steps = " -> ".join(
            [task["transitions"][0]["from"], *(t["to"] for t in task["transitions"])]
        )
        say(f"history of {ids[0]}: {steps}")
        unverified = [h for h in receiver.received if not h.verified]
        say(
            f"done: {len(ids)} tasks finished, {receiver.count} webhooks received, "
            f"{len(unverified)} failed verification",
        )
        say(NEXT)
        return 0 if not unverified else 1
    finally:
        await daemon.stop()


def run(*, tasks: int = 5, step: float = 1.0) -> int:
    """Run the demo; returns the process exit code."""
    logs.configure(level="warning", fmt="console")
    token = secrets.token_urlsafe(16)
    secret = signing.new_secret()

    def verify(body: bytes, headers: Mapping[str, str]) -> None:
        signing.verify(secret, body, headers, now=time.time())

    ids = [f"demo-{os.getpid()}-{n}" for n in range(1, tasks + 1)]
    if tasks >= 2:
        ids[-1] += "-fail"  # the simulator ends ids containing "fail" with FAILURE
    with (
        tempfile.TemporaryDirectory(prefix="tracker-demo-") as workdir,
        SimulatedRelay(step=step) as relay,
        WebhookReceiver(verify=verify, on_receive=show_webhook) as receiver,
    ):
        say(f"simulated relay on {relay.base_url}, webhook receiver on {receiver.url}")
        settings = _settings(relay, receiver, Path(workdir), token, secret)
        return asyncio.run(_run(settings, receiver, token, ids))
