"""Specification of upstream selection: nginx smooth weighted round-robin, tiers, avoidance."""

from __future__ import annotations

from collections import Counter

import pytest

from smtpbalancer.upstream.selection import (
    Candidate,
    Choice,
    Outcome,
    SmoothWeighted,
    active_tier,
    slow_start_weight,
)

NOW = 100.0


def up(
    name: str,
    weight: float = 1,
    *,
    backup: bool = False,
    eligible: bool = True,
    ready_at: float = 0.0,
) -> Candidate:
    return Candidate(name, weight, backup, eligible, ready_at)


def chosen(
    wrr: SmoothWeighted, candidates: list[Candidate], avoid: frozenset[str] = frozenset()
) -> str:
    choice = wrr.choose(candidates, NOW, avoid)
    assert choice.outcome is Outcome.PICKED, choice
    return choice.name


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
    assert wrr.choose([up("a", eligible=False)], NOW) == Choice(Outcome.NONE_ELIGIBLE)


def test_choose_skips_avoided_upstreams() -> None:
    wrr = SmoothWeighted()
    candidates = [up("a", 5), up("b", 1), up("c", 1)]
    picked = [chosen(wrr, candidates, frozenset({"a"})) for _ in range(4)]
    assert picked == ["b", "c", "b", "c"]


def test_choose_says_all_avoided_when_the_whole_active_tier_is_avoided() -> None:
    wrr = SmoothWeighted()
    candidates = [up("a"), up("b"), up("spare", backup=True)]
    # The backup tier is not consulted: the primaries are eligible, just avoided.
    choice = wrr.choose(candidates, NOW, frozenset({"a", "b"}))
    assert choice == Choice(Outcome.ALL_AVOIDED)


def test_backups_are_used_only_when_no_primary_is_eligible() -> None:
    wrr = SmoothWeighted()
    healthy = [up("a"), up("spare", 10, backup=True)]
    assert {chosen(wrr, healthy) for _ in range(20)} == {"a"}
    down = [up("a", eligible=False), up("spare", 10, backup=True)]
    assert {chosen(wrr, down) for _ in range(20)} == {"spare"}


def test_ineligible_primaries_are_skipped() -> None:
    wrr = SmoothWeighted()
    candidates = [up("a", 5, eligible=False), up("b"), up("c")]
    assert [chosen(wrr, candidates) for _ in range(4)] == ["b", "c", "b", "c"]


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


def test_rate_limited_candidates_are_skipped_while_another_has_a_token() -> None:
    wrr = SmoothWeighted()
    candidates = [up("a", 5, ready_at=NOW + 1), up("b")]
    assert [chosen(wrr, candidates) for _ in range(3)] == ["b", "b", "b"]


def test_when_every_fresh_candidate_is_rate_limited_the_answer_is_to_wait() -> None:
    wrr = SmoothWeighted()
    candidates = [up("a", ready_at=NOW + 0.5), up("b", ready_at=NOW + 0.2), up("c")]
    choice = wrr.choose(candidates, NOW, frozenset({"c"}))
    assert choice == Choice(Outcome.WAIT, wait_until=NOW + 0.2)


@pytest.mark.parametrize(
    ("in_service_s", "weight"),
    [(0.0, 1.0), (15.0, 5.5), (30.0, 10.0), (100.0, 10.0), (-1.0, 1.0)],
)
def test_slow_start_ramps_from_10_percent_to_full_weight(
    in_service_s: float, weight: float
) -> None:
    assert slow_start_weight(10.0, in_service_s, 30.0) == pytest.approx(weight)


def test_slow_start_off_or_weight_zero_leaves_the_weight() -> None:
    assert slow_start_weight(10.0, 0.0, 0.0) == 10.0
    assert slow_start_weight(0.0, 0.0, 30.0) == 0.0


def test_a_slow_starting_upstream_gets_a_small_share() -> None:
    wrr = SmoothWeighted()
    candidates = [up("steady", 9), up("returning", slow_start_weight(9, 0.0, 30.0))]
    counts = Counter(chosen(wrr, candidates) for _ in range(990))
    assert counts["returning"] == 90  # 0.9 of 9.9 total weight
