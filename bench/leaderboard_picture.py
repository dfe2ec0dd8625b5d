"""Screenshot a leaderboard page (for the README): headless Debian Chromium driven by Playwright.

python bench/leaderboard_picture.py leaderboard.html docs/leaderboard.png
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def main(page_path: str, out: str, width: int = 1400) -> int:
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        print("no Chromium found (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=exe, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(Path(page_path).resolve().as_uri())
        page.wait_for_selector("#pareto-size .main-svg", timeout=30_000)
        clip = page.locator("#pareto-speed").bounding_box()
        height = int(clip["y"] + clip["height"] + 20) if clip else 1100
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=out, clip={"x": 0, "y": 0, "width": width, "height": height})
        browser.close()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
