"""The merchandising console in a real browser, against a real API and a real Redis.

The API runs under uvicorn on a free loopback port with the REES46 model trained by the
`trained_rees46` fixture and an admin key; Debian's headless chromium drives the page
through the system chromedriver (scripts/services.sh installs both). A browser, Redis or
API that cannot start fails the test: nothing here is skipped. Every wait is an explicit
Selenium wait on what the page shows, never a sleep or a timing assertion.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import uvicorn
from pydantic import SecretStr
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from devstack.local_services import LocalServer, free_port, redis_server
from railtower.settings import load_settings
from serving import console
from serving.app import create_app
from serving.impressions import day_key, items_without_impressions
from serving.service import RailService
from towers.session_features import HistoryEvent

pytestmark = pytest.mark.integration

ADMIN_KEY = "console-test-key-0123456789"
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = Path("/usr/bin/chromium")
# Real REES46 sessions' items (phones, earbuds): the first one is the one the page previews.
SESSIONS = {
    "console-1": [("1005115", "view"), ("1004767", "view"), ("1005105", "cart")],
    "console-2": [("4804056", "view"), ("1004767", "view")],
    "console-3": [("1005105", "view"), ("1005115", "cart"), ("4804056", "view")],
}
WAIT_S = 60  # the longest any explicit wait holds before the test fails


class _Api:
    """The app under uvicorn in a thread of this process, so the test can seed its Redis."""

    def __init__(self, app, port: int) -> None:  # type: ignore[no-untyped-def]
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="console-api", daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> _Api:
        self.thread.start()
        deadline = time.monotonic() + WAIT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                pytest.fail(f"the API did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    port = free_port()
    server: LocalServer = redis_server(port, tmp_path_factory.mktemp("redis")).start()
    yield f"redis://127.0.0.1:{port}/0"
    server.stop()


@pytest.fixture(scope="module")
def api(trained_rees46, redis_url) -> Iterator[tuple[_Api, RailService]]:
    settings, bundle = trained_rees46
    serving = settings.serving.model_copy(
        update={"bundle": bundle, "redis_url": redis_url, "triton_url": None}
    )
    security = settings.security.model_copy(update={"admin_api_key": SecretStr(ADMIN_KEY)})
    settings = settings.model_copy(update={"serving": serving, "security": security})
    app = create_app(settings)
    service: RailService = app.state.service
    for session_id, events in SESSIONS.items():
        service.store.append_events(
            session_id,
            [
                (f"{session_id}-{k}", HistoryEvent(item, kind, 1569890000.0 + 60 * k), "desktop")
                for k, (item, kind) in enumerate(events)
            ],
        )
    server = _Api(app, free_port()).start()
    yield server, service
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    if not CHROMEDRIVER.exists() or not CHROMIUM.exists():
        pytest.fail("chromium or chromedriver missing: run `bash scripts/services.sh install`")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a driver
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,2200")
    options.add_argument("--lang=en-US")  # prices read 1,234.56 as the assertions expect
    try:
        driver = webdriver.Chrome(
            service=Service(executable_path=str(CHROMEDRIVER)), options=options
        )
    except WebDriverException as exc:
        pytest.fail(f"headless chromium did not start: {exc.msg}")
    screenshots().mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def screenshots() -> Path:
    """Where the page screenshots go: the run's reports folder, inside this run's pytest
    folder (tests/conftest.py), e.g. /tmp/pytest-of-<user>/pytest-<n>/reports/screenshots."""
    return load_settings().reports_dir / "screenshots"


def _wait(driver: WebDriver) -> WebDriverWait:
    return WebDriverWait(driver, WAIT_S)


def _open(driver: WebDriver, url: str) -> None:
    """Open the console and, if it asks, give it the admin key (kept in sessionStorage)."""
    driver.get(url + "/console")
    # The page decides after its first API call: ask for the key, or load the rules with it.
    _wait(driver).until(
        lambda d: (
            d.find_element(By.ID, "key-panel").is_displayed()
            or d.find_element(By.ID, "rules-text").get_attribute("value")
        )
    )
    if driver.find_element(By.ID, "key-panel").is_displayed():
        driver.find_element(By.ID, "api-key").send_keys(ADMIN_KEY)
        driver.find_element(By.ID, "save-key").click()
    # the served rule set lands in the editor once the key is accepted
    _wait(driver).until(lambda d: d.find_element(By.ID, "rules-text").get_attribute("value"))


def _rail_ids(driver: WebDriver, rail: str) -> list[str]:
    items = driver.find_elements(By.CSS_SELECTOR, f"#rail-{rail} li.item")
    return [i.get_attribute("data-item-id") for i in items]


def _preview(driver: WebDriver, session_id: str) -> None:
    field = driver.find_element(By.ID, "session-id")
    field.clear()
    # the recent-session list arrives with the key; picking one fills in page and cart
    _wait(driver).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, f'#session-list option[value="{session_id}"]')
    )
    field.send_keys(session_id)
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)
    driver.find_element(By.ID, "show-rails").click()
    _wait(driver).until(
        lambda d: d.find_element(By.ID, "preview-status").text.startswith("3 of 3 rails shown")
    )


def _set_rules(driver: WebDriver, text: str) -> None:
    editor = driver.find_element(By.ID, "rules-text")
    driver.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
        editor,
        text,
    )


def _admin(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"X-API-Key": ADMIN_KEY}, timeout=120)


# ------------------------------------------------------------------------------ in the browser


def test_console_shows_the_three_rails_with_titles(api, browser):
    server, service = api
    _open(browser, server.url)
    _preview(browser, "console-1")
    # the session's last item is the product page, its carted item the cart
    assert browser.find_element(By.ID, "item-id").get_attribute("value") == "1005105"
    assert browser.find_element(By.ID, "cart").get_attribute("value") == "1005105"
    for rail in ("homepage_hero", "pdp_fbt", "cart_upsell"):
        ids = _rail_ids(browser, rail)
        assert len(ids) == 8 == len(set(ids)), rail
        shown = [
            t.text for t in browser.find_elements(By.CSS_SELECTOR, f"#rail-{rail} li.item .title")
        ]
        # REES46 has no titles: the page names items by brand and category ("Apple smartphone")
        assert shown == [console.item_view(service.loaded, i).name for i in ids], rail
        assert any(not name.startswith("Item ") for name in shown), rail
        metas = browser.find_elements(By.CSS_SELECTOR, f"#rail-{rail} li.item .meta")
        info = service.loaded.pipeline.attributes[ids[0]]
        assert metas[0].text.endswith(f"#{ids[0]}") and f"{info.price:,.2f}" in metas[0].text
    assert "1005105" not in _rail_ids(browser, "pdp_fbt")  # the page's own product is excluded
    with httpx.Client(base_url=server.url) as client:
        hero = client.post("/v1/rails/homepage_hero", json={"session_id": "console-1", "slots": 8})
    assert [i["item_id"] for i in hero.json()["items"]] == _rail_ids(browser, "homepage_hero")
    browser.save_screenshot(str(screenshots() / "console-rails.png"))


BROKEN = """{
  "name": "broken",
  "version": "1",
  "rules": [
    {"kind": "block", "brand": "noname"},
    {"kind": "boost", "brand": "samsung", "factor": 0.5}
  ]
}"""


def test_an_invalid_rule_set_is_marked_on_its_line(api, browser):
    server, _ = api
    _open(browser, server.url)
    _set_rules(browser, BROKEN)
    browser.find_element(By.ID, "check-rules").click()
    error = _wait(browser).until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, "#rules-errors li"))
    )
    assert error.text.startswith("Line 6 · rules[1].factor: a boost factor must be greater than 1")
    assert error.get_attribute("data-line") == "6"
    marked = browser.find_elements(By.CSS_SELECTOR, "#backdrop div.bad")
    assert [m.get_attribute("data-line") for m in marked] == ["6"]
    assert [g.text for g in browser.find_elements(By.CSS_SELECTOR, "#gutter div.bad")] == ["6"]
    assert "1 problem" in browser.find_element(By.ID, "rules-status").text
    browser.save_screenshot(str(screenshots() / "console-rules-error.png"))
    # the comparison checks the rule set too, and marks the same line
    browser.execute_script("document.getElementById('rules-errors').replaceChildren()")
    browser.find_element(By.ID, "compare-rules").click()
    again = _wait(browser).until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, "#rules-errors li"))
    )
    assert again.get_attribute("data-line") == "6" and "rules[1].factor" in again.text


def test_a_blocked_item_is_compared_then_published_and_leaves_the_preview(api, browser):
    server, service = api
    _open(browser, server.url)
    _preview(browser, "console-1")
    blocked = _rail_ids(browser, "homepage_hero")[0]
    with _admin(server.url) as client:
        served = client.get("/v1/console/rules/current").json()["text"]
    rules = json.loads(served)
    rules.update(name="console-test", version="2")
    rules["rules"].append({"kind": "block", "item_id": blocked, "note": "console test"})
    _set_rules(browser, json.dumps(rules, indent=2))

    browser.find_element(By.ID, "compare-rules").click()
    removed = (
        By.CSS_SELECTOR,
        f'tr[data-rail="homepage_hero"] .chip.removed[data-item-id="{blocked}"]',
    )
    _wait(browser).until(ec.visibility_of_element_located(removed))
    hero = browser.find_element(By.CSS_SELECTOR, 'tr[data-rail="homepage_hero"]')
    assert not re.search(r"(?<![\d.])0\.0%", hero.text)  # some slots change ("50.0%" does)
    assert "console-test@2" in browser.find_element(By.ID, "compare-result").text
    browser.save_screenshot(str(screenshots() / "console-compare.png"))

    try:
        browser.find_element(By.ID, "publish-rules").click()
        _wait(browser).until(ec.alert_is_present()).accept()
        _wait(browser).until(
            lambda d: d.find_element(By.ID, "rules-status").text.startswith("Published")
        )
        _wait(browser).until(
            lambda d: (
                d.find_element(By.ID, "preview-status").text.startswith("3 of 3")
                and blocked not in _rail_ids(d, "homepage_hero")
            )
        )
        assert len(_rail_ids(browser, "homepage_hero")) == 8
        assert service.loaded.pipeline.rule_set.name == "console-test"
        browser.save_screenshot(str(screenshots() / "console-published.png"))
    finally:  # the other tests see the rule set the model was served with
        with _admin(server.url) as client:
            restored = client.post(
                "/v1/admin/rules", content=served, headers={"Content-Type": "application/json"}
            )
        # the trained model is shared by the whole session: leave no published file behind
        settings = service.settings
        shutil.rmtree(settings.artifacts_dir / "rules" / settings.serving.dataset)
        assert restored.status_code == 200, restored.text


def test_zero_impressions_panel_lists_items_nobody_saw(api, browser):
    server, service = api
    seen = ["1005115", "4804056"]
    today = day_key(datetime.now(UTC).date())
    for item in seen:
        service.store.client.hincrby(today, item, 3)
    catalogue = [str(i) for i in service.loaded.catalogue.ids]
    expected = items_without_impressions(service.store.client, catalogue, 7, datetime.now(UTC))
    _open(browser, server.url)
    days = browser.find_element(By.ID, "zero-days")
    days.clear()
    days.send_keys("7")
    browser.find_element(By.ID, "zero-load").click()
    _wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#zero-list li"))
    listed = [
        li.get_attribute("data-item-id")
        for li in browser.find_elements(By.CSS_SELECTOR, "#zero-list li")
    ]
    assert listed == expected[:300]
    assert not set(seen) & set(listed)
    status = browser.find_element(By.ID, "zero-status").text
    assert status.startswith(f"{len(expected)} of {len(catalogue)} catalogue items")
    first = browser.find_element(By.CSS_SELECTOR, "#zero-list li")
    assert first.text.splitlines()[0] == console.item_view(service.loaded, listed[0]).name
    browser.execute_script("document.getElementById('zero').scrollIntoView()")
    browser.save_screenshot(str(screenshots() / "console-zero.png"))


# ------------------------------------------------------------------------------ the routes


def test_admin_routes_refuse_a_missing_or_wrong_key(api):
    server, _ = api
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.get("/console").status_code == 200
        assert client.get("/v1/console/features").json()["validate"] is True
        for key in (None, "wrong-key-wrong-key-wrong"):
            headers = {} if key is None else {"X-API-Key": key}
            for method, path in (
                ("GET", "/v1/console/sessions"),
                ("GET", "/v1/console/rules/current"),
                ("GET", "/v1/console/zero-impressions?days=7"),
                ("POST", "/v1/console/rules/compare"),
            ):
                body = {"rules_text": "{}"} if method == "POST" else None
                answer = client.request(method, path, headers=headers, json=body)
                assert answer.status_code in (401, 403), (path, key, answer.text)


def test_compare_reports_problems_by_line_and_never_reads_a_file(api):
    server, _ = api
    with _admin(server.url) as client:
        path = client.post("/v1/console/rules/compare", json={"rules_text": "/etc/passwd"})
        assert path.status_code == 422
        assert path.json()["errors"][0]["line"] == 1 and "root" not in path.text
        broken = client.post("/v1/console/rules/compare", json={"rules_text": BROKEN})
        assert broken.status_code == 422
        assert broken.json() == {
            "valid": False,
            "errors": [
                {
                    "line": 6,
                    "field": "rules[1].factor",
                    "why": broken.json()["errors"][0]["why"],
                }
            ],
        }
        sessions = client.post(
            "/v1/console/rules/compare",
            json={"rules_text": '{"name": "none", "version": "0"}', "session_ids": ["nobody"]},
        ).json()
    assert {"session_id": "nobody", "why": "no events of catalogue items"} in sessions["skipped"]
    assert {"console-1", "console-2", "console-3"} <= set(sessions["sessions"])
    assert [r["rail"] for r in sessions["rails"]] == ["homepage_hero", "pdp_fbt", "cart_upsell"]


def test_image_route_serves_only_catalogue_image_files(api, tmp_path):
    server, service = api
    picture = tmp_path / "phone.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32)
    items = service.loaded.rails.items
    column = items["image_path"] if "image_path" in items.columns else None
    items["image_path"] = None
    items.loc[items["item_id"].astype(str) == "1005115", "image_path"] = str(picture)
    items.loc[items["item_id"].astype(str) == "1004767", "image_path"] = "/etc/passwd"
    console._IMAGES.clear()  # the route indexes the catalogue's image paths once per frame
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            ok = client.get("/v1/console/items/1005115/image")
            assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
            assert ok.content == picture.read_bytes()
            assert client.get("/v1/console/items/1004767/image").status_code == 404
            assert client.get("/v1/console/items/1005105/image").status_code == 404
            unknown = client.get("/v1/console/items/..%2F..%2Fetc%2Fpasswd/image")
            assert unknown.status_code == 404
            info = client.get("/v1/console/items?ids=1005115,1004767,no-such").json()
        assert {i["item_id"]: i["has_image"] for i in info["items"]} == {
            "1005115": True,
            "1004767": False,
        }
        assert info["unknown"] == ["no-such"]
    finally:
        if column is None:
            del items["image_path"]
        else:
            items["image_path"] = column
        console._IMAGES.clear()
