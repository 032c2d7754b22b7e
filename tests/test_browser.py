"""The app in headless Chromium: run an example query and check that every view of the result appears.

Screenshots of each tab are saved under assets/ for the README.
"""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from test_app import MAX_NEW_TOKENS, REPO_ROOT, start_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
EXAMPLE = "What is the chemistry of baking soda in a cake?"
ASSETS = REPO_ROOT / "assets"
RUN_TIMEOUT_MS = 300_000
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                     "(`make browser-deps` installs it)"),
]


@pytest.fixture(scope="module")
def app_url(request, tmp_path_factory) -> str:
    return start_app(request, tmp_path_factory.mktemp("browser-app"))


@pytest.fixture
def page(app_url):
    sync_api = pytest.importorskip("playwright.sync_api")
    outside_requests: list[str] = []

    def keep_on_loopback(route) -> None:
        if urlparse(route.request.url).hostname in LOOPBACK_HOSTS:
            route.continue_()
        else:
            outside_requests.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as playwright:
        # executable_path points at the system browser, so Playwright never downloads one
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.route("**/*", keep_on_loopback)
        page.goto(app_url)
        page.wait_for_selector("#query textarea", timeout=60_000)
        yield page
        browser.close()
    assert not outside_requests, f"the page requested other hosts: {outside_requests}"


def set_max_new_tokens(page, count: int) -> None:
    number_box = page.locator("#max-new-tokens input[type=number]")
    number_box.fill(str(count))
    number_box.press("Enter")


def run_until_answered(page) -> float:
    """Press Run and wait for the status line of a finished request; return the seconds it took."""
    started = time.monotonic()
    page.locator("#run").click()
    page.wait_for_function("document.querySelector('#status')?.innerText.startsWith('Answered')",
                           timeout=RUN_TIMEOUT_MS)
    return time.monotonic() - started


def test_example_query_shows_all_views(page):
    from playwright.sync_api import expect

    page.get_by_text(EXAMPLE, exact=True).click()
    expect(page.locator("#query textarea")).to_have_value(EXAMPLE)
    set_max_new_tokens(page, MAX_NEW_TOKENS)
    run_until_answered(page)

    assert page.locator("#answer textarea").input_value().strip()
    assert page.locator("#base-answer textarea").input_value().strip()
    assert page.locator("#adapter-table table").count() >= 1
    assert page.locator("#weight-plot .js-plotly-plot").count() == 1
    assert page.locator("#error-plot .js-plotly-plot").count() == 1
    assert page.locator("#token-heatmap .moa-token").count() >= 1
    assert page.locator("#timeline .moa-iteration").count() >= 1
    page.wait_for_timeout(2000)  # the attribution and library views update after the answer
    ASSETS.mkdir(exist_ok=True)
    page.screenshot(path=ASSETS / "screenshot_query.png", full_page=True)

    page.get_by_role("tab", name="Attribution").click()
    page.wait_for_timeout(1000)
    page.screenshot(path=ASSETS / "screenshot_attribution.png", full_page=True)

    page.get_by_role("tab", name="Library").click()
    page.locator("#key-map").wait_for()
    page.wait_for_timeout(1000)
    assert page.locator("#library-table table").count() >= 1
    page.screenshot(path=ASSETS / "screenshot_library.png", full_page=True)


def test_stop_button_frees_model(page):
    from playwright.sync_api import expect

    page.locator("#query textarea").fill(EXAMPLE)
    set_max_new_tokens(page, MAX_NEW_TOKENS)
    alone_seconds = run_until_answered(page)

    page.locator("#query textarea").fill("Count from 1 to 500, separated by commas.")
    set_max_new_tokens(page, 400)
    page.locator("#run").click()
    # stop at the first streamed characters: a routed expert may keep the whole answer short
    page.wait_for_function("document.querySelector('#answer textarea')?.value.length > 0", timeout=RUN_TIMEOUT_MS)
    page.locator("#stop").click()
    expect(page.locator("#status")).to_contain_text("Stopped", timeout=RUN_TIMEOUT_MS)

    page.locator("#query textarea").fill(EXAMPLE)
    set_max_new_tokens(page, MAX_NEW_TOKENS)
    waited = run_until_answered(page)
    # the stopped request would otherwise keep the model for the rest of its 400 tokens
    assert waited < 2 * alone_seconds + 10, f"waited {waited:.1f} s; alone the request took {alone_seconds:.1f} s"


def test_about_tab_draws_loop_diagram(page):
    page.get_by_role("tab", name="About").click()
    page.locator("#about-diagram svg").wait_for(timeout=30_000)
    assert page.locator("#about-diagram svg rect").count() >= 6
    page.screenshot(path=ASSETS / "screenshot_about.png", full_page=True)
