"""Render the built site's main pages with headless Chromium into PNGs, to look at them as a reader.

Run by hand after ``make docs`` (not in CI; needs Chromium: ``apt-get install chromium``)::

    .venv/bin/python scripts/screenshot_docs.py          # -> out/screenshots/*.png
    .venv/bin/python scripts/screenshot_docs.py --only api   # the shots whose name contains "api"

Each shot opens a page of ``site/`` (offline, from disk) in a window 1536 pixels wide (a laptop screen) and as tall
as the page, and cuts it into 1600-pixel tiles (``NAME-1.png``, ...; pillow, from the test extra),
small enough to look at one by one: tables, plots, code blocks and the API reference.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: name -> (page of the site, height in pixels to render: the page's length or less)
SHOTS = {
    "home": ("index.html", 5200),
    "cli": ("cli.html", 9000),
    "folded": ("folded.html", 1800),
    "folded-deployment": ("folded_deployment.html", 5000),
    "unfold": ("unfold.html", 9000),
    "errors": ("errors.html", 1400),
    "conventions": ("conventions.html", 2600),
    "estimators": ("estimators.html", 1800),
    "testing": ("testing.html", 3000),
    "guarantees": ("guarantees.html", 4200),
    "performance": ("performance.html", 20000),
    "conformance": ("conformance.html", 6000),
    "experiments": ("experiments/index.html", 4000),
    "experiment-shift": ("experiments/domain_shift.html", 3200),
    "experiment-conv": ("experiments/conv_shift.html", 3600),
    "layout": ("layout.html", 4200),
    "porting": ("porting.html", 3000),
    "api-bnref": ("api/bnref.html", 24000),
    "api-testing": ("api/testing.html", 10000),
    "api-conventions": ("api/conventions.html", 6000),
    "api-runtime": ("api/runtime.html", 6000),
    "api-onnx_tools": ("api/onnx_tools.html", 40000),
}
TILE = 1600  # each PNG is one WIDTH x 1600 tile of the page, top to bottom
WIDTH = 1536  # a common laptop screen (1920 at 125 %)


def chromium() -> str:
    """The Chromium executable, or exit with a hint."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    sys.exit("screenshot_docs: no chromium on PATH (apt-get install chromium)")


def shoot(browser: str, site: Path, out: Path, name: str, page: str, height: int) -> list[Path]:
    """``page`` rendered in a WIDTH x ``height`` window, cut into tiles ``NAME-1.png``, ..."""
    from PIL import Image  # pillow: the test extra

    png = out / f"{name}.full.png"
    url = (site / page).resolve().as_uri()
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=4000",
         f"--window-size={WIDTH},{height}", f"--screenshot={png}", url],
        check=True, capture_output=True, timeout=300,
    )
    tiles = []
    with Image.open(png) as full:
        for i, top in enumerate(range(0, full.height, TILE), start=1):
            box = full.crop((0, top, full.width, min(top + TILE, full.height)))
            if box.convert("L").getextrema()[0] == 255:
                break  # the page ended above: only white left
            tiles.append(out / f"{name}-{i}.png")
            box.save(tiles[-1])
    png.unlink()
    return tiles


def main(argv: list[str] | None = None) -> int:
    """Take the shots (``--only TEXT``: those whose name contains TEXT)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", type=Path, default=ROOT / "site")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "screenshots")
    ap.add_argument("--only", default="")
    args = ap.parse_args(argv)
    if not (args.site / "index.html").exists():
        sys.exit(f"screenshot_docs: no built site at {args.site} (make docs)")
    args.out.mkdir(parents=True, exist_ok=True)
    browser = chromium()
    for old in args.out.glob("*.png"):
        old.unlink()
    for name, (page, height) in SHOTS.items():
        if args.only in name:
            for tile in shoot(browser, args.site, args.out, name, page, height):
                print(tile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
