"""A real server process (uvicorn): hostile requests over the wire, and the page in a real
browser (Debian's headless Chromium driven by Playwright): type a query, see the expected first
result, upload an image, click a result.

Screenshots: set HARMA_SEARCH_SCREENSHOTS=FOLDER to keep the browser's pictures (docs/img)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import free_port
from search_support import REPO

from harma.search import Searcher

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_chromium() -> str | None:
    explicit = os.environ.get("HARMA_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


@pytest.fixture(scope="module")
def server(built_index):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "harma.search", "serve", str(built_index), "--port", str(port),
                                "--max_upload_mb", "0.5", "--max_pixels", "1000000"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)
    yield url
    process.kill()
    process.wait()


def test_a_hundred_hostile_requests_get_4xx_and_the_server_keeps_serving(server):
    hostile = [
        ("GET", "/images/..%2F..%2F..%2Fetc%2Fpasswd", {}), ("GET", "/images/%2Fetc%2Fpasswd", {}),
        ("GET", "/static/..%2F..%2F__init__.py", {}), ("GET", "/images/7?index=..", {}),
        ("POST", "/api/search", {"content": b"{bad json", "headers": {"content-type": "application/json"}}),
        ("POST", "/api/search", {"content": os.urandom(600_000), "headers": {"content-type": "image/png"}}),
        ("POST", "/api/search", {"content": b"MZ\x90\x00 not an image", "headers": {"content-type": "image/png"}}),
        ("POST", "/api/search", {"json": {"text": "x", "index": "unknown"}}),
        ("GET", "/api/search?item=-5", {}), ("GET", "/api/search?text=&k=1", {}),
    ]
    with httpx.Client(base_url=server, timeout=30) as client:
        for number in range(100):
            method, path, options = hostile[number % len(hostile)]
            response = client.request(method, path, **options)
            assert 400 <= response.status_code < 500, (path, response.status_code)
            assert "error" in response.json() and "Traceback" not in response.text
        assert client.get("/api/search", params={"text": "red roofs"}).status_code == 200
        assert client.get("/api/health").json() == {"status": "ok"}


def wait_for_thumbnails(page, timeout: float = 30) -> None:
    """Until every thumbnail of the grid has loaded (a broken one fails the test)."""
    deadline = time.monotonic() + timeout
    while True:
        states = page.locator("#results img").evaluate_all(
            "images => images.map(image => [image.complete, image.naturalWidth])")
        if states and all(complete for complete, _ in states):
            assert all(width > 0 for _, width in states), "a thumbnail did not load"
            return
        assert time.monotonic() < deadline, "the thumbnails did not load"
        time.sleep(0.1)


def test_the_page_in_a_real_browser_searches_by_text_upload_and_click(server, built_index, archive):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set HARMA_CHROMIUM): the page is not checked")
    playwright_api = pytest.importorskip("playwright.sync_api")
    expect = playwright_api.expect
    shots = os.environ.get("HARMA_SEARCH_SCREENSHOTS")
    expected = Searcher.open(built_index, use_faiss=False)
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(server + "/")
            status = page.locator("#status")
            # expect() polls without evaluating strings in the page, which its policy forbids.
            expect(status).to_contain_text("Ready")

            page.fill("#query", "red roofs beside a road")
            page.press("#query", "Enter")
            expect(status).to_contain_text("red roofs")
            first = page.locator(".result").first
            assert first.get_attribute("data-id") == str(expected.search(text="red roofs beside a road")[0]["id"])
            assert page.locator(".result").count() == 10
            wait_for_thumbnails(page)
            if shots:
                page.screenshot(path=str(Path(shots) / "search-text.png"))

            upload = archive.images / "fields" / "img005.png"
            page.set_input_files("#upload", str(upload))
            expect(status).to_contain_text("results for the image img005.png")
            assert page.locator(".result").first.get_attribute("title").startswith("fields/img005.png")

            third = page.locator(".result").nth(2)
            clicked = third.get_attribute("data-id")
            third.click()
            expect(status).to_contain_text("images like")
            assert page.locator(".result").first.get_attribute("data-id") == clicked
            wait_for_thumbnails(page)
            if shots:
                page.screenshot(path=str(Path(shots) / "search-click.png"))

            page.fill("#query", " ")
            page.press("#query", "Enter")
            expect(page.locator("#status.error")).to_contain_text("Type a description")
        finally:
            browser.close()
