"""Headless Chromium for tests that need a real browser (what a web page may send to the
daemon, the status page): Debian's `chromium` and `chromium-driver` (`make system-deps`),
driven by `selenium`. The network here is closed: every background fetch Chromium would make
is off, and it starts with a fresh profile.

    with chromium(tmp_path) as browser:
        browser.get(url)
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAMES = ("chromedriver",)
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--no-proxy-server")


def _which(names: tuple[str, ...]) -> str | None:
    return next((path for name in names if (path := shutil.which(name))), None)


def missing() -> str | None:
    """Why no browser can run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if _which(CHROMIUM_NAMES) is None:
        return "no chromium binary (apt-get install chromium; make system-deps)"
    if _which(DRIVER_NAMES) is None:
        return "no chromedriver (apt-get install chromium-driver; make system-deps)"
    return None


@contextmanager
def chromium(profile_parent: Path, *extra_flags: str) -> Iterator:
    """A selenium driver of headless Chromium with a new profile under `profile_parent`;
    skips the test where Chromium, its driver or selenium is missing."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(_which(CHROMIUM_NAMES))
    profile = profile_parent / "chromium-profile"
    profile.mkdir(exist_ok=True)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for driver.get_log
    for flag in (*FLAGS, f"--user-data-dir={profile}", *extra_flags):
        options.add_argument(flag)
    # The driver's path given: selenium would otherwise ask the network for one. Without the
    # tests' LD_PRELOAD of OpenBLAS: Chromium's GPU and renderer processes die of it.
    env = {name: value for name, value in os.environ.items() if name != "LD_PRELOAD"}
    driver = webdriver.Chrome(options=options, service=Service(executable_path=_which(DRIVER_NAMES), env=env))
    try:
        driver.set_script_timeout(120)
        yield driver
    finally:
        driver.quit()
