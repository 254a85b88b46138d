"""Screenshot of the sampling page after one generation (docs/app.png, for the README).

    .venv/bin/python scripts/app_screenshot.py --ckpt outputs/txt2img/latest/model.safetensors

Serves the page (`ldm.app`) on a free localhost port, opens it in Debian's headless Chromium through
Playwright (`ldm.app.browser`: no `playwright install`, no requests beyond the page's server), types the
prompt, clicks Generate, waits for the gallery and saves the page as a PNG (256 colours above --max-kb).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> Path:
    """Parse the options, generate on the page, write the screenshot; returns its path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="outputs/txt2img/latest/model.safetensors", help="model to serve")
    parser.add_argument("--prompt", default="a red circle on a blue background")
    parser.add_argument("--n", type=int, default=4, help="images to generate")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(REPO / "docs" / "app.png"))
    parser.add_argument("--max-kb", type=int, default=300, help="quantise the PNG above this size")
    args = parser.parse_args(argv)

    from PIL import Image

    from ldm.app import Session
    from ldm.app.browser import CHROMIUM, chromium_page, free_port, generate
    from ldm.app.page import build_page, launch
    from ldm.errors import UserError
    from ldm.interop.checkpoint import atomic_path

    if not Path(CHROMIUM).is_file():
        sys.exit(f"error: {CHROMIUM} not found: apt-get install chromium (make install does it)")
    with tempfile.TemporaryDirectory(prefix="ldm_app_screenshot_") as tmp:
        try:
            session = Session.from_file(args.ckpt, device=args.device, out_dir=Path(tmp) / "out")
        except UserError as e:
            sys.exit(f"error: {e}")
        demo = build_page(session)
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        launch(demo, session, port=port, block=False)
        try:
            with chromium_page(Path(tmp) / "profile", url, viewport=(1280, 1000)) as page:
                sizes = generate(page, url, args.prompt, n=args.n, steps=args.steps, seed=args.seed)
                page.mouse.move(0, 0)  # no hover effects in the picture
                png = page.screenshot(full_page=True)
        finally:
            demo.close()
    image = Image.open(io.BytesIO(png))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    if buffer.tell() > args.max_kb * 1024:
        buffer = io.BytesIO()
        image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(buffer, "PNG", optimize=True)
    out = Path(args.out)
    with atomic_path(out) as tmp_file:
        tmp_file.write_bytes(buffer.getvalue())
    print(f"{out}: {image.width}x{image.height}, {buffer.tell() / 1024:.0f} KB; gallery images {sizes}")
    return out


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
