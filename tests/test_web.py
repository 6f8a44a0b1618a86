"""The web page in a real browser (Debian chromium driven by Playwright, no browser download):
upload a reference, describe a change, see results, click one to refine, see new results."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest_serving import demo_catalog, running_server
from fashion_cir.retrieval import build_index
from fashion_cir.serving.app import create_app

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

if not CHROMIUM.is_file():  # a missing browser fails the run (`make test` installs it), never skips
    raise RuntimeError("Debian chromium is not installed at /usr/bin/chromium: apt-get install -y chromium "
                       "(make test does this when run as root)")


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("web") / "index"
    build_index(folder, tiny_model, *demo_catalog(tmp_path_factory.mktemp("catalog"), 60), progress=False)
    with running_server(create_app(folder, tiny_model)) as url:
        yield url


@pytest.fixture()
def page(base_url):
    from playwright import sync_api
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 960})
            page.set_default_timeout(15_000)
            yield page
        finally:
            browser.close()


def test_upload_search_and_refine(page, base_url, tmp_path):
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(base_url)
    page.wait_for_selector("#catalog-grid .item img")
    assert page.locator("#catalog-grid .item").count() == 48
    assert "60 items" in page.inner_text("#status")

    # turn 1: an uploaded reference (a catalog photo saved under another name)
    first = page.locator("#catalog-grid .item").first
    upload = tmp_path / "my-photo.jpg"
    upload.write_bytes(page.request.get(base_url + first.locator("img").get_attribute("src")).body())
    page.set_input_files("#upload-input", str(upload))
    assert "my-photo.jpg" in page.inner_text("#reference-caption")
    page.fill("#change-text", "is red with long sleeves")
    page.click("#search-btn")
    page.wait_for_selector("#results-grid .item")
    assert page.locator("#results-grid .item").count() == 24
    assert "is red with long sleeves" in page.inner_text("#results-summary")
    first_results = page.locator("#results-grid .item").evaluate_all("cards => cards.map(c => c.dataset.id)")

    # turn 2: click a result to make it the reference, then refine
    chosen = page.locator("#results-grid .item").nth(2)
    chosen_id = chosen.get_attribute("data-id")
    chosen.click()
    assert page.get_attribute("#reference-img", "src").endswith(f"/images/{chosen_id}")
    page.fill("#change-text", "is shorter and darker")
    page.click("#search-btn")
    page.wait_for_function("document.querySelectorAll('#history li img').length === 2")
    page.wait_for_function("document.querySelector('#results-summary').innerText.includes('is shorter and darker')")
    second_results = page.locator("#results-grid .item").evaluate_all("cards => cards.map(c => c.dataset.id)")
    assert len(second_results) == 24 and chosen_id not in second_results
    assert second_results != first_results
    assert page.locator("#results-grid .item .score").first.inner_text().startswith("0.")

    # a query without text is explained on the page, not sent
    page.fill("#change-text", "")
    page.click("#search-btn")
    assert "Describe the change" in page.inner_text("#error")
    page.fill("#change-text", "is shorter and darker")
    page.evaluate("document.getElementById('error').hidden = true")
    page.evaluate("window.scrollTo(0, 0)")

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web.png"))
    assert errors == []
