"""Render the demo's HTML report with headless Chromium, check it is not blank, save a small PNG of it.

    python benchmarks/report_screenshot.py                               # runs the quick demo in a temporary folder
    python benchmarks/report_screenshot.py --report runs/demo/report.html

Writes benchmarks/results/report_screenshot.png (256 colours, blank margin cropped). Needs Chromium and Pillow.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from turnover_hf import report  # noqa: E402
from turnover_hf.files import atomic_path  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", help="an existing report.html (default: run the quick demo)")
    parser.add_argument("--output", default=os.path.join(RESULTS, "report_screenshot.png"))
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=3200, help="window height; blank space below is cropped")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="report-screenshot-") as tmp:
        page = args.report
        if page is None:
            from turnover_hf import demo

            demo.main(["--quick", "--output-dir", tmp])
            page = os.path.join(tmp, "report.html")
        shot = report.screenshot(page, os.path.join(tmp, "shot.png"), width=args.width, height=args.height)
        with Image.open(shot) as image:
            rgb = image.convert("RGB")
    pixels = np.asarray(rgb, dtype=float)
    inked = np.nonzero((pixels.min(-1) < 245).any(1))[0]
    if pixels.std() < 20 or len(inked) == 0:
        raise SystemExit(f"the screenshot looks blank (pixel std {pixels.std():.1f}); the report did not render")
    bottom = min(rgb.height, int(inked[-1]) + 24)
    small = rgb.crop((0, 0, rgb.width, bottom)).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    with atomic_path(args.output) as tmp_png:
        small.save(tmp_png, format="PNG", optimize=True)
    print(f"{args.output}: {small.width} x {small.height} px, {os.path.getsize(args.output) / 1024:.0f} KiB, "
          f"pixel std {pixels.std():.1f}, {100 * (pixels.min(-1) < 200).mean():.1f}% inked")


if __name__ == "__main__":
    main()
