"""The example page in headless Chromium: reload mid-stream, the whole story still arrives."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser

from example_app import DEFAULT_TOPIC, story_words
from tests.support import servers

TOPIC = "whales in the deep"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    server = servers.example_app(servers.sqlite_env(tmp_path_factory))
    yield server
    server.stop()


def test_reload_mid_stream_shows_the_whole_story(
    server: servers.Server, browser: Browser, tmp_path_factory: pytest.TempPathFactory
) -> None:
    shot_dir = tmp_path_factory.mktemp("screenshots")
    page = browser.new_page()
    failed: list[str] = []
    page.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)
    page.goto(server.url + "/")
    page.fill("#topic", TOPIC)
    page.click("#start")
    assert page.is_disabled("#start")  # one story at a time in the box
    page.wait_for_function("document.getElementById('story').textContent.split(' ').length > 8")
    stream_id = page.evaluate("sessionStorage.getItem('durable-story-stream-id')")
    assert stream_id and len(stream_id) == 32
    before = page.text_content("#story")
    page.reload()
    assert page.input_value("#topic") == TOPIC  # kept across the reload
    page.wait_for_selector("#story[data-done='true']", timeout=60_000)
    story = page.text_content("#story") or ""
    status = page.text_content("#status") or ""
    assert before and story.startswith(before)  # the replay begins with what was shown before
    expected = story_words(TOPIC)
    assert story.split() == expected and story.rstrip().endswith("The end.")
    assert TOPIC in story
    assert f"resumed {stream_id}" not in status and f"done: {len(expected)} words" in status
    assert stream_id in status
    assert page.is_enabled("#start")
    page.screenshot(path=str(shot_dir / "example-page.png"))
    assert page.evaluate("sessionStorage.getItem('durable-story-stream-id')") is None
    favicon = page.request.get(server.url + "/favicon.ico")
    assert favicon.status == 200 and favicon.headers["content-type"].startswith("image/svg+xml")
    assert failed == []
    page.close()


def test_stop_button_cancels_the_flow_on_the_server(
    server: servers.Server, browser: Browser
) -> None:
    page = browser.new_page()
    page.goto(server.url + "/")
    page.click("#start")
    page.wait_for_function("document.getElementById('story').textContent.split(' ').length > 5")
    page.click("#stop")
    page.wait_for_function(
        "document.getElementById('status').textContent.includes('CANCELLED')", timeout=60_000
    )
    assert page.text_content("#status") == "error: CANCELLED: Cancelled by client."
    words = len((page.text_content("#story") or "").split())
    assert 5 <= words < len(story_words(DEFAULT_TOPIC))
    # The page shows the error frame, then re-enables Start once the response body has ended.
    page.wait_for_function("!document.getElementById('start').disabled", timeout=60_000)
    assert page.is_disabled("#stop") and page.is_enabled("#start")
    assert page.evaluate("sessionStorage.getItem('durable-story-stream-id')") is None
    page.close()


EVENTSOURCE_SCRIPT = """
async () => {
  const started = await fetch("/flows/story", {
    method: "POST",
    headers: { "Content-Type": "application/json", "Accept": "text/event-stream" },
    body: JSON.stringify({ data: { chunks: 12, delay: 0.4 } }),
  });
  const id = started.headers.get("x-genkit-stream-id");
  started.body.cancel();  // this page only follows through EventSource
  return await new Promise((resolve, reject) => {
    const seen = { chunks: [], ids: [], opens: 0, result: null };
    const source = new EventSource("/flows/story/events?streamId=" + id);
    source.onopen = () => { seen.opens += 1; };
    source.onmessage = (e) => {
      seen.ids.push(e.lastEventId);
      seen.chunks.push(JSON.parse(e.data).index);
    };
    source.addEventListener("result", (e) => {
      seen.ids.push(e.lastEventId);
      seen.result = JSON.parse(e.data);
      source.close();
      resolve(seen);
    });
    source.addEventListener("failure", (e) => { source.close(); reject(new Error(e.data)); });
    setTimeout(() => { source.close(); reject(new Error(JSON.stringify(seen))); }, 60000);
  });
}
"""


@pytest.fixture(scope="module")
def short_lived_sse_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    env = {**servers.sqlite_env(tmp_path_factory, "eventsource")}
    env["FLASK_DURABLE_STREAM_SSE_LIFETIME"] = "0.5"  # the server closes every connection
    server = servers.example_app(env)
    yield server
    server.stop()


def test_eventsource_resumes_by_itself_with_last_event_id(
    short_lived_sse_server: servers.Server, browser: Browser
) -> None:
    page = browser.new_page()
    page.goto(short_lived_sse_server.url + "/")
    seen = page.evaluate(EVENTSOURCE_SCRIPT)
    page.close()
    # The flow ran at least 4.8 s and every connection lived 0.5 s: Chromium reconnected
    # on its own (after the 1 s the server's retry field asks for), sending
    # Last-Event-ID, and got each chunk exactly once, in order.
    assert seen["opens"] >= 2
    assert seen["chunks"] == list(range(12))
    assert seen["ids"] == [str(i) for i in range(12)] + ["12-end"]  # the end's id says so
    assert seen["result"]["words"] == 12


EVENTSOURCE_LEFT_OPEN_SCRIPT = """
async () => {
  const started = await fetch("/flows/story", {
    method: "POST",
    headers: { "Content-Type": "application/json", "Accept": "text/event-stream" },
    body: JSON.stringify({ data: { chunks: 50, delay: 0.1 } }),
  });
  const id = started.headers.get("x-genkit-stream-id");
  started.body.cancel();
  return await new Promise((resolve, reject) => {
    const seen = { chunks: 0, failures: [], ids: [], opens: 0 };
    const source = new EventSource("/flows/story/events?streamId=" + id);
    source.onopen = () => { seen.opens += 1; };
    source.onmessage = () => {
      seen.chunks += 1;
      if (seen.chunks === 2) {
        fetch("/flows/story/cancel", { method: "POST", headers: { "x-genkit-stream-id": id } });
      }
    };
    source.addEventListener("failure", (e) => {
      seen.ids.push(e.lastEventId);
      seen.failures.push(JSON.parse(e.data).status);
    });  // and left open: the browser reconnects with the end's id
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) { resolve(seen); }
    };
    setTimeout(() => { source.close(); reject(new Error(JSON.stringify(seen))); }, 60000);
  });
}
"""


def test_an_eventsource_left_open_after_the_end_stops_once_and_for_all(
    server: servers.Server, browser: Browser
) -> None:
    """A page that does not close its EventSource on ``failure``: Chromium reconnects with
    the end's id (``<seq>-end``), gets 204 and stops for good, the failure seen once. A
    plain seq there would get the stored failure again, and again."""
    page = browser.new_page()
    page.goto(server.url + "/")
    seen = page.evaluate(EVENTSOURCE_LEFT_OPEN_SCRIPT)
    page.close()
    assert seen["failures"] == ["CANCELLED"]
    assert len(seen["ids"]) == 1 and seen["ids"][0].endswith("-end")
    assert seen["chunks"] >= 2 and seen["ids"][0] == f"{seen['chunks']}-end"
    assert seen["opens"] == 1  # the reconnect got 204: no second open
