"""The dashboard in headless Chromium, on a running daemon with the simulated relay."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import base_config, merge, wait_until
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.wait import WebDriverWait

from tracker import config, sdnotify
from tracker.app import Daemon
from tracker.testing import browser
from tracker.testing.receiver import Reply, WebhookReceiver
from tracker.testing.running import DaemonThread
from tracker.testing.simulator import SimulatedRelay

pytestmark = pytest.mark.browser

TOKEN = "test-token"


def arrive(chrome: webdriver.Chrome, url: str) -> None:
    """Wait for the browser to land on ``url`` (a click's navigation may still be going)."""
    WebDriverWait(chrome, 10).until(expected_conditions.url_to_be(url))


def heading(chrome: webdriver.Chrome, text: str) -> None:
    """Wait for the page's h1 to read ``text`` (the page a click leads to may still load)."""
    located = (By.TAG_NAME, "h1")
    # Read while the old page is being replaced, the h1 may belong to neither document:
    # Chromium then answers a bare WebDriverException, not a stale element. Looked at again.
    WebDriverWait(chrome, 10, ignored_exceptions=(WebDriverException,)).until(
        expected_conditions.text_to_be_present_in_element(located, text)
    )


@pytest.fixture(name="down")
def _down() -> Iterator[WebhookReceiver]:
    """A receiver that answers 500 until told otherwise."""
    with WebhookReceiver() as receiver:
        receiver.default = Reply(status=500, body=b"receiver is down")
        yield receiver


@pytest.fixture(name="daemon")
def _daemon(relay: SimulatedRelay, receiver: WebhookReceiver, sqlite_url: str) -> Iterator[Daemon]:
    """A daemon serving the dashboard, polling fast, giving up on a webhook quickly."""
    document = merge(
        base_config(relay.base_url, receiver.url, sqlite_url),
        {
            "poll": {"interval": 0.2, "max_interval": 1},
            "webhooks": {"retry_delays": [0.05, 0.05]},
        },
    )
    settings = config.parse(document, environ={})
    with DaemonThread(settings, notifier=sdnotify.Notifier("/nonexistent/notify")) as daemon:
        yield daemon


@pytest.fixture(name="chrome")
def _chrome() -> Iterator[webdriver.Chrome]:
    """Headless Chromium (conftest skips these tests, or fails them in CI, without it)."""
    with browser.chromium() as driver:
        yield driver


def test_an_operator_finds_a_task_sees_its_timeline_and_replays_a_dead_webhook(
    daemon: Daemon,
    down: WebhookReceiver,
    chrome: webdriver.Chrome,
    tmp_path: Path,
) -> None:
    """Sign in, search, open the task, redeliver its dead webhook: the receiver gets it."""
    # One operator's journey through the pages, read top to bottom (about 65 lines).
    base = daemon.api_url
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        api.post(
            "/v1/tasks",
            json={"platform": "luma", "ids": ["vid-ok-1"], "metadata": {"customer": "acme"}},
        ).raise_for_status()
        api.post(
            "/v1/tasks",
            json={
                "platform": "luma",
                "ids": ["vid-lost-7"],
                "webhook_url": down.url,
                "metadata": {"customer": "globex-42"},
            },
        ).raise_for_status()

        def dead() -> list[dict[str, Any]]:
            rows: list[dict[str, Any]] = api.get("/v1/deliveries?state=dead").json()["deliveries"]
            return rows

        wait_until(dead, 15, "the webhook to vid-lost-7 to die")
    shots = tmp_path / "screenshots"
    shots.mkdir()

    chrome.get(f"{base}/ui/")
    arrive(chrome, f"{base}/ui/login")
    chrome.save_screenshot(str(shots / "sign-in.png"))
    chrome.find_element(By.ID, "token").send_keys(TOKEN)
    chrome.find_element(By.CSS_SELECTOR, "form.signin button").click()
    arrive(chrome, f"{base}/ui/")
    assert "1" == chrome.find_element(By.ID, "dead-count").text
    chrome.save_screenshot(str(shots / "overview.png"))

    chrome.find_element(By.LINK_TEXT, "Tasks").click()
    heading(chrome, "Tasks")
    search = chrome.find_element(By.NAME, "q")
    search.send_keys("globex")
    search.submit()
    arrive(chrome, f"{base}/ui/tasks?platform=&status=&q=globex")
    rows = chrome.find_elements(By.CSS_SELECTOR, "#task-list tbody tr")
    assert ["vid-lost-7"] == [r.find_element(By.CSS_SELECTOR, "td a").text for r in rows]
    chrome.save_screenshot(str(shots / "tasks.png"))
    chrome.find_element(By.LINK_TEXT, "vid-lost-7").click()
    heading(chrome, "vid-lost-7")

    timeline = [li.text for li in chrome.find_elements(By.CSS_SELECTOR, "#timeline li")]
    assert "registered as pending" in timeline[0]
    assert any("→ completed" in step for step in timeline)
    assert "dead" in chrome.find_element(By.CSS_SELECTOR, ".delivery .state").text
    chrome.save_screenshot(str(shots / "task.png"))

    down.default = Reply(status=204)
    arrived = down.count
    chrome.find_element(By.CSS_SELECTOR, ".delivery a.button").click()
    heading(chrome, "Redeliver this webhook?")
    chrome.find_element(By.CSS_SELECTOR, "form button.danger").click()
    heading(chrome, "Queued again")
    assert "queued again" in chrome.find_element(By.CSS_SELECTOR, ".done").text
    down.wait_for(arrived + 1, timeout=10)
    assert 204 == down.received[-1].status
    assert down.received[-1].json()["data"]["task_id"] == "vid-lost-7"


def test_without_a_session_or_with_a_forged_csrf_token_nothing_happens(
    daemon: Daemon, down: WebhookReceiver, chrome: webdriver.Chrome
) -> None:
    """A confirm form posted with a forged CSRF token is refused; without a session, too."""
    base = daemon.api_url
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        api.post(
            "/v1/tasks",
            json={"platform": "luma", "ids": ["vid-forged-1"], "webhook_url": down.url},
        ).raise_for_status()
        delivery = wait_until(
            lambda: api.get("/v1/deliveries?state=dead").json()["deliveries"], 15, "a dead webhook"
        )[0]["id"]
    down.default = Reply(status=204)
    arrived = down.count

    chrome.get(f"{base}/ui/deliveries")
    arrive(chrome, f"{base}/ui/login")
    chrome.find_element(By.ID, "token").send_keys(TOKEN)
    chrome.find_element(By.CSS_SELECTOR, "form.signin button").click()
    arrive(chrome, f"{base}/ui/")

    chrome.get(f"{base}/ui/deliveries/{delivery}/redeliver")
    heading(chrome, "Redeliver this webhook?")
    chrome.execute_script(
        "document.querySelector('main form input[name=csrf]').value = 'forged-token'"
    )  # a page elsewhere cannot read the real one
    chrome.find_element(By.CSS_SELECTOR, "form button.danger").click()
    heading(chrome, "Refused")

    chrome.get(f"{base}/ui/deliveries/{delivery}/redeliver")
    chrome.delete_all_cookies()
    chrome.find_element(By.CSS_SELECTOR, "form button.danger").click()
    arrive(chrome, f"{base}/ui/login")

    time.sleep(1.5)  # two delivery ticks: a queued redelivery would have gone out by now
    assert arrived == down.count


def _dead_webhook(base: str, down: WebhookReceiver, task_id: str) -> int:
    """Register ``task_id`` with its webhook to ``down``; the id of the delivery once dead."""
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        api.post(
            "/v1/tasks", json={"platform": "luma", "ids": [task_id], "webhook_url": down.url}
        ).raise_for_status()
        found: int = wait_until(
            lambda: api.get("/v1/deliveries?state=dead").json()["deliveries"], 15, "a dead webhook"
        )[0]["id"]
    return found


def _sign_in_here(chrome: webdriver.Chrome, base: str) -> None:
    chrome.find_element(By.ID, "token").send_keys(TOKEN)
    chrome.find_element(By.CSS_SELECTOR, "form.signin button").click()
    arrive(chrome, f"{base}/ui/")


def test_reloading_the_redeliver_result_page_sends_nothing_again(
    daemon: Daemon, down: WebhookReceiver, chrome: webdriver.Chrome
) -> None:
    """After Redeliver, the browser is on a result page of its own (a GET): reloading it
    shows the result again and the receiver gets the webhook only once."""
    base = daemon.api_url
    delivery = _dead_webhook(base, down, "vid-reload-1")
    down.default = Reply(status=204)
    arrived = down.count
    chrome.get(f"{base}/ui/login")
    _sign_in_here(chrome, base)

    chrome.get(f"{base}/ui/deliveries/{delivery}/redeliver")
    heading(chrome, "Redeliver this webhook?")
    chrome.find_element(By.CSS_SELECTOR, "form button.danger").click()
    heading(chrome, "Queued again")
    assert chrome.current_url.startswith(f"{base}/ui/done?")
    down.wait_for(arrived + 1, timeout=10)
    chrome.refresh()
    heading(chrome, "Queued again")

    assert (
        f"Delivery {delivery} is queued again" in chrome.find_element(By.CSS_SELECTOR, ".done").text
    )
    time.sleep(1.5)  # two delivery ticks: a queued redelivery would have gone out by now
    assert arrived + 1 == down.count


def test_two_sign_in_tabs_both_sign_in_and_a_stale_sign_out_says_to_reload(
    daemon: Daemon, chrome: webdriver.Chrome
) -> None:
    """Two tabs open the sign-in form; each signs in with the right token. The first tab's
    Sign out, from before the second sign-in, is refused with a page that says to reload;
    its link leads to a page whose Sign out works."""
    base = daemon.api_url
    chrome.get(f"{base}/ui/login")
    first = chrome.current_window_handle
    chrome.switch_to.new_window("tab")
    chrome.get(f"{base}/ui/login")
    second = chrome.current_window_handle

    chrome.switch_to.window(first)
    _sign_in_here(chrome, base)
    chrome.switch_to.window(second)
    _sign_in_here(chrome, base)
    chrome.switch_to.window(first)
    chrome.find_element(By.CSS_SELECTOR, "form.signout button").click()
    heading(chrome, "Refused")

    assert "Reload the page and try again." in chrome.find_element(By.CSS_SELECTOR, "main").text
    chrome.find_element(By.ID, "again").click()
    arrive(chrome, f"{base}/ui/")
    chrome.find_element(By.CSS_SELECTOR, "form.signout button").click()
    arrive(chrome, f"{base}/ui/login")
