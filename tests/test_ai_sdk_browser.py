"""The example app's chat page (the AI SDK's ES modules served by the app) in headless
Chromium: reload mid-answer, and the answer continues where it was."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser

from example_app.chat import NODE_MODULES
from tests.support import servers
from tests.support.node import npm_ci
from tests.test_ai_sdk_client import answer


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    npm_ci(NODE_MODULES.parent, "ai")
    env = servers.sqlite_env(tmp_path_factory)
    server = servers.gunicorn("example_app:create_app()", workers=2, env=env)
    yield server
    server.stop()


ASSISTANT = "document.querySelector('.message.assistant')"


def test_reload_mid_answer_continues_where_it_was(
    server: servers.Server, browser: Browser, tmp_path_factory: pytest.TempPathFactory
) -> None:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url + "/chat")
    page.fill("#input", "hello from Chromium")
    page.click("#send")
    page.wait_for_function(f"{ASSISTANT} && {ASSISTANT}.textContent.split(' ').length > 8")
    before = page.text_content(".message.assistant") or ""
    assert page.text_content("#status") == "answering"
    page.reload()
    page.wait_for_selector("#messages[data-done='true']", timeout=60_000)
    texts = page.locator(".message").all_text_contents()
    assert texts == ["hello from Chromium", answer("hello from Chromium", 40)]
    assert texts[1].startswith(before)
    assert page.text_content("#status") == "done"
    page.screenshot(path=str(tmp_path_factory.mktemp("screenshots") / "chat-page.png"))

    page.reload()  # the answer is stored with the page's messages; nothing is active now
    page.wait_for_selector(".message.assistant")
    assert page.locator(".message").all_text_contents() == texts
    assert page.text_content("#status") == "idle"
    assert not errors, errors
    page.close()


def test_stop_button_stops_the_answer_on_the_server(
    server: servers.Server, browser: Browser
) -> None:
    page = browser.new_page()
    page.goto(server.url + "/chat")
    page.fill("#input", "stop")
    page.click("#send")
    page.wait_for_function(f"{ASSISTANT} && {ASSISTANT}.textContent.split(' ').length > 5")
    page.click("#stop")
    page.wait_for_selector("#messages[data-done='true']", timeout=60_000)
    text = page.text_content(".message.assistant") or ""
    full = answer("stop", 40)
    assert full.startswith(text) and len(text) < len(full)
    assert page.text_content("#status") == "done"
    assert page.is_disabled("#stop")
    page.close()
