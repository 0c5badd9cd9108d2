"""flask_durable_stream.sse: one case per WHATWG event-stream parsing rule."""

from __future__ import annotations

import io

import pytest

from flask_durable_stream.sse import ServerSentEvent, SSEDecoder, decode, read_events


def test_a_space_after_the_colon_is_optional_and_only_one_is_dropped() -> None:
    assert decode("data:x\n\n") == [ServerSentEvent(data="x")]
    assert decode("data: x\n\n") == [ServerSentEvent(data="x")]
    assert decode("data:  x \n\n") == [ServerSentEvent(data=" x ")]


def test_several_data_lines_join_with_newlines() -> None:
    assert decode("data: a\ndata:b\ndata\ndata: c\n\n") == [ServerSentEvent(data="a\nb\n\nc")]


@pytest.mark.parametrize("eol", ["\n", "\r", "\r\n"])
def test_lines_end_with_lf_cr_or_crlf(eol: str) -> None:
    text = f"event: result{eol}id: 7{eol}data: 1{eol}{eol}data: 2{eol}{eol}"
    assert decode(text) == [
        ServerSentEvent("result", "1", "7"),
        ServerSentEvent("message", "2", "7"),
    ]


def test_a_crlf_split_across_two_reads_is_one_line_end() -> None:
    assert decode(["data: a\r", "\ndata: b\r", "\n\r", "\n"]) == [ServerSentEvent(data="a\nb")]
    assert decode(["data: a\r", "\r"]) == [ServerSentEvent(data="a")]  # CR, then an empty line


def test_an_id_with_nul_is_ignored_and_the_last_good_one_carries_over() -> None:
    assert decode("id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\ndata: c\n\nid\ndata: d\n\n") == [
        ServerSentEvent(data="a", id="1"),
        ServerSentEvent(data="b", id="1"),
        ServerSentEvent(data="c", id="1"),
        ServerSentEvent(data="d", id=""),  # an empty id resets it
    ]


def test_comments_are_not_events() -> None:
    comments: list[str] = []
    decoder = SSEDecoder(on_comment=comments.append)
    assert decode(": keep-alive\n\n:x\ndata: 1\n: between\n\n", decoder) == [
        ServerSentEvent(data="1")
    ]
    assert comments == ["keep-alive", "x", "between"]


def test_retry_counts_only_when_all_ascii_digits() -> None:
    seen: list[int] = []
    decoder = SSEDecoder(on_retry=seen.append)
    decode("retry: 1000\n\nretry: 10s\n\nretry: -5\n\nretry: ١٢\n\nretry:250\n\n", decoder)
    assert seen == [1000, 250] and decoder.retry == 250


def test_a_block_without_data_dispatches_nothing_and_resets_the_event_type() -> None:
    assert decode("event: result\n\ndata: 1\n\n") == [ServerSentEvent("message", "1")]
    assert decode("event: result\nid: 4\n\n") == []


def test_unknown_fields_and_fields_without_a_colon_are_handled() -> None:
    assert decode("foo: bar\ndata\n\n") == [ServerSentEvent(data="")]
    assert decode("event\ndata: 1\n\n") == [ServerSentEvent("message", "1")]


def test_an_unfinished_block_at_the_end_is_dropped_until_completed() -> None:
    decoder = SSEDecoder()
    assert list(decoder.feed("data: 1\n")) == []
    assert list(decoder.feed("data: 2")) == []
    assert list(decoder.feed("\n\n")) == [ServerSentEvent(data="1\n2")]


def test_a_leading_byte_order_mark_is_skipped() -> None:
    assert decode("\ufeffdata: 1\n\n") == [ServerSentEvent(data="1")]
    assert decode("data: \ufeff1\n\n") == [ServerSentEvent(data="\ufeff1")]  # only at the start


class OneByteAtATime(io.BytesIO):
    def read1(self, n: int | None = -1, /) -> bytes:
        return super().read1(1)


def test_bytes_split_inside_characters_and_bad_bytes() -> None:
    raw = 'id: 1\r\ndata: {"s":"héllo ✓ 🚀"}\r\n\r\n'.encode() + b"data: \xff\n\n"
    events = list(read_events(OneByteAtATime(raw)))
    assert events[0].json() == {"s": "héllo ✓ 🚀"} and events[0].id == "1"
    assert events[1].data == "\ufffd"  # the spec's UTF-8 decode replaces bad bytes
