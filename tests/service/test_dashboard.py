"""The dashboard in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``,
``scripts/system_deps.sh``) driven by Selenium against the running service of ``live_service``.

Checks what a user sees: the login form, the job list, a finished job (settings, attempts, the
loss curve with one point per logged step, the report's fidelity table, every artifact downloading
with the manifest's sha256) and a running job whose curve grows while it trains. Screenshots go to
``test-artifacts/screenshots/`` (their paths are printed).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .live import ROOT, tiny_job, wait_for

pytestmark = pytest.mark.slow
SHOTS = ROOT / "test-artifacts" / "screenshots"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--window-size=1280,2400"]


def _chromium() -> tuple[str, str]:
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):  # scripts/test.sh runs scripts/system_deps.sh; try it here too (root or passwordless sudo)
        subprocess.run(["bash", str(ROOT / "scripts" / "system_deps.sh")], capture_output=True, timeout=600)
        found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        pytest.skip("chromium/chromedriver absent and scripts/system_deps.sh could not install them "
                    "(apt-get install chromium chromium-driver needs root)")
    return found


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra: pip install -e .[dev]")
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in FLAGS:
        options.add_argument(flag)
    downloads = tmp_path_factory.mktemp("downloads")
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def shot(driver, name: str) -> Path:
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def by_css(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def attr(driver, css: str, name: str) -> str | None:
    found = by_css(driver, css)
    return found[0].get_attribute(name) if found else None


def login(driver, base: str, key: str) -> None:
    driver.get(f"{base}/")
    wait_for(lambda: by_css(driver, "#login:not([hidden])"), 20, "the login form")
    shot(driver, "01-login")  # what a new user sees first
    by_css(driver, "#key")[0].send_keys(key)
    by_css(driver, "#login-form button")[0].click()
    wait_for(lambda: by_css(driver, "#jobs:not([hidden])"), 20, "the job list")
    assert key not in driver.current_url


def metrics(stack, job_id: str) -> list[dict]:
    return [e for e in stack.events(job_id, type="metrics") if "loss" in e["data"]]


def test_dashboard_lists_jobs_shows_a_finished_job_and_its_downloads(live_service, finished_job, browser):
    stack, driver, job_id = live_service, browser, finished_job["id"]
    login(driver, stack.base, stack.key)
    wait_for(lambda: by_css(driver, f'tr[data-job="{job_id}"]'), 20, "the finished job in the list")
    row = by_css(driver, f'tr[data-job="{job_id}"]')[0].text
    assert "succeeded" in row and "4/4" in row and stack.model[-20:] in row
    shot(driver, "02-jobs")

    driver.get(f"{stack.base}/ui/jobs/{job_id}")
    wait_for(lambda: attr(driver, "body", "data-loaded") == "final", 30, "the finished job page")
    wait_for(lambda: by_css(driver, "#fidelity tbody tr"), 20, "the report")
    assert attr(driver, "#loss-chart", "data-points") == str(len(metrics(stack, job_id))) == "4"
    assert attr(driver, "#loss-chart", "data-lr-points") == "4"
    assert len(by_css(driver, "#loss-chart circle.loss-point")) == 4
    evals = stack.events(job_id, type="eval")  # the held-out loss during training: a second curve
    assert evals and attr(driver, "#loss-chart", "data-eval-points") == str(len(evals))
    assert len(by_css(driver, "#loss-chart circle.eval-point")) == len(evals)
    assert by_css(driver, '#settings tr[data-setting="r"]')[0].text.split() == ["r", "8"]
    assert "recipe" in by_css(driver, "#attempts tbody")[0].text and "ok" in by_css(driver, "#attempts tbody")[0].text
    models = [r.get_attribute("data-model") for r in by_css(driver, "#fidelity tbody tr")]
    assert models[:2] == ["base", "fine_tuned"] and "gguf_f16" in models, models
    assert len(by_css(driver, "#events tbody tr")) == len(stack.events(job_id))
    fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert fetched and all(url.startswith(stack.base + "/") for url in fetched), fetched  # nothing from elsewhere
    shot(driver, "03-job-finished")

    manifest = stack.http.get(f"/jobs/{job_id}/artifacts").json()
    links = by_css(driver, "a.download")
    assert [link.get_attribute("data-name") for link in links] == [a["name"] for a in manifest]
    for artifact, link in zip(manifest, links):
        for old in driver.downloads.iterdir():
            old.unlink()
        link.click()
        done = wait_for(lambda: [p for p in driver.downloads.iterdir() if not p.name.endswith(".crdownload")]
                        and link.get_attribute("data-downloaded") == "true", 60, f"{artifact['name']} to download")
        assert done
        (path,) = [p for p in driver.downloads.iterdir()]
        assert path.name == Path(artifact["name"]).name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == artifact["sha256"], artifact["name"]
        assert "sha256 verified" in link.find_element("xpath", "..").text
    assert stack.key not in (driver.current_url + "".join(a.get_attribute("href") for a in links))


def test_a_running_job_draws_its_curve_live_and_another_tenant_sees_404(live_service, finished_job, browser):
    stack, driver = live_service, browser
    job = stack.submit(tiny_job(stack, stack.dataset_id, max_steps=300, save_steps=1000))
    try:
        wait_for(lambda: (stack.job(job["id"])["step"] or 0) >= 2, 180, "the job's second step")
        driver.get(f"{stack.base}/ui/jobs/{job['id']}")  # logged in by the previous test (sessionStorage)
        wait_for(lambda: attr(driver, "body", "data-loaded") == "live"
                 and int(attr(driver, "#loss-chart", "data-points") or 0) >= 2, 30, "the live page")
        first = int(attr(driver, "#loss-chart", "data-points"))
        wait_for(lambda: int(attr(driver, "#loss-chart", "data-points")) >= first + 2, 60, "the curve to grow")
        assert "running" in by_css(driver, "#status")[0].text
        assert not by_css(driver, "#cancel")[0].get_attribute("hidden")
        shot(driver, "04-job-running")
        by_css(driver, "#cancel")[0].click()  # the page's own button (confirm() accepted)
        driver.switch_to.alert.accept()
        wait_for(lambda: attr(driver, "body", "data-loaded") == "final", 120, "the page to see the job end")
        assert "cancelled" in by_css(driver, "#status")[0].text
        points = int(attr(driver, "#loss-chart", "data-points"))
        assert points == len(metrics(stack, job["id"])) > first
    finally:
        stack.http.post(f"/jobs/{job['id']}/cancel")

    driver.execute_script("sessionStorage.setItem('trinity.api_key', arguments[0])", stack.other_key)
    driver.get(f"{stack.base}/ui/jobs/{job['id']}")
    wait_for(lambda: attr(driver, "body", "data-loaded") == "not-found", 20, "another tenant's view")
    assert "not found" in by_css(driver, "#error")[0].text and by_css(driver, "#job")[0].get_attribute("hidden")
    driver.get(f"{stack.base}/ui")
    wait_for(lambda: by_css(driver, "#empty:not([hidden])"), 20, "the intruder's empty list")
    shot(driver, "05-other-tenant-empty")
    assert not by_css(driver, f'tr[data-job="{job["id"]}"]')

    driver.execute_script("sessionStorage.clear()")  # a job's link opened without a key: log in, land on the job
    driver.get(f"{stack.base}/ui/jobs/{job['id']}")
    wait_for(lambda: by_css(driver, "#login:not([hidden])"), 20, "the login form")
    by_css(driver, "#key")[0].send_keys(stack.key)
    by_css(driver, "#login-form button")[0].click()
    wait_for(lambda: attr(driver, "body", "data-loaded") == "final", 30, "the job page after logging in")
    assert driver.current_url == f"{stack.base}/ui/jobs/{job['id']}"
    driver.execute_script("sessionStorage.clear()")
