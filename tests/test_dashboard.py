"""The dashboard in a real browser (Debian's chromium through chromedriver and selenium):
log in, watch a study arrive, retry a quarantined job, explain a file. Screenshots are
saved as test artifacts in build/test-artifacts/."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from node import accounts
from tests.conftest import ROOT, STORESCU, dcmtk_env, make_study, needs_dcmtk, node_config, wait_until
from tests.httpnode import breakable_deid, start_http_node

CHROMIUM = shutil.which("chromium", path="/usr/bin")
CHROMEDRIVER = shutil.which("chromedriver", path="/usr/bin")
ARTIFACTS = ROOT / "build" / "test-artifacts"

pytestmark = [
    needs_dcmtk,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)"),
]


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1440,1000", f"--user-data-dir={tmp_path / 'chrome'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"dashboard-{name}.png"
    import base64

    height = driver.execute_script("return Math.min(document.documentElement.scrollHeight, 4000)")
    png = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                            "clip": {"x": 0, "y": 0, "width": 1440, "height": int(height), "scale": 1}})
    path.write_bytes(base64.b64decode(png["data"]))
    return path


def test_dashboard_login_watch_a_study_arrive_and_retry_a_quarantined_job(tmp_path, browser, monkeypatch):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    broken = breakable_deid(monkeypatch)
    raw = node_config(tmp_path, [{"name": "archive", "kind": "folder", "path": str(tmp_path / "archive")}], stable_after_s=1.0)
    raw["routes"][0]["name"] = "research"
    hn = start_http_node(raw, tmp_path)
    try:
        with hn.node.sessions() as s:
            accounts.add_user(s, "olga", "operator", "operator password 1")
            s.commit()
        port = hn.node.settings.node.port
        wait = WebDriverWait(browser, 30, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException])

        def click_first(selector: str) -> None:
            """Click the first match; the page refreshes parts of itself, so an element
            found a moment ago may have been replaced: find it again."""
            for _ in range(20):
                try:
                    browser.find_elements(By.CSS_SELECTOR, selector)[0].click()
                    return
                except StaleElementReferenceException:
                    continue
            raise AssertionError(f"could not click {selector}")

        # 1. Any page asks for a login first.
        browser.get(hn.base + "/")
        assert browser.current_url.startswith(hn.base + "/login")
        browser.find_element(By.NAME, "name").send_keys("olga")
        browser.find_element(By.NAME, "password").send_keys("wrong password")
        browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        wait.until(lambda d: "Wrong name or password" in " ".join(e.text for e in d.find_elements(By.CSS_SELECTOR, "[role=alert]")))
        browser.find_element(By.NAME, "name").clear()
        browser.find_element(By.NAME, "name").send_keys("olga")
        browser.find_element(By.NAME, "password").send_keys("operator password 1")
        browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        wait.until(lambda d: d.current_url.rstrip("/") == hn.base)
        wait.until(lambda d: "olga · operator" in d.find_element(By.TAG_NAME, "header").text)
        cookie = browser.get_cookie("casemask_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

        # 2. A study arrives while the overview is open: it appears without a reload.
        marker = browser.execute_script("window.__notReloaded = true; return 1")
        assert subprocess.run([STORESCU, "-aec", "CASEMASK", "127.0.0.1", str(port), *map(str, make_study(tmp_path / "a", 3))],
                              env=dcmtk_env(), capture_output=True, timeout=60).returncode == 0
        wait.until(lambda d: "DONE" in d.find_element(By.ID, "overview").text and d.find_elements(By.CSS_SELECTOR, "#overview a[href='/studies/1']"))
        wait.until(lambda d: "SENT 3" in d.find_element(By.ID, "overview").text)
        assert marker == 1 and browser.execute_script("return window.__notReloaded === true")
        shot(browser, "overview")

        # 3. The study's path, with previews of what the archive received.
        browser.get(hn.base + "/studies/1")
        assert "Study received" in browser.page_source and "De-identified" in browser.page_source
        wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img) for img in d.find_elements(By.CSS_SELECTOR, "img.thumb")))
        assert len(browser.find_elements(By.CSS_SELECTOR, "img.thumb")) == 3
        shot(browser, "study")

        # 4. A study that is quarantined, retried from the quarantine page once fixed.
        broken["on"] = True
        assert subprocess.run([STORESCU, "-aec", "CASEMASK", "127.0.0.1", str(port), *map(str, make_study(tmp_path / "b", 2))],
                              env=dcmtk_env(), capture_output=True, timeout=60).returncode == 0
        browser.get(hn.base + "/quarantine")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "button[name=retry]")) == 2)
        assert "headers: RuntimeError" in browser.find_element(By.ID, "quarantine").text
        shot(browser, "quarantine")
        broken["on"] = False
        click_first("button[name=retry]")
        wait.until(lambda d: "will be processed again" in " ".join(e.text for e in d.find_elements(By.CSS_SELECTOR, ".flash")))
        click_first("button[name=retry]")
        wait.until(lambda d: "Nothing is quarantined" in d.find_element(By.ID, "quarantine").text)
        wait_until(lambda: len(list((tmp_path / "archive").rglob("*.dcm"))) == 5, timeout=60, what="5 objects in the archive folder")
        shot(browser, "quarantine-retried")

        # 5. Explain a file against the routes (nothing stored), and the audit log.
        browser.get(hn.base + "/routes")
        browser.find_element(By.NAME, "file").send_keys(str(make_study(tmp_path / "c", 1)[0]))
        browser.find_element(By.CSS_SELECTOR, "form[action='/routes/explain'] button").click()
        wait.until(lambda d: "takes research" in " ".join(e.text for e in d.find_elements(By.TAG_NAME, "h4")))
        shot(browser, "routes-explain")
        browser.get(hn.base + "/audit?event=job-retried")
        rows = browser.find_elements(By.CSS_SELECTOR, "tbody tr")
        assert len(rows) == 2 and all("olga" in r.text for r in rows)
        browser.get(hn.base + "/audit")
        shot(browser, "audit")
        # An operator sees the configuration but cannot change it.
        browser.get(hn.base + "/config")
        assert not browser.find_elements(By.CSS_SELECTOR, "textarea[name=text]")
        # Browser logs: no script error, nothing blocked by the content security policy.
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "/login - " not in e["message"]]  # the refused login answers 401
        assert not errors, errors
    finally:
        hn.node.stop()
