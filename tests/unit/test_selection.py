"""Specification of upstream selection: nginx smooth weighted round-robin, tiers, avoidance."""

from __future__ import annotations

from collections import Counter

import pytest

from smtpbalancer.upstream.selection import Candidate, SmoothWeighted, active_tier


def up(name: str, weight: int = 1, *, backup: bool = False, eligible: bool = True) -> Candidate:
    return Candidate(name, weight, backup, eligible)


def picks(weights: dict[str, int], n: int) -> list[str | None]:
    wrr = SmoothWeighted()
    candidates = [up(name, w) for name, w in weights.items()]
    return [wrr.pick(candidates) for _ in range(n)]


def test_weights_5_1_1_give_the_nginx_smooth_sequence() -> None:
    assert picks({"a": 5, "b": 1, "c": 1}, 7) == ["a", "a", "b", "a", "c", "a", "a"]


def test_the_smooth_sequence_repeats_every_sum_of_weights_picks() -> None:
    assert picks({"a": 5, "b": 1, "c": 1}, 14) == list("aabacaa") * 2


@pytest.mark.parametrize(
    ("weights", "n", "expected"),
    [
        ({"a": 1, "b": 2, "c": 5}, 8000, {"a": 1000, "b": 2000, "c": 5000}),
        ({"a": 1, "b": 1}, 10, {"a": 5, "b": 5}),
        ({"a": 3, "b": 0, "c": 1}, 400, {"a": 300, "c": 100}),
        ({"a": 7}, 9, {"a": 9}),
    ],
)
def test_counts_honour_weights_exactly(
    weights: dict[str, int], n: int, expected: dict[str, int]
) -> None:
    assert Counter(picks(weights, n)) == expected


def test_equal_weights_alternate() -> None:
    assert picks({"a": 1, "b": 1, "c": 1}, 6) == ["a", "b", "c", "a", "b", "c"]


def test_weight_zero_is_never_picked() -> None:
    assert "b" not in picks({"a": 1, "b": 0}, 100)


def test_nothing_to_pick_gives_none() -> None:
    wrr = SmoothWeighted()
    assert wrr.pick([]) is None
    assert wrr.pick([up("a", 0)]) is None
    assert wrr.choose([up("a", eligible=False)]) is None


def test_choose_skips_avoided_upstreams() -> None:
    wrr = SmoothWeighted()
    candidates = [up("a", 5), up("b", 1), up("c", 1)]
    chosen = [wrr.choose(candidates, avoid=frozenset({"a"})) for _ in range(4)]
    assert chosen == ["b", "c", "b", "c"]


def test_choose_returns_none_when_the_whole_active_tier_is_avoided() -> None:
    wrr = SmoothWeighted()
    candidates = [up("a"), up("b"), up("spare", backup=True)]
    # The backup tier is not consulted: the primaries are eligible, just avoided.
    assert wrr.choose(candidates, avoid=frozenset({"a", "b"})) is None


def test_backups_are_used_only_when_no_primary_is_eligible() -> None:
    wrr = SmoothWeighted()
    healthy = [up("a"), up("spare", 10, backup=True)]
    assert {wrr.choose(healthy) for _ in range(20)} == {"a"}
    down = [up("a", eligible=False), up("spare", 10, backup=True)]
    assert {wrr.choose(down) for _ in range(20)} == {"spare"}


def test_ineligible_primaries_are_skipped() -> None:
    wrr = SmoothWeighted()
    candidates = [up("a", 5, eligible=False), up("b"), up("c")]
    assert [wrr.choose(candidates) for _ in range(4)] == ["b", "c", "b", "c"]


@pytest.mark.parametrize(
    ("candidates", "tier"),
    [
        ([up("a"), up("b", backup=True)], ["a"]),
        ([up("a", eligible=False), up("b", backup=True)], ["b"]),
        ([up("a", 0), up("b", backup=True)], ["b"]),  # a weight-0 primary is no primary
        ([up("a", eligible=False), up("b", backup=True, eligible=False)], []),
        ([up("a", eligible=False), up("b", 0, backup=True)], []),
        ([up("a"), up("b", eligible=False), up("c")], ["a", "c"]),
    ],
)
def test_active_tier(candidates: list[Candidate], tier: list[str]) -> None:
    assert [c.name for c in active_tier(candidates)] == tier


def test_forget_resets_an_upstreams_running_weight() -> None:
    wrr = SmoothWeighted()
    candidates = [up("a", 5), up("b", 1), up("c", 1)]
    assert [wrr.pick(candidates) for _ in range(3)] == ["a", "a", "b"]
    wrr.forget(["a", "b", "c"])
    assert repr(wrr) == "<SmoothWeighted {}>"
    assert [wrr.pick(candidates) for _ in range(7)] == list("aabacaa")
