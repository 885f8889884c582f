"""Headless Chromium from the system's packages, driven by Selenium, for dashboard tests.

The browser and its driver come from Debian's ``chromium`` and ``chromium-driver``; naming
both paths keeps Selenium Manager from looking for (or downloading) anything.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

from selenium import webdriver

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: the window the screenshots are taken in
WINDOW = (1280, 1000)


def available() -> str | None:
    """None when Chromium and its driver are installed, else what is missing."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    return None if not missing else f"not installed: {', '.join(missing)}"


@contextlib.contextmanager
def chromium() -> Iterator[webdriver.Chrome]:
    """A headless Chromium session, closed on exit."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in containers, where the sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
        "--no-first-run",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER)
    )
    try:
        driver.set_page_load_timeout(20)
        yield driver
    finally:
        driver.quit()
