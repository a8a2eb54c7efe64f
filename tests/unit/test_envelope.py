"""Specification of queue ids and the envelope."""

from __future__ import annotations

import itertools

import pytest

from smtpbalancer import envelope
from smtpbalancer.envelope import Envelope, QueueIds, valid_queue_id

WALL = 1_750_000_000.123


def test_ids_are_20_uppercase_hex_chars() -> None:
    ids = QueueIds()
    for _ in range(100):
        qid = ids.next(WALL)
        assert len(qid) == 20
        assert qid == qid.upper()
        int(qid, 16)  # raises unless hex
        assert valid_queue_id(qid)


def test_the_first_12_digits_are_the_milliseconds() -> None:
    assert QueueIds().next(WALL)[:12] == f"{1_750_000_000_123:012X}"


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("0197A1B2C3D4E5F60718", True),
        ("00000000000000000000", True),
        ("FFFFFFFFFFFFFFFFFFFF", True),
        ("0197a1b2c3d4e5f60718", False),  # lowercase
        ("0197A1B2C3D4E5F6071", False),  # 19
        ("0197A1B2C3D4E5F607189", False),  # 21
        ("0197A1B2C3D4E5F6071G", False),
        ("0197A1B2C3D4E5F60718\n", False),  # `$` would match before a final newline
        ("../0197A1B2C3D4E5F607", False),
        ("", False),
    ],
)
def test_valid_queue_id(text: str, valid: bool) -> None:
    assert valid_queue_id(text) is valid


def test_ids_increase_strictly_with_wall_time() -> None:
    ids = QueueIds()
    walls = [WALL + 0.001 * i for i in range(1000)] + [WALL + 10.0, WALL + 86_400.0]
    made = [ids.next(w) for w in walls]
    assert all(a < b for a, b in itertools.pairwise(made))


def test_the_millisecond_prefix_outranks_a_counter_wrap() -> None:
    ids = QueueIds()
    ids._counter = 0xFFFFFFFE  # as if 2**31 ids had been made since start
    assert [ids.next(w) for w in (1.0, 2.0, 3.0)] == [
        "0000000003E8FFFFFFFF",
        "0000000007D000000000",
        "000000000BB800000001",
    ]


def test_ids_are_unique_at_the_same_wall_time() -> None:
    ids = QueueIds()
    made = [ids.next(WALL) for _ in range(10_000)]
    assert len(set(made)) == 10_000
    assert made == sorted(made)  # within one millisecond the counter orders them


def test_two_generators_start_at_different_counters() -> None:
    # 32 random bits each: equal starts would mean urandom is broken (p = 2**-32).
    assert QueueIds().next(WALL) != QueueIds().next(WALL)


def test_ids_stay_ordered_even_when_the_random_start_is_the_largest_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(envelope.os, "urandom", lambda n: b"\xff\xff\xff\xfe")
    ids = QueueIds()
    first, second = ids.next(WALL), ids.next(WALL)
    assert first < second


@pytest.mark.parametrize(("mail_from", "null"), [("", True), ("alice@example.test", False)])
def test_null_sender(mail_from: str, null: bool) -> None:
    assert Envelope(mail_from, ("b@example.net",)).null_sender is null
