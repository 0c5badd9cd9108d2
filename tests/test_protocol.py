"""``protocol.encode``: the C encoder called directly writes what ``json`` would."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pydantic
import pytest

from flask_durable_stream import protocol

#: The standard encoder with the protocol's settings, the one ``encode`` skips the steps of.
REFERENCE = protocol._encoder.encode


@dataclasses.dataclass
class Point:
    x: int
    label: str


class Model(pydantic.BaseModel):
    name: str
    tags: list[str]


VALUES: list[Any] = [
    "plain",
    'quote " backslash \\ newline \n separator \u2028 accent é emoji \U0001f600',
    0,
    -7,
    10**30,
    1.5,
    1e300,
    -0.0,
    True,
    None,
    [],
    {},
    [1, {"a": [2, 3.25, None]}, "x"],
    {"k": "v", "nested": {"list": [1.25, "é"], "empty": []}},
    {1: "int key", 2.5: "float key", False: "bool key", None: "none key"},
    (1, 2),
    {"tuple": (1, "two")},
    Point(1, "p"),
    [Point(2, "q")],
    Model(name="m", tags=["a", "b"]),
    {"set": {3}},
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_encode_writes_what_the_standard_encoder_writes(value: Any) -> None:
    assert protocol.encode(value) == REFERENCE(value)


def _outcome(encode: Any, value: Any) -> tuple[type[BaseException], str] | str:
    try:
        return str(encode(value))
    except Exception as exc:  # noqa: BLE001 - compared, not swallowed
        return type(exc), str(exc)


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, [1, -math.inf], object(), {(1, 2): "tuple key"}, {"a": object()}],
    ids=["nan", "inf", "inf in list", "object", "tuple key", "object in dict"],
)
def test_encode_refuses_what_the_standard_encoder_refuses(value: Any) -> None:
    outcome = _outcome(protocol.encode, value)
    assert not isinstance(outcome, str)
    assert outcome == _outcome(REFERENCE, value)


def test_a_circular_value_is_refused() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference detected"):
        protocol.encode(loop)


def test_a_circular_dict_is_refused_and_the_encoder_goes_on() -> None:
    # One shared encoder without a cycle check: a cycle ends in a RecursionError, which
    # encode turns into json's refusal; the next value is encoded as usual.
    loop: dict[str, Any] = {"a": 1}
    loop["self"] = {"inner": loop}
    with pytest.raises(ValueError, match="Circular reference detected"):
        protocol.encode(loop)
    assert protocol.encode({"a": [1, "b"]}) == '{"a":[1,"b"]}'


def test_a_value_nested_too_deep_is_refused_as_json_refuses_it() -> None:
    deep: list[Any] = []
    inner = deep
    for _ in range(100_000):
        inner.append([])
        inner = inner[0]
    with pytest.raises(RecursionError):
        json.dumps(deep)
    with pytest.raises(RecursionError):
        protocol.encode(deep)


def test_a_value_refused_midway_leaves_nothing_for_the_next_call() -> None:
    # The refusal comes while ``items`` is being encoded: an encoder whose cycle check
    # outlived the call would still hold ``items`` and call the next encoding circular.
    items: list[Any] = [1, math.nan]
    with pytest.raises(ValueError, match="Out of range float"):
        protocol.encode(items)
    items.pop()
    assert protocol.encode(items) == "[1]"
    shared = [1, 2]
    assert protocol.encode({"a": shared, "b": shared}) == '{"a":[1,2],"b":[1,2]}'


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("\ud800", '"\\ud800"'),
        ({"k\udc00": ["a\ud83d", "é", "\U0001f600"]}, '{"k\\udc00":["a\\ud83d","é","\U0001f600"]}'),
        ("x\udcff\udcfe", '"x\\udcff\\udcfe"'),
    ],
)
def test_a_lone_surrogate_is_written_as_an_escape(value: Any, text: str) -> None:
    """As JSON.stringify writes it: the text is UTF-8 encodable, and reads back the same."""
    encoded = protocol.encode(value)
    assert encoded == text
    assert json.loads(encoded.encode()) == value


@pytest.mark.parametrize(
    "kinds",
    [
        ["chunk", "chunk", "chunk"],
        ["chunk", "chunk", "done"],
        ["chunk", "error"],
        ["done", "chunk"],  # never a stream's order; framed as given all the same
        ["chunk", "error", "chunk", "done"],
        ["done", "done"],
    ],
    ids="-".join,
)
def test_a_batch_is_framed_as_its_events_one_by_one(kinds: list[str]) -> None:
    """``frames`` joins a batch of chunks (and its end) in one step: the same bytes, and
    each event keeps its kind, as when each is framed by itself."""
    payloads = ['"a"', '{"x":"é"}', "1", '""']
    events = [(seq, kind, payloads[seq % 4]) for seq, kind in enumerate(kinds)]
    one_by_one = "".join(protocol.frame(kind, payload) for _, kind, payload in events)
    body = protocol.frames(events)
    assert body == one_by_one.encode()
    parsed, rest = protocol.parse_frames(body.decode())
    assert rest == ""
    assert parsed == [(kind, json.loads(payload)) for _, kind, payload in events]


def test_a_batch_with_an_unknown_kind_is_refused() -> None:
    with pytest.raises(KeyError):
        protocol.frames([(0, "chunk", "1"), (1, "unknown", "2")])
