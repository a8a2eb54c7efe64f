"""Specification of the spool record formats: exact roundtrips, and SpoolCorrupt on any doubt."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest

from smtpbalancer.envelope import Envelope
from smtpbalancer.errors import SpoolCorrupt
from smtpbalancer.spool.record import (
    Failure,
    MessageMeta,
    Progress,
    check_body,
    decode_message_head,
    decode_progress,
    encode_message,
    encode_progress,
    head_size,
    maybe_torn_header,
    parse_frame,
)

QID = "0197A1B2C3D4E5F60718"
BODY = b"Subject: hi\r\n\r\nhello\r\n"


def meta_for(envelope: Envelope, queue_id: str = QID) -> MessageMeta:
    return MessageMeta(queue_id, envelope, received_wall=1_750_000_000.25, body_size=0, client="c")


ENVELOPES = [
    Envelope("alice@example.test", ("bob@example.net",)),
    Envelope("", ("postmaster@example.net", "b@example.net")),  # null sender (a bounce)
    Envelope("jörg@bücher.example", ("用户@例子.广告", "b@example.net"), smtputf8=True),
    Envelope("a@example.test", ("b@example.net",), body_8bit=True),
]


@pytest.mark.parametrize("envelope", ENVELOPES)
@pytest.mark.parametrize("body", [BODY, b"", bytes(range(256)) * 10])
def test_message_roundtrip(envelope: Envelope, body: bytes) -> None:
    prefix, body_crc = encode_message(meta_for(envelope), body)
    layout = decode_message_head(QID, prefix + body)
    assert layout.meta == MessageMeta(
        QID,
        envelope,
        received_wall=1_750_000_000.25,
        body_size=len(body),
        client="c",
        body_crc=body_crc,
    )
    assert body_crc == zlib.crc32(body)
    assert layout.body_offset == len(prefix)
    assert layout.file_size == len(prefix) + len(body)
    assert head_size(QID, prefix) == len(prefix)
    check_body(QID, layout.meta, body)  # does not raise


def test_the_head_alone_decodes() -> None:
    prefix, _ = encode_message(meta_for(ENVELOPES[0]), BODY)
    assert decode_message_head(QID, prefix).meta.body_size == len(BODY)


def test_header_line_format() -> None:
    prefix, _ = encode_message(meta_for(ENVELOPES[0]), BODY)
    line, meta = prefix.split(b"\n", 1)
    assert line == b"SMTPB1 %d %d %08x %08x" % (
        len(meta),
        len(BODY),
        zlib.crc32(meta),
        zlib.crc32(BODY),
    )


def good_file() -> bytes:
    prefix, _ = encode_message(meta_for(ENVELOPES[2]), BODY)
    return prefix + BODY


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def meta_start(data: bytes) -> int:
    return data.index(b"\n") + 1


@pytest.mark.parametrize(
    ("corrupt", "why"),
    [
        (lambda d: b"", "no header line"),
        (lambda d: d.replace(b"\n", b" ", 1), "no header line"),
        (lambda d: b"garbage\n" + d, "bad header line"),
        (lambda d: b"SMTPB2" + d[6:], "bad header line"),
        (lambda d: d.replace(b"SMTPB1 ", b"SMTPB1  ", 1), "bad header line"),
        (lambda d: b"SMTPB1 x" + d[d.index(b" ", 7) :], "bad header numbers"),
        (lambda d: d[: meta_start(d) + 5], "truncated metadata"),
        (lambda d: flip(d, meta_start(d) + 3), "metadata checksum mismatch"),
        (lambda d: flip(d, d.index(b"\n") - 12), "metadata checksum mismatch"),  # meta crc digit
    ],
)
def test_corrupt_heads_are_refused(corrupt: Callable[[bytes], bytes], why: str) -> None:
    with pytest.raises(SpoolCorrupt) as caught:
        decode_message_head(QID, corrupt(good_file()))
    assert (caught.value.name, caught.value.why) == (QID, why)


def forged(doc: bytes) -> bytes:
    """A file whose metadata checksum is right but whose metadata is wrong."""
    return b"SMTPB1 %d 0 %08x %08x\n" % (len(doc), zlib.crc32(doc), zlib.crc32(b"")) + doc


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        (b"not json", "bad metadata"),
        (b"[]", "bad metadata"),
        (b'{"id":"%s","rcpts":["b@x"],"received":1}' % QID.encode(), "bad metadata"),
        (b'{"id":"%s","from":"","rcpts":["b@x"],"received":"x"}' % QID.encode(), "bad metadata"),
        (b'{"id":"%s","from":"","rcpts":[],"received":1}' % QID.encode(), "metadata does not"),
        (b"\xff\xfe", "bad metadata"),
    ],
)
def test_checksummed_but_invalid_metadata_is_refused(doc: bytes, why: str) -> None:
    with pytest.raises(SpoolCorrupt) as caught:
        decode_message_head(QID, forged(doc))
    assert caught.value.why.startswith(why)


def test_metadata_queue_id_must_match_the_file_name() -> None:
    other = "0197A1B2C3D4E5F60719"
    with pytest.raises(SpoolCorrupt) as caught:
        decode_message_head(other, good_file())
    assert (caught.value.name, caught.value.why) == (other, "metadata does not match the file")


# --- framing in a segment log -----------------------------------------------------------


def test_a_frame_is_read_at_any_offset_and_matches_the_record() -> None:
    data = good_file()
    frame = parse_frame(b"xx" + data + b"next", 2)
    assert frame is not None
    assert frame.total == len(data)
    assert frame.head_len == decode_message_head(QID, data).body_offset
    assert frame.body_crc == zlib.crc32(BODY)


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"SMTPB1 12 3",  # cut short
        b"SMTPB1 12 3 0000000a 0000000b",  # no newline yet
        b"SMTPB1 12 3 0000000A 0000000b\n",  # uppercase hex is not what we write
        b"SMTPB1 1234567890123 3 0000000a 0000000b\n",  # absurd length
        b"SMTPB1 -1 3 0000000a 0000000b\n",
        b"SMTPB2 12 3 0000000a 0000000b\n",
        b"\0" * 80,
    ],
)
def test_malformed_header_lines_frame_nothing(head: bytes) -> None:
    assert parse_frame(head) is None


@pytest.mark.parametrize(
    ("tail", "torn"),
    [
        (b"S", True),
        (b"SMTPB1", True),
        (b"SMTPB1 12 3 0000", True),
        (b"SMTPB1 12 3 0000000a 0000000b\n", False),  # a whole line is not a torn header
        (b"SMTPB1 12 x", False),
        (b"garbage", False),
        (b"SMTPB1 " + b"1" * 80, False),
    ],
)
def test_a_torn_header_is_a_prefix_of_one(tail: bytes, torn: bool) -> None:
    assert maybe_torn_header(tail) is torn


def test_a_body_length_the_metadata_disagrees_with_is_refused() -> None:
    """The metadata checksum covers the body length, so a damaged frame is caught."""
    prefix, _ = encode_message(meta_for(ENVELOPES[0]), BODY)
    line, meta = prefix.split(b"\n", 1)
    fields = line.split(b" ")
    fields[2] = b"%d" % (len(BODY) + 1)
    with pytest.raises(SpoolCorrupt, match="metadata does not match"):
        decode_message_head(QID, b" ".join(fields) + b"\n" + meta)


def test_head_size_refuses_a_bad_header() -> None:
    with pytest.raises(SpoolCorrupt, match="bad header line"):
        head_size(QID, b"SMTPB2 1 2 3 4\n")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (BODY[:-1], "truncated body"),
        (BODY + b"x", "truncated body"),
        (b"", "truncated body"),
        (flip(BODY, 4), "body checksum mismatch"),
    ],
)
def test_damaged_bodies_are_refused(body: bytes, why: str) -> None:
    layout = decode_message_head(QID, good_file())
    with pytest.raises(SpoolCorrupt) as caught:
        check_body(QID, layout.meta, body)
    assert caught.value.why == why


# --- progress -------------------------------------------------------------------------

PROGRESS = Progress(
    delivered=frozenset({"a@example.net", "ü@例子.广告"}),
    failed={
        "b@example.net": Failure("5.1.1", "550 5.1.1 User unknown", "mx.example.net", 1.5),
        "c@example.net": Failure("4.4.7", ""),
    },
    attempts=3,
)


@pytest.mark.parametrize("progress", [PROGRESS, Progress()])
def test_progress_roundtrip(progress: Progress) -> None:
    assert decode_progress("P", encode_progress(progress)) == progress


def test_progress_format() -> None:
    data = encode_progress(Progress(delivered=frozenset({"b", "a"}), attempts=1))
    payload = b'{"delivered":["a","b"],"failed":{},"attempts":1}'
    assert data == b"SMTPS1 %08x\n" % zlib.crc32(payload) + payload


@pytest.mark.parametrize(
    ("corrupt", "why"),
    [
        (lambda d: b"", "bad progress header"),
        (lambda d: d.replace(b"\n", b" "), "bad progress header"),
        (lambda d: b"SMTPS2" + d[6:], "bad progress header"),
        (lambda d: d[:-1], "progress checksum mismatch"),
        (lambda d: flip(d, len(d) - 5), "progress checksum mismatch"),
        (lambda d: flip(d, 8), "progress checksum mismatch"),
        (lambda d: d.replace(b"SMTPS1 ", b"SMTPS1 zz", 1), "bad progress data"),
    ],
)
def test_corrupt_progress_is_refused(corrupt: Callable[[bytes], bytes], why: str) -> None:
    with pytest.raises(SpoolCorrupt) as caught:
        decode_progress("P", corrupt(encode_progress(PROGRESS)))
    assert (caught.value.name, caught.value.why) == ("P", why)


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"{}", b'{"delivered":[],"failed":{"x":["5.0.0"]},"attempts":0}', b"[]"],
)
def test_checksummed_but_invalid_progress_is_refused(payload: bytes) -> None:
    data = b"SMTPS1 %08x\n" % zlib.crc32(payload) + payload
    with pytest.raises(SpoolCorrupt, match="bad progress data"):
        decode_progress("P", data)


@pytest.mark.parametrize(
    ("rcpts", "pending"),
    [
        (("a@example.net", "b@example.net", "c@example.net", "d@example.net"), ("d@example.net",)),
        (("d@example.net", "e@example.net"), ("d@example.net", "e@example.net")),
        (("a@example.net", "b@example.net"), ()),
        ((), ()),
    ],
)
def test_pending_is_neither_delivered_nor_failed_in_order(
    rcpts: tuple[str, ...], pending: tuple[str, ...]
) -> None:
    assert PROGRESS.pending(rcpts) == pending


def _json_metadata(meta: MessageMeta, body_len: int) -> bytes:
    """The metadata as the generic JSON encoder wrote it (encode_prefix's reference)."""
    import json

    env = meta.envelope
    doc: dict[str, object] = {
        "id": meta.queue_id,
        "from": env.mail_from,
        "rcpts": list(env.rcpt_tos),
        "received": meta.received_wall,
        "client": meta.client,
        "smtputf8": env.smtputf8,
        "8bit": env.body_8bit,
        "size": body_len,
    }
    if env.pool != "default":
        doc["pool"] = env.pool
    if env.message_id:
        doc["msgid"] = env.message_id
    if env.tags:
        doc["tags"] = [list(pair) for pair in env.tags]
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    "envelope",
    [
        *ENVELOPES,
        Envelope('q"uo\\te@x.test', ('a"b@c.test', "tab\there@x.test", "ctl\x01@x.test")),
        Envelope("a@b.test", ("c@d.test",), pool="bulk", message_id="<1@x.test>"),
        Envelope("a@b.test", ("c@d.test",), tags=(("X-Campaign", 'say "hi"'), ("X-Ü", "ü\n"))),
        Envelope("a@b.test", ("c@d.test",), smtputf8=True, body_8bit=True, pool="p\u2028"),
    ],
)
@pytest.mark.parametrize("wall", [1_750_000_000.25, 1795852465.1234567, 0.1, 1e22, 5, 0])
def test_metadata_is_what_the_json_encoder_wrote(envelope: Envelope, wall: float) -> None:
    meta = MessageMeta(QID, envelope, received_wall=wall, body_size=7, client='c"l')
    prefix, body_crc = encode_message(meta, b"7 bytes")
    assert prefix.split(b"\n", 1)[1] == _json_metadata(meta, 7)
    assert decode_message_head(QID, prefix + b"7 bytes").meta == MessageMeta(
        QID, envelope, received_wall=wall, body_size=7, client='c"l', body_crc=body_crc
    )
