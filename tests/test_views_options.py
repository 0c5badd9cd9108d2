"""The options of every front as one frozen object, given once and shared."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from flask import Flask

from flask_durable_stream import DurableStream, InMemoryStreamManager, durable_stream_blueprint
from flask_durable_stream.ai_sdk import chat_blueprint
from flask_durable_stream.fronts import FrontOptions


def echo(data: Any) -> Any:
    return data


def test_options_are_frozen_and_keywords_override_them() -> None:
    base = FrontOptions(max_content_length=64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.max_content_length = 1  # type: ignore[misc]
    assert FrontOptions.of(base, {}) is base
    assert FrontOptions.of(base, {"keepalive_interval": 1.0}) == FrontOptions(
        max_content_length=64, keepalive_interval=1.0
    )
    with pytest.raises(TypeError, match="max_content_lenght"):
        FrontOptions.of(None, {"max_content_lenght": 1})


def test_one_options_object_reaches_every_flow(memory_manager: InMemoryStreamManager) -> None:
    options = FrontOptions(max_content_length=32)
    bp = durable_stream_blueprint({"echo": echo}, stream_manager=memory_manager, options=options)
    assert bp.options is options and bp.stream_manager is memory_manager
    app = Flask(__name__)
    app.register_blueprint(bp)
    client = app.test_client()
    assert client.post("/echo", json={"data": "x"}).get_json() == {"result": "x"}
    too_large = client.post("/echo", json={"data": "x" * 64})
    assert too_large.status_code == 413
    bp.runner.shutdown(5)


def test_the_extension_reads_its_options_once_for_every_flow(
    memory_manager: InMemoryStreamManager,
) -> None:
    app = Flask(__name__)
    app.config["DURABLE_STREAM_MAX_CONTENT_LENGTH"] = 32
    ext = DurableStream(app, stream_manager=memory_manager)

    @ext.flow()
    def late(data: Any) -> Any:  # routed after init_app, with the same options
        return data

    state = app.extensions["durable_stream"]
    assert state.options.max_content_length == 32
    client = app.test_client()
    assert client.post("/flows/late", json={"data": "x" * 64}).status_code == 413
    # The chat shares them too, and the app's runner (its live buffer bound stays the app's).
    chat = chat_blueprint(echo, stream_manager=memory_manager, options=state.options)
    assert chat.chat.options is state.options and chat.chat.runner is state.runner
    state.runner.shutdown(5)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), ("1", True), ("yes", True), ("off", False), ("", False)],
)
@pytest.mark.parametrize("setting", ["FLOW_IN_RESPONSE", "DETACH_RESPONSE"])
def test_the_live_response_settings_read_booleans_and_their_environment_spellings(
    memory_manager: InMemoryStreamManager, value: Any, expected: bool, setting: str
) -> None:
    app = Flask(__name__)
    app.config[f"DURABLE_STREAM_{setting}"] = value
    DurableStream(app, stream_manager=memory_manager)
    assert getattr(app.extensions["durable_stream"].options, setting.lower()) is expected


@pytest.mark.parametrize("setting", ["FLOW_IN_RESPONSE", "DETACH_RESPONSE"])
def test_the_live_response_settings_refuse_a_value_that_is_not_a_boolean(
    memory_manager: InMemoryStreamManager, setting: str
) -> None:
    app = Flask(__name__)
    app.config[f"DURABLE_STREAM_{setting}"] = "sometimes"
    with pytest.raises(ValueError, match=f"{setting} must be a boolean .*'sometimes'"):
        DurableStream(app, stream_manager=memory_manager)
