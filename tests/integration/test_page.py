"""The rollout page (`GET /` on canaryctl's admin port) in a real browser: Debian's chromium, headless, driven by
selenium through Debian's chromedriver. During a rollout, after a rollback and after a promotion it shows what
`canaryctl rollout status --json` says; its buttons pause, resume, abort and promote, each after a confirmation
that can be declined; the token typed into it never appears in an address, the page or canaryctl's log.
Screenshots are kept in target/test-artifacts/rollout-page/ (TEST_ARTIFACTS to put them elsewhere)."""

import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from harness import Traffic
from lab import ROOT, eventually
from test_rollout import CLUSTERS, NOT_ABOUT_LATENCY, config, fleet

TOKEN = "page-test-token-5d2c91"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SHOTS = os.path.join(os.environ.get("TEST_ARTIFACTS") or os.path.join(ROOT, "target", "test-artifacts"),
                     "rollout-page")


@pytest.fixture
def browser():
    """A headless chromium (flags that keep it off this machine's closed network), quit after the test."""
    profile = tempfile.mkdtemp(prefix="chromium-test-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,2400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver, name: str):
    os.makedirs(SHOTS, exist_ok=True)
    driver.save_screenshot(os.path.join(SHOTS, name))


def status_json(server) -> dict:
    """`canaryctl rollout status web --json`, as a user runs it."""
    shown = server.run("rollout", "status", "web", "--json", token=TOKEN)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    (web,) = json.loads(shown.stdout)
    return web


# The page redraws its tables every 2 s: each read is one script, so no element goes stale under it.
def texts(driver, selector: str) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)",
                                 selector)


def attributes(driver, selector: str, name: str) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.getAttribute(arguments[1]))", selector, name)


def field(driver, name: str) -> str:
    (text,) = texts(driver, f'#rollout [data-field="{name}"]')
    return text


def cells(driver, selector: str) -> list[str]:
    return texts(driver, selector + " td")


def settles(check, deadline_s: float = 10):
    """Polls `check()` (which asserts) until it passes; past the deadline, its last assertion fails the test."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def page_phase(driver, phase: str, deadline_s: float = 20):
    eventually(lambda: field(driver, "phase") == phase, deadline_s=deadline_s, interval_s=0.2,
               what=f"the page showing {phase}")


def sign_in(driver, server):
    driver.get(server.server + "/")
    WebDriverWait(driver, 10).until(expected_conditions.visibility_of_element_located((By.ID, "token")))
    # A wrong token is refused, and the page says so.
    driver.find_element(By.ID, "token").send_keys("not-the-token")
    driver.find_element(By.ID, "sign-in").click()
    eventually(lambda: driver.find_element(By.ID, "login-error").text == "That token was refused.",
               deadline_s=10, what="the wrong token refused")
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.ID, "sign-in").click()
    WebDriverWait(driver, 10).until(expected_conditions.visibility_of_element_located((By.ID, "rollout")))


def click(driver, op: str, accept: bool):
    """Clicks a rollout button and answers its confirmation."""
    driver.find_element(By.CSS_SELECTOR, f'.actions button[data-op="{op}"]').click()
    alert = WebDriverWait(driver, 5).until(expected_conditions.alert_is_present())
    assert "rollout web" in alert.text, alert.text
    if accept:
        alert.accept()
    else:
        alert.dismiss()


def shows(cell: str, bad: int, requests: int, rate: float):
    """A test's cell, "13 / 429 (3.03%)": the counts exactly, the rate as JSON's to its two decimals (the browser
    rounds an exact tie up, Python and Rust to even: 1.625 shows 1.63 or 1.62)."""
    counts, shown = cell.split(" (")
    assert counts == f"{bad} / {requests}", (cell, bad, requests)
    assert abs(float(shown.rstrip("%)")) - rate * 100) <= 0.005 + 1e-9, (cell, rate)


def shows_evidence(cell: str, value: float):
    """Evidence as `rollout status` prints it (72.1, or 3.4e12), to its last digit, ties either way."""
    digits = cell.split("e")
    step = 0.05 if len(digits) == 1 else 0.05 * 10 ** int(digits[1])
    assert abs(float(cell) - value) <= step + 1e-9 * abs(value), (cell, value)


def same_as_status(driver, web: dict):
    """The page shows what `rollout status --json` says (of a rollout that no longer moves)."""
    for name in ("rollout", "canary", "stable", "phase", "step_name", "percent"):
        assert field(driver, name) == str(web[name]), (name, field(driver, name), web[name])
    assert field(driver, "reason") == "Why: " + web["reason"]
    e = web["evidence"]["errors"]
    name, canary, stable, value, threshold = cells(driver, 'tr[data-test="errors"]')
    assert name == "errors"
    shows(canary, e["canary_errors"], e["canary_requests"], e["canary_rate"])
    shows(stable, e["stable_errors"], e["stable_requests"], e["stable_rate"])
    shows_evidence(value, e["e_value"])
    shows_evidence(threshold, e["threshold"])
    for check in web["latency"]["checks"]:
        _, canary, stable, value, threshold = cells(driver, f'tr[data-test="latency_{check["slower_than_us"]}"]')
        shows(canary, check["canary_slow"], check["canary_requests"], check["canary_rate"])
        shows(stable, check["stable_slow"], check["stable_requests"], check["stable_rate"])
        shows_evidence(value, check["e_value"])
        shows_evidence(threshold, check["threshold"])
    assert attributes(driver, "#findings tbody tr", "data-signature") == \
        [f'{s["origin"]} {s["signature"]}' for s in web["findings"]["signatures"]]
    assert texts(driver, "#history li .what") == [h["what"] for h in reversed(web["history"])]
    steps = texts(driver, "#timeline li")
    assert steps == [f'{i + 1}. {s}' + ("" if s == "pause" else "%") for i, s in enumerate(web["steps"])]


def charts_drawn(driver) -> bool:
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll('img[data-chart]')];"
        "return imgs.length === 4 && imgs.every(i => i.complete && i.naturalWidth > 0)")


def no_secret_anywhere(driver, server):
    """The token is in no address the page asked for, not in the page, not in canaryctl's log."""
    addresses = driver.execute_script(
        "return [location.href].concat(performance.getEntriesByType('resource').map(e => e.name))")
    assert len(addresses) > 5, addresses
    assert all(TOKEN not in a for a in addresses), addresses
    assert any("/v1/rollouts/chart?rollout=web&chart=" in a for a in addresses), addresses
    assert TOKEN not in driver.page_source
    assert TOKEN not in server.log()


def test_the_page_shows_a_rollout_as_rollout_status_does_and_pauses_resumes_and_aborts_it(
        start_envoy, canaryctl, browser):
    server = canaryctl(config(), token=TOKEN)
    envoys = fleet(start_envoy, server, 1)
    with Traffic(envoys[0], clients=3):
        started = server.run("rollout", "start", "web", "--canary", "v2", *CLUSTERS, *NOT_ABOUT_LATENCY,
                             "--steps", "20,50,100", "--hold", "5m", token=TOKEN)
        assert started.returncode == 0, started.stdout + started.stderr
        sign_in(browser, server)
        # During the rollout: the same step, and counts between two readings of `rollout status --json` taken
        # around the page's.
        eventually(lambda: status_json(server)["evidence"]["errors"]["canary_requests"] > 0, deadline_s=20,
                   what="canary requests counted")
        page_phase(browser, "progressing")

        def between() -> bool:
            before = status_json(server)
            shown = cells(browser, 'tr[data-test="errors"]')
            after = status_json(server)
            canary = int(shown[1].split(" / ")[1].split(" ")[0])
            stable = int(shown[2].split(" / ")[1].split(" ")[0])
            e0, e1 = before["evidence"]["errors"], after["evidence"]["errors"]
            return (e0["canary_requests"] <= canary <= e1["canary_requests"]
                    and e0["stable_requests"] <= stable <= e1["stable_requests"] and canary > 0)
        eventually(between, deadline_s=20, interval_s=0.5, what="the page's counts within rollout status's")
        web = status_json(server)
        for name in ("rollout", "canary", "stable", "phase", "step_name", "percent"):
            assert field(browser, name) == str(web[name]), name
        assert field(browser, "split") == "v1 80%, v2 20%"
        # The fleet: the Envoy, connected, on the desired version.
        desired = server.status()["desired"]["version"]
        eventually(lambda: cells(browser, '#fleet tr[data-node="front-1"]')[2:4] == ["connected", str(desired)],
                   deadline_s=10, what="front-1 in the fleet table")
        eventually(lambda: charts_drawn(browser), deadline_s=15, what="the four charts drawn")
        screenshot(browser, "1-progressing.png")

        # Pause, declined then confirmed.
        click(browser, "pause", accept=False)
        assert status_json(server)["phase"] == "progressing"
        click(browser, "pause", accept=True)
        page_phase(browser, "paused")
        assert status_json(server)["phase"] == "paused"
        eventually(lambda: "paused by an operator at step 1/3 (20%)" in texts(browser, "#history li .what"),
                   deadline_s=5, what="the pause in the page's history")
        # Resume.
        click(browser, "resume", accept=True)
        page_phase(browser, "progressing")
        assert status_json(server)["phase"] == "progressing"
        # Abort: rolled back, the canary at 0 % for every Envoy.
        click(browser, "abort", accept=True)
        page_phase(browser, "rolled_back")
        web = status_json(server)
        assert web["phase"] == "rolled_back" and web["reason"].startswith("aborted by an operator"), web["reason"]
        settles(lambda: same_as_status(browser, status_json(server)))
        assert all(d is not None for d in attributes(browser, ".actions button", "disabled"))
        # The split as pushed: the canary at 0 % (the step it ended at still reads 20 %).
        assert field(browser, "split") == "v1 100%, v2 0%" and field(browser, "percent") == "20"
        eventually(lambda: charts_drawn(browser), deadline_s=15, what="the charts after the rollback")
        screenshot(browser, "2-rolled-back.png")
    no_secret_anywhere(browser, server)
    # Without the token, the data and the charts stay closed; the page itself holds none.
    for path in ("/v1/rollouts", "/v1/rollouts/chart?rollout=web&chart=errors"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(server.server + path)
        assert refused.value.code == 401
    with urllib.request.urlopen(server.server + "/") as r:
        assert "default-src 'none'" in r.headers["content-security-policy"]
        assert "web" not in r.read().decode().split("<body>")[1].split("data-field")[0]


def test_the_page_promotes_at_a_gate_and_then_shows_what_rollout_status_says(start_envoy, canaryctl, browser):
    server = canaryctl(config(), token=TOKEN)
    envoys = fleet(start_envoy, server, 1)
    with Traffic(envoys[0], clients=3):
        started = server.run("rollout", "start", "web", "--canary", "v2", *CLUSTERS, *NOT_ABOUT_LATENCY,
                             "--steps", "20,pause,100", "--hold", "3s", "--min-canary-requests", "20",
                             token=TOKEN)
        assert started.returncode == 0, started.stdout + started.stderr
        sign_in(browser, server)
        page_phase(browser, "paused", deadline_s=60)
        assert field(browser, "step_name") == "step 2/3 (pause)"
        classes = attributes(browser, "#timeline li", "class")
        assert classes == ["passed", "current paused", None], classes
        # Pause is off while paused; promote, declined, changes nothing.
        assert browser.find_element(By.CSS_SELECTOR, '.actions button[data-op="pause"]').get_attribute("disabled")
        click(browser, "promote", accept=False)
        assert status_json(server)["phase"] == "paused"
        click(browser, "promote", accept=True)
        page_phase(browser, "promoted")
        web = status_json(server)
        assert web["phase"] == "promoted" and web["reason"] == "promoted by an operator at step 2/3 (pause)", web
        desired = server.status()["desired"]["config"]["rollouts"][0]
        assert desired["stable"] == "v2", desired
        settles(lambda: same_as_status(browser, status_json(server)))
        assert field(browser, "split") == "v2 100%, v1 0%"
        eventually(lambda: charts_drawn(browser), deadline_s=15, what="the charts after the promotion")
        screenshot(browser, "3-promoted.png")
    no_secret_anywhere(browser, server)
