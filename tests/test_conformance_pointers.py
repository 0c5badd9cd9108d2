"""The pointer part of the StreamManager contract, over every backend.

A pointer names "the current stream" of something that outlives one stream (a
chat's active answer), so any worker can find it; its clear is conditional, so a
stream that ends late never removes the pointer of the stream that replaced it.
"""

from __future__ import annotations

import uuid

import pytest

from flask_durable_stream import StreamManager


def new_id() -> str:
    return uuid.uuid4().hex


def test_set_get_replace_and_conditional_clear(manager: StreamManager) -> None:
    key = f"chat.{new_id()}"
    assert manager.get_pointer(key) is None
    assert manager.clear_pointer(key, "nothing") is False

    first, second = new_id(), new_id()
    manager.set_pointer(key, first)
    assert manager.get_pointer(key) == first
    manager.set_pointer(key, second)  # a new answer replaces the active one
    assert manager.get_pointer(key) == second

    assert manager.clear_pointer(key, first) is False  # the old stream ends late
    assert manager.get_pointer(key) == second
    assert manager.clear_pointer(key, second) is True
    assert manager.get_pointer(key) is None
    assert manager.clear_pointer(key, second) is False  # once

    manager.set_pointer(key, first)  # a cleared key can be set again
    assert manager.get_pointer(key) == first


def test_pointers_are_independent(manager: StreamManager) -> None:
    a, b = f"chat.{new_id()}", f"chat-{new_id()}"
    sid_a, sid_b = new_id(), new_id()
    manager.set_pointer(a, sid_a)
    manager.set_pointer(b, sid_b)
    assert (manager.get_pointer(a), manager.get_pointer(b)) == (sid_a, sid_b)
    assert manager.clear_pointer(b, sid_a) is False  # another key's stream
    assert manager.clear_pointer(a, sid_a) is True
    assert (manager.get_pointer(a), manager.get_pointer(b)) == (None, sid_b)


def test_pointer_keys_follow_the_stream_id_rules(manager: StreamManager) -> None:
    for bad in ("", "a/b", "../x", "x" * 129, "sp ace"):
        with pytest.raises(ValueError):
            manager.set_pointer(bad, new_id())
        with pytest.raises(ValueError):
            manager.get_pointer(bad)
