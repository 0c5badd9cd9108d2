"""Debian's Chromium, headless, driven by Playwright: the ``browser`` fixture of the browser tests.

A plugin of the root ``conftest.py``, so every browser test module shares one launcher.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

import playwright.sync_api as playwright_api
import pytest

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextlib.contextmanager
def chromium() -> Iterator[playwright_api.Browser]:
    """A browser for a module's tests; missing Chromium fails loudly instead of skipping."""
    path = shutil.which("chromium")
    assert path, "Debian's chromium is required for the browser tests (apt-get install chromium)"
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[playwright_api.Browser]:
    with chromium() as launched:
        yield launched
