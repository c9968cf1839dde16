"""The public page in a real browser: headless Chromium (Debian's chromium and chromium-driver,
installed by scripts/test) driven by Selenium, against a gateway on the devnet that has served
paid calls — the models, a model's upstreams with live figures, the rankings, no script error,
and text from the catalogue shown as text."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from conftest import gateway_settings
from support import ServerThread, wait_receipt
from tollway import stats
from tollway.app import create_app
from tollway.client import AllowedAsset, Payer, SyncPayingTransport
from tollway.config import ModelPrice

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
HOSTILE_NAME = "<img src=x onerror=\"document.title='pwned'\">Echo"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = Options()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium")
    for flag in (
        "--headless=new",
        "--no-sandbox",  # (the suite may run as root)
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",  # (this machine has no internet: no calls home)
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def served(devnet, chain, upstream, tmp_path_factory):
    """A gateway that has served a few paid calls (live figures count them at once)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stats, "LAG", 0.0)
        settings = gateway_settings(devnet, upstream.url + "/v1", tmp_path_factory.mktemp("page") / "l.sqlite3")
        models = dict(settings.models)
        models["mock/echo"] = models["mock/echo"].model_copy(update={"name": HOSTILE_NAME, "max_tokens": 4096})
        models["mock/echo-large"] = ModelPrice(prompt=Decimal("0.00001"), completion=Decimal("0.00003"))
        settings = settings.model_copy(update={"models": models, "stats_refresh_seconds": 0.1})
        with ServerThread(create_app(settings)) as gw:
            payer = Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
            with httpx.Client(transport=SyncPayingTransport(payer), base_url=gw.url, timeout=30) as http:
                for model in ("mock/echo", "mock/echo", "mock/echo-large"):
                    body = {"model": model, "messages": [{"role": "user", "content": "page"}], "max_tokens": 8}
                    r = http.post("/v1/chat/completions", json=body)
                    assert r.status_code == 200, r.text
                    wait_receipt(gw.url, r.headers["x-tollway-receipt"])
            yield gw


def rows(driver, table: str) -> list[list[str]]:
    return [
        [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        for tr in driver.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")
    ]


def test_the_page_shows_models_upstreams_and_rankings(served, browser):
    r = httpx.get(served.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]

    browser.get(served.url + "/")
    wait = WebDriverWait(browser, 15)
    wait.until(lambda d: len(rows(d, "models")) == 2)
    models = {r[0]: r for r in rows(browser, "models")}
    echo = next(r for name, r in models.items() if "(mock/echo)" in name)
    assert echo[0] == HOSTILE_NAME + " (mock/echo)"  # shown as text, not markup
    assert echo[1:] == ["$1.00", "$2.00", "$0.10", "—", "4,096"]
    assert models["mock/echo-large"][1:3] == ["$10.00", "$30.00"]
    assert not browser.find_elements(By.CSS_SELECTOR, "#models img") and browser.title != "pwned"

    browser.find_element(By.CSS_SELECTOR, 'tr[data-model="mock/echo"]').click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#endpoints tr[data-upstream="default"]'))
    wait.until(lambda d: rows(d, "endpoints")[0][8] == "2")  # (the figures refresh every 10 s at most)
    upstream, status, up5, _, _, latency, throughput, added, calls, _ = rows(browser, "endpoints")[0]
    assert (upstream, status, up5, calls) == ("default", "ok", "100%", "2")
    assert latency.endswith("ms") and "/" in latency and throughput.endswith("tok/s") and added.endswith(" ms")
    assert browser.find_element(By.ID, "endpoints-model").text == "mock/echo"

    day = rows(browser, "rankings-day")
    assert [(r[0], r[1], r[2]) for r in day] == [("1", "mock/echo", "2"), ("2", "mock/echo-large", "1")]  # by tokens
    assert "exact on eip155:" in browser.find_element(By.ID, "payment").text
    assert browser.find_element(By.ID, "status").text.startswith("Serving · 2 models")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
