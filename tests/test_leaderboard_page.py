"""The leaderboard page in headless Chromium (Debian's chromium, driven by Playwright without a browser
download): the plots render, the table is there, the console stays clean; a screenshot is kept."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.test_leaderboard import _fill
from tinytitan.report.html import write_html
from tinytitan.report.leaderboard import build

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; `make browser` does it)")


def test_page_renders_in_headless_chromium(tmp_path) -> None:
    exe = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    _fill(tmp_path / "r.sqlite")
    page_file = tmp_path / "board.html"
    write_html(build(tmp_path / "r.sqlite", "m"), page_file)
    errors: list[str] = []
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=exe,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_file.as_uri())
            page.wait_for_selector("#pareto-size .main-svg", timeout=20_000)
            points = page.locator("#pareto-size .scatterlayer .point").count()
            rows = page.locator("#leaderboard tbody tr").count()
            header = page.locator("#leaderboard thead").inner_text()
            assert page.locator("#pareto-speed .main-svg").count() >= 1
            page.screenshot(path=str(ARTIFACTS / "leaderboard.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert rows == 6 and points == 6  # every variant in the table and on the plot
    assert "quality/size" in header and "KLD" in header
    assert (ARTIFACTS / "leaderboard.png").stat().st_size > 10_000
