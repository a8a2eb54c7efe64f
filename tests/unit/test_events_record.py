"""Outbox record framing, the signature, the backoff and the webhook URL: pure functions."""

from __future__ import annotations

import hashlib
import hmac
import json
import random

import pytest

from smtpbalancer.events import record
from smtpbalancer.events.event import DeliveryEvent
from smtpbalancer.events.webhook import Target, backoff_s, build_body, sign


def _event(i: int = 0) -> DeliveryEvent:
    return DeliveryEvent(
        status="delivered",
        queue_id="01A21F78241C38ED53B7",
        message_id="<m@example.com>",
        sender="esp@example.com",
        recipient=f"r{i}@example.net",
        pool="default",
        upstream="relay-a",
        smtp_reply="250 2.0.0 Ok: queued as 8BDCA22DA71",
        enhanced_status="2.0.0",
        upstream_queue_id="8BDCA22DA71",
        received_at=1_764_291_243.5,
        at=1_764_291_244.25,
        attempt=1,
        headers={"X-Campaign-ID": "spring\u2028sale"},
    )


def test_a_record_is_one_line_that_decodes_to_the_event_with_an_id() -> None:
    line = record.encode(_event().to_json())
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    doc = json.loads(record.decode(line[:-1]) or b"")
    assert doc == {"event_id": doc["event_id"], **_event().to_json()}
    assert next(iter(doc)) == "event_id" and len(doc["event_id"]) == 36


def test_event_ids_are_unique_and_a_given_one_is_kept() -> None:
    ids = {json.loads(record.encode({"n": i})[9:])["event_id"] for i in range(1000)}
    assert len(ids) == 1000
    assert json.loads(record.encode({"event_id": "mine"})[9:]) == {"event_id": "mine"}


def test_newlines_inside_values_never_split_a_record() -> None:
    line = record.encode({"smtp_reply": "550-5.1.1 first\r\n550 5.1.1 second\n"})
    assert line.count(b"\n") == 1


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:-5],  # cut short (checksum no longer matches)
        lambda b: (b"1" if b[:1] == b"0" else b"0") + b[1:],  # checksum digit changed
        lambda b: b[:20] + b"X" + b[21:],  # a byte of the JSON changed
        lambda b: b"\0" * len(b),  # zeros where the data never reached the disk
        lambda b: b"",
        lambda b: b"zzzzzzzz " + b[9:],
    ],
)
def test_damaged_lines_do_not_decode(damage: object) -> None:
    line = record.encode({"n": 1})[:-1]
    assert record.decode(line) is not None
    assert record.decode(damage(line)) is None  # type: ignore[operator]


def test_parse_takes_whole_lines_up_to_the_limits_and_skips_damaged_ones() -> None:
    lines = [record.encode({"n": i}) for i in range(5)]
    lines[2] = b"00000000 " + lines[2][9:]  # damaged
    buf = b"".join(lines) + lines[4][:7]  # and a torn tail
    parsed = record.parse(buf)
    assert [json.loads(d)["n"] for d in parsed.docs] == [0, 1, 3, 4]
    assert parsed.damaged == 1
    assert parsed.end == len(buf) - 7  # the torn tail is left alone
    two = record.parse(buf, limit=2)
    assert len(two.docs) == 2
    assert two.end == sum(map(len, lines[:3]))  # steps over the damaged line, not the next good one
    # max_bytes counts JSON; the first record is always taken
    one = record.parse(buf, max_bytes=1)
    assert len(one.docs) == 1


def test_an_oversized_or_unserialisable_event_is_refused() -> None:
    with pytest.raises(ValueError, match="too large"):
        record.encode({"x": "a" * record.MAX_RECORD_BYTES})
    with pytest.raises(ValueError, match="not JSON"):
        record.encode({"x": object()})


def test_signature_is_hmac_sha256_of_the_body_in_hex() -> None:
    body = build_body((b'{"a":1}', b'{"b":2}'), 1_764_291_243)
    assert json.loads(body) == {"sent_at": 1_764_291_243, "events": [{"a": 1}, {"b": 2}]}
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert sign(b"s3cret", body) == f"sha256={expected}"
    assert sign(b"other", body) != f"sha256={expected}"


def test_backoff_doubles_from_the_initial_delay_and_stops_at_the_cap() -> None:
    class Mid(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return (a + b) / 2  # no jitter

    rng = Mid()
    delays = [backoff_s(n, initial_s=1.0, max_s=30.0, rng=rng) for n in range(1, 9)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff_s(10_000, initial_s=1.0, max_s=300.0, rng=rng) == 300.0


def test_backoff_jitter_stays_within_twenty_percent_and_under_the_cap() -> None:
    rng = random.Random(7)
    for n in range(1, 12):
        d = backoff_s(n, initial_s=1.0, max_s=100.0, rng=rng)
        base = min(100.0, 2.0 ** (n - 1))
        assert 0.8 * base <= d <= min(100.0, 1.2 * base)


def test_webhook_url_parsing() -> None:
    t = Target.parse("https://user:p%40ss@esp.example.com:8443/hooks/smtp?tenant=7")
    assert (t.tls, t.host, t.port, t.host_header) == (True, "esp.example.com", 8443, t.host_header)
    assert t.host_header == "esp.example.com:8443"
    assert t.path == "/hooks/smtp?tenant=7"
    assert t.authorization == "Basic dXNlcjpwQHNz"  # user:p@ss
    plain = Target.parse("http://[::1]/")
    assert (plain.tls, plain.host, plain.port, plain.host_header) == (False, "::1", 80, "[::1]")
    assert Target.parse("https://esp.example.com").path == "/"
    with pytest.raises(ValueError):
        Target.parse("ftp://esp.example.com/")
