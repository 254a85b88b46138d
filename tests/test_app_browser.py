"""The web page end to end in a real headless browser: Debian's Chromium (/usr/bin/chromium, installed by
`make install`) driven by Playwright. The page loads, a prompt is typed, Generate clicked on a tiny model; the
gallery's images have the requested size, captions carry their parameters, progress and errors show.

Requests to anything but the page's own server are aborted (`ldm.app.browser.chromium_page`): the page must
not depend on web fonts or CDNs.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import pytest
from PIL import Image
from test_app import build_tiny_model

from ldm.app.browser import CHROMIUM, chromium_page, free_port, generate, set_number

if not Path(CHROMIUM).is_file():
    pytest.skip(
        f"{CHROMIUM} not found: `make install` installs Debian's chromium (apt-get install chromium)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(Playwright page, url, the Requests the page sent) of the app serving a tiny txt2img model on a free
    localhost port."""
    from ldm.app import Session
    from ldm.app.page import build_page, launch

    root = tmp_path_factory.mktemp("app_browser")
    session = Session.from_file(build_tiny_model(root), device="cpu", out_dir=root / "out")
    requests, generate_ = [], session.generate
    session.generate = lambda request, on_step=None: requests.append(request) or generate_(request, on_step)
    demo = build_page(session)
    port = free_port()
    launch(demo, session, port=port, block=False)
    try:
        with chromium_page(root / "chromium-profile", f"http://127.0.0.1:{port}/") as page:
            yield page, f"http://127.0.0.1:{port}/", requests
    finally:
        demo.close()


def test_generate_shows_images_of_the_requested_size(app):
    page, url, _ = app
    sizes = generate(page, url, "a red circle", n=2, steps=3, seed=4, height=24, width=40)
    assert sizes == [[40, 24], [40, 24]]  # naturalWidth x naturalHeight of the gallery's <img>s
    captions = page.locator("#gallery").inner_text()
    assert "seed 4 · ddim · 3 steps · cfg 5.0 — a red circle" in captions
    assert "seed 5 · ddim · 3 steps · cfg 5.0 — a red circle" in captions
    assert re.search(r"2 image\(s\) of 40×24 in [\d.]+ s", page.locator("#summary").inner_text())
    href = page.locator("#download a[href$='.zip']").first.get_attribute("href")
    with zipfile.ZipFile(io.BytesIO(page.request.get(urljoin(url, href)).body())) as z:  # the download
        assert sorted(Path(n).name for n in z.namelist()) == [
            "0000_seed4.png",
            "0001_seed5.png",
            "grid.png",
            "run.json",
        ]


def test_progress_then_errors_show_on_the_page(app):
    page, url, _ = app
    page.goto(url, wait_until="networkidle")
    page.locator("#prompt textarea").fill("a blue square")
    for elem_id, value in {"n": 8, "steps": 100, "height": 32, "width": 32}.items():
        set_number(page, elem_id, value)
    page.locator("#generate").click()  # 2 batches x 100 steps: long enough to see the bar move
    # gradio's bar over the outputs, fed by the sampler's step callback: "<done>/200 steps", "sampling - x%"
    texts = page.wait_for_function(
        """() => { const t = [...document.querySelectorAll('.progress-text, .progress-level')]
                              .map(e => e.textContent);
                   return t.some(s => /[1-9][0-9]*[/]200 steps/.test(s)) && t; }""",
        timeout=30_000,
    ).json_value()
    done = [int(m) for t in texts for m in re.findall(r"(\d+)/200 steps", t)]
    assert done and all(0 < d <= 200 for d in done), texts
    assert any("sampling" in t for t in texts), texts
    page.wait_for_function("() => document.querySelectorAll('#gallery img').length === 8", timeout=60_000)

    page.locator("#prompt textarea").fill("")
    page.locator("#generate").click()
    toast = page.get_by_text("The prompt is empty: type what to draw (txt2img needs a prompt).")
    toast.first.wait_for(timeout=15_000)
    assert toast.first.is_visible()


def test_inpaint_with_a_mask_painted_in_the_editor(app, tmp_path):
    page, url, requests = app
    yy, xx = np.mgrid[:256, :256]
    image = np.stack([xx, yy, np.full_like(xx, 128)], -1).astype(np.uint8)  # a colour ramp
    Image.fromarray(image).save(tmp_path / "photo.png")
    page.goto(url, wait_until="networkidle")
    page.locator("#task label", has_text="inpaint").click()
    with page.expect_file_chooser() as chooser:
        page.locator("#image").get_by_text("Upload an image").click()
    chooser.value.set_files(tmp_path / "photo.png")
    page.locator("#image button[aria-label='Brush']").click()
    box = page.locator("#image canvas").first.bounding_box()
    page.wait_for_timeout(500)  # the background is drawn
    page.mouse.move(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.55, box["y"] + box["height"] * 0.3, steps=3)
    page.mouse.up()
    page.locator("#prompt textarea").fill("a blue square")
    for elem_id, value in {"n": 1, "steps": 2, "height": 0, "width": 0}.items():  # 0: the image's size
        set_number(page, elem_id, value)
    page.locator("#generate").click()
    page.wait_for_function(
        "() => { const i = document.querySelector('#gallery img'); return i && i.naturalWidth > 0; }",
        timeout=60_000,
    )
    request = requests[-1]
    assert request.task == "inpaint" and np.array_equal(np.asarray(request.image), image)  # the upload, exact
    painted = np.asarray(request.mask) > 0
    assert request.mask.size == (256, 256) and 0.005 < painted.mean() < 0.3, painted.mean()  # one stroke
    rows = np.flatnonzero(painted.any(1))
    src = page.eval_on_selector("#gallery img", "i => i.src")
    result = np.asarray(Image.open(io.BytesIO(page.request.get(src).body())))
    assert result.shape == (256, 256, 3)
    below = rows.max() + 16  # rows well below the stroke keep the uploaded pixels exactly
    assert below < 256 and np.array_equal(result[below:], image[below:])
    assert not np.array_equal(result[rows.min() : rows.max() + 1], image[rows.min() : rows.max() + 1])
