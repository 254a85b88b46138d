"""Drive the page in a real headless browser (Debian's Chromium through Playwright): the end-to-end test and
scripts/app_screenshot.py use this. Playwright is a dev dependency (never `playwright install`: the system
Chromium is used); nothing outside the page's own server is fetched (other requests are aborted).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def chromium_page(
    user_data_dir: str | Path, server: str, viewport: tuple[int, int] = (1280, 900)
) -> Iterator[Any]:
    """A Playwright page in a fresh headless Chromium profile at `user_data_dir`; requests to hosts other
    than `server`'s (e.g. web fonts, CDNs) are aborted, so the page must work offline."""
    from playwright.sync_api import sync_playwright

    host = urlparse(server).hostname
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(user_data_dir),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": viewport[0], "height": viewport[1]},
        )
        context.route(
            "**/*",
            lambda route: (
                route.continue_()
                if urlparse(route.request.url).hostname in (host, None)
                or route.request.url.startswith("data:")
                else route.abort()
            ),
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def set_number(page: Any, elem_id: str, value: float) -> None:
    """Type `value` into a gradio Number / Slider (its number box) and leave the box so gradio reads it."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def generate(
    page: Any, url: str, prompt: str, timeout_s: float = 60, **numbers: float
) -> list[tuple[int, int]]:
    """Open `url`, type `prompt`, set number fields by elem_id (height=, width=, n=, steps=, seed=), click
    Generate and wait for the gallery; returns each gallery image's (naturalWidth, naturalHeight)."""
    page.goto(url, wait_until="networkidle", timeout=timeout_s * 1000)
    page.locator("#prompt textarea").fill(prompt)
    for elem_id, value in numbers.items():
        set_number(page, elem_id, value)
    page.locator("#generate").click()
    page.wait_for_function(
        """() => { const imgs = [...document.querySelectorAll('#gallery img')];
                   return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }""",
        timeout=timeout_s * 1000,
    )
    return page.eval_on_selector_all(
        "#gallery img", "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])"
    )
