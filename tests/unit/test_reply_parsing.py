"""ReplyReader's parsing, however the bytes arrive: the inline path for ASCII CRLF
segments must give what the line-by-line path gives, reply for reply, and break the
wire for the same reasons. Checked against a plain reference reader on random reply
streams (multi-line replies, bare LFs, non-ASCII text, malformed and overlong lines,
too many continuation lines) cut into random segments."""

from __future__ import annotations

import random

from smtpbalancer.upstream.wire import MAX_REPLY_LINE, MAX_REPLY_LINES, RawReply, ReplyReader


class Transport:
    def close(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass


class Reference:
    """The reader as it was before its inline path: every line through one routine, in
    bytes. Segment boundaries matter to it too (a partial line longer than
    MAX_REPLY_LINE breaks the wire before its end arrives)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.pending: list[str] = []
        self.replies: list[RawReply] = []
        self.broken: str | None = None

    def feed(self, data: bytes) -> None:
        buffer = self.buffer + data
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            self.line(buffer[start:end])
            start = end + 1
        self.buffer = buffer[start:]
        if len(self.buffer) > MAX_REPLY_LINE:
            self.broken = self.broken or "reply line too long"

    def line(self, raw: bytes) -> None:
        if self.broken is not None:
            return
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        code, separator = raw[:3], raw[3:4]
        if len(raw) > MAX_REPLY_LINE or not code.isdigit() or separator not in (b"", b" ", b"-"):
            self.broken = "malformed reply"
            return
        self.pending.append(raw[4:].decode("utf-8", "surrogateescape"))
        if separator == b"-":
            if len(self.pending) > MAX_REPLY_LINES:
                self.broken = "reply has too many lines"
            return
        self.replies.append((int(code), "\n".join(self.pending)))
        self.pending = []


def random_line(rng: random.Random) -> bytes:
    kind = rng.random()
    code = b"%03d" % rng.choice((220, 250, 251, 354, 421, 450, 452, 550, 554, 7, 999))
    text = rng.choice((b"Ok", b"2.0.0 Ok: queued as 4XY", b"", b"caf\xc3\xa9", b"\xff bad", b"a b"))
    if kind < 0.04:
        return rng.choice((b"25x nope", b"2500ok", b"", b"abc", b"250\tx", b"\xe2\x82\xac250 x"))
    if kind < 0.06:
        return b"250 " + b"x" * rng.choice((MAX_REPLY_LINE - 4, MAX_REPLY_LINE - 3, 5000))
    if kind < 0.10:
        return code  # a bare code is a complete reply
    separator = b"-" if kind < 0.35 else b" "
    return code + separator + text


def random_stream(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randint(0, 12)):
        if rng.random() < 0.02:  # a multi-line reply longer than the reader takes
            parts.append(b"".join(b"250-x\r\n" for _ in range(MAX_REPLY_LINES + 1)))
        end = b"\r\n" if rng.random() < 0.9 else rng.choice((b"\n", b"\r\r\n"))
        parts.append(random_line(rng) + end)
    if rng.random() < 0.3:
        parts.append(rng.choice((b"250 partial", b"250 ok\r", b"x" * (MAX_REPLY_LINE + 1))))
    return b"".join(parts)


def segments(stream: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 6))))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


def test_segments_parse_like_the_reference_line_by_line() -> None:
    rng = random.Random(2920)
    inline = 0
    for _ in range(3000):
        stream = random_stream(rng)
        if not stream:
            continue
        reader, expected = ReplyReader(), Reference()
        reader.connection_made(Transport())  # type: ignore[arg-type]
        for piece in segments(stream, rng):
            reader.data_received(piece)
            expected.feed(piece)
            assert reader._broken == expected.broken, stream
            assert list(reader._ready) == expected.replies, stream
            inline += piece.isascii() and b"\n" not in piece.replace(b"\r\n", b"")
    assert inline > 1000  # the inline path was taken often


def test_a_reply_split_between_cr_and_lf_is_one_line() -> None:
    reader = ReplyReader()
    reader.connection_made(Transport())  # type: ignore[arg-type]
    for piece in (b"250-first\r", b"\n250 sec", b"ond\r", b"\n354 go\r\n"):
        reader.data_received(piece)
    assert reader.take(2) == [(250, "first\nsecond"), (354, "go")]
    assert not reader.broken
