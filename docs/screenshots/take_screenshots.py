"""Screenshots of the dashboard for the README: a daemon on the simulated relay, headless Chromium.

    python docs/screenshots/take_screenshots.py      # writes the PNGs beside this script

Needs Debian's chromium and chromium-driver and the test extras (selenium).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import httpx
from selenium.webdriver.common.by import By

from tracker import config, sdnotify, signing
from tracker.testing import browser
from tracker.testing.receiver import Reply, WebhookReceiver
from tracker.testing.running import DaemonThread
from tracker.testing.simulator import SimulatedRelay

TOKEN = "screenshot-token"  # noqa: S105 - a throwaway daemon's token
HERE = Path(__file__).resolve().parent


def _settings(relay: SimulatedRelay, receiver: WebhookReceiver, database: Path) -> config.Settings:
    return config.parse(
        {
            "server": {"host": "127.0.0.1", "port": 0, "api_tokens": [TOKEN]},
            "database": {"url": f"sqlite:///{database}"},
            "upstream": {"base_url": relay.base_url, "api_key": "sk-sim", "timeout": 2},
            "poll": {"interval": 0.3, "max_interval": 1},
            "webhooks": {
                "url": receiver.url,
                "secret": signing.new_secret(),
                "retry_delays": [0.1, 0.1],
                "allow_private": ["127.0.0.0/8"],
            },
        },
        environ={},
    )


def _register(api: httpx.Client, down: WebhookReceiver) -> None:
    customers = ["acme", "globex", "initech", "umbrella"]
    for n, platform in enumerate(["luma", "suno", "midjourney", "kling", "video", "replicate"]):
        ids = [f"{platform}-{n}{k:02d}" for k in range(6)] + [f"{platform}-fail-{n}"]
        api.post(
            "/v1/tasks",
            json={"platform": platform, "ids": ids, "metadata": {"customer": customers[n % 4]}},
        ).raise_for_status()
    api.post(
        "/v1/tasks",
        json={
            "platform": "luma",
            "ids": ["luma-lost-7"],
            "webhook_url": down.url,
            "metadata": {"customer": "globex", "prompt": "a cat dancing"},
        },
    ).raise_for_status()


def main() -> int:
    """Run the scene and save overview, tasks, task and deliveries pages as PNGs."""
    missing = browser.available()
    if missing is not None:
        print(f"headless Chromium {missing}", file=sys.stderr)  # noqa: T201 - a script's answer
        return 1
    with (
        tempfile.TemporaryDirectory() as tmp,
        SimulatedRelay(step=0.4) as relay,
        WebhookReceiver() as receiver,
        WebhookReceiver() as down,
    ):
        down.default = Reply(status=503, body=b"maintenance")
        relay.fail_next("http_500", 2)
        settings = _settings(relay, receiver, Path(tmp) / "tracker.db")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with (
            DaemonThread(settings, notifier=sdnotify.Notifier("/nonexistent/notify")) as daemon,
            httpx.Client(base_url=daemon.api_url, headers=auth) as api,
            browser.chromium() as chrome,
        ):
            _register(api, down)
            time.sleep(6)  # the relay's scripts run to their end; the lost webhook dies
            base = daemon.api_url
            chrome.get(f"{base}/ui/login")
            chrome.find_element(By.ID, "token").send_keys(TOKEN)
            chrome.find_element(By.CSS_SELECTOR, "form.signin button").click()
            chrome.get(f"{base}/ui/")
            chrome.save_screenshot(str(HERE / "overview.png"))
            chrome.get(f"{base}/ui/tasks?q=globex")
            chrome.save_screenshot(str(HERE / "tasks.png"))
            chrome.get(f"{base}/ui/tasks/luma/luma-lost-7")
            chrome.save_screenshot(str(HERE / "task.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
