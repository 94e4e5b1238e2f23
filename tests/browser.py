"""Open a report in headless Chromium (Debian's chromium and chromium-driver) through selenium:
what the page logged to the console, whether every figure loaded, its text, whether a script of
the page's content ran (an alert, ``window.__pwned``), and a screenshot."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs headless Chromium: apt install chromium chromium-driver (make test installs them)",
)
#: Flags for a sandboxed machine with no network: without the networking ones Chromium keeps
#: trying to reach Google's hosts.
#: A report of tens of embedded figures can take a while to parse on a busy 2-core machine.
LOAD_SECONDS = 120
LOADED = "return document.readyState === 'complete' && [...document.images].every(i => i.complete);"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--window-size=1280,2000",
)


def open_report(report: Path, screenshot: Path) -> tuple[list[dict], dict]:
    """Console entries of SEVERE level, and {"images": n, "broken": [alt texts], "cards": n,
    "text": the page's visible text, "pwned": typeof window.__pwned, "alerts": [alert texts]}."""
    from selenium import webdriver
    from selenium.common.exceptions import UnexpectedAlertPresentException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.unhandled_prompt_behavior = "dismiss and notify"
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    alerts: list[str] = []

    def noting_alerts(call: Callable[[], object]) -> object:
        """``call()``; if an alert opened, its text is noted (Chromium dismisses it) and False returned."""
        try:
            return call()
        except UnexpectedAlertPresentException as alert:
            alerts.append(alert.alert_text)
            return False

    try:
        noting_alerts(lambda: driver.get(report.resolve().as_uri()))
        WebDriverWait(driver, LOAD_SECONDS).until(lambda d: noting_alerts(lambda: d.execute_script(LOADED)))
        page = driver.execute_script(
            "const images = [...document.images];"
            "return "
            "{images: images.length, broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),"
            " cards: document.querySelectorAll('section.card').length,"
            " text: document.body.innerText, pwned: typeof window.__pwned};"
        )
        driver.save_screenshot(str(screenshot))
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    finally:
        driver.quit()
    return errors, page | {"alerts": alerts}
