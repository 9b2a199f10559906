"""A real browser (headless Chromium, driven through chromedriver by Selenium) opens
the preview link and then the app's pages: the local process answers them, with
no header typed by anyone; a browser without the cookie gets the pod's app."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from sidecar.sessions.spec import HttpFilterSpec, SessionSpec
from tests.support import HttpApp, SidecarProcess, open_session

pytestmark = pytest.mark.timeout(120)

CHROMIUM = ("chromium", "chromedriver")


def require_chromium() -> None:
    missing = [tool for tool in CHROMIUM if shutil.which(tool) is None]
    if missing:
        reason = f"the browser test needs {', '.join(missing)} (apt-get install chromium " \
                 "chromium-driver)"  # fmt: skip
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must provide it (.ci/run installs it)")
        pytest.skip(reason)


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    """A fresh headless Chromium (its own empty profile) per use."""
    require_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = str(shutil.which("chromium"))
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking"):  # fmt: skip
        options.add_argument(flag)
    # The driver is Debian's: Selenium is given its path, so it fetches nothing.
    driver = webdriver.Chrome(options=options, service=Service(str(shutil.which("chromedriver"))))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def page(driver: webdriver.Chrome, url: str) -> dict[str, object]:
    """Open `url` and read the JSON the app or the local process answered with."""
    driver.get(url)
    out: dict[str, object] = json.loads(driver.find_element(By.TAG_NAME, "body").text)
    return out


async def test_a_browser_opens_the_link_and_then_sees_the_local_process(
    sidecar: SidecarProcess, local: HttpApp, browser: webdriver.Chrome
) -> None:
    spec = SessionSpec(http_filter=HttpFilterSpec(preview="alice"))
    async with open_session(sidecar, local.port, spec):
        base = sidecar.url
        landed = await asyncio.to_thread(page, browser, f"{base}/__offramp/preview/alice?to=/shop")
        assert landed["served_by"] == "local" and landed["path"] == "/shop", landed
        assert browser.current_url == f"{base}/shop"
        cookie = browser.get_cookie("offramp-preview")
        assert cookie is not None and cookie["value"] == "alice" and cookie["httpOnly"]
        assert cookie["sameSite"] == "Lax"
        later = await asyncio.to_thread(page, browser, f"{base}/cart")
        assert later["served_by"] == "local", later
        # The local process got the key in baggage too, to pass on.
        baggage = [v for k, v in local.seen[-1].headers if k.lower() == "baggage"]
        assert baggage == ["offramp-preview=alice"]
        cleared = await asyncio.to_thread(page, browser, f"{base}/__offramp/preview/clear?to=/cart")
        assert cleared["served_by"] == "app", cleared
