"""The screen's decision (loop/scheduler/screening.py) on given contributions: pairs and thumbs together, groups
by rater, companions (waiting thumbs measured beside a pair batch) held with their rater's items and never
enough to hold another rater's, and the per-rater signal over several runs' screens."""

from __future__ import annotations

from loop.pairs import Item
from loop.scheduler.screening import decide, rater_signal
from loop.worker.protocol import Example, Pair


def pair(rater: str, n: int) -> Item:
    return Item(Pair(prompt="q", chosen=f"c{n}", rejected=f"r{n}"), raters=(rater,), comparison_ids=(n,))


def thumb(rater: str, up: bool, n: int) -> Item:
    return Item(Example(prompt="q", completion=f"a{n}", label=up), raters=(rater,), rating_ids=(n,))


def flipped_thumbs(rater: str, k: int, start: int) -> tuple[list[Item], list[float]]:
    """k ups on answers the kept runs made less likely and k downs on ones they made likelier: every figure < 0."""
    items = [thumb(rater, True, start + i) for i in range(k)] + [thumb(rater, False, start + k + i) for i in range(k)]
    return items, [-1.0 - 0.1 * i for i in range(2 * k)]


def test_two_flipped_pairs_alone_pass_and_with_their_raters_waiting_thumbs_are_held() -> None:
    pairs = [pair("mallory", 1), pair("mallory", 2)]
    alone = decide(pairs, [-1.0, -2.0], alpha=0.01)
    assert alone.p_value == 0.25 and not alone.held  # 2^-2 is the least two pairs can read

    companions, figures = flipped_thumbs("mallory", 5, 100)
    d = decide(pairs + companions, [-1.0, -2.0] + figures, alpha=0.01, companions=range(2, 12))
    assert d.p_value < 0.01 and d.held_indices() == set(range(12))
    out = d.figures(pairs + companions, [-1.0, -2.0] + figures, 0.01)
    assert out["companions"] == 10 and out["quarantined"] == 12
    assert [it["thumb"] for it in out["items"]] == [None, None] + [1] * 5 + [-1] * 5
    assert [it["companion"] for it in out["items"]] == [False, False] + [True] * 10


def test_a_hostile_raters_waiting_thumbs_do_not_hold_an_honest_raters_pairs() -> None:
    honest = [pair("alice", i) for i in range(6)]
    hostile = [pair("mallory", 10), pair("mallory", 11)]
    companions, figures = flipped_thumbs("mallory", 6, 100)
    items = honest + hostile + companions
    d = decide(items, [1.0] * 6 + [-1.0, -1.0] + figures, alpha=0.01, companions=range(8, len(items)))
    assert d.held_indices() == set(range(6, len(items)))  # mallory's pairs and thumbs, none of alice's
    assert [h.scope for h in d.held] == ["rater:mallory"]
    assert d.groups["mallory"]["companions"] == 12 and d.groups["alice"]["p_value"] > 0.5


def test_an_honest_rater_who_says_down_to_most_answers_is_not_held() -> None:
    # ten downs, two ups, on answers the kept runs all made likelier (g > 0): no relation between thumb and answer
    items = [thumb("grumpy", i < 2, i) for i in range(12)]
    g = [1.0, 0.5, 2.0, 0.7, 1.1, 0.4, 0.9, 1.3, 0.6, 1.5, 0.8, 1.2]
    figures = [gi * (1 if it.example.label else -1) for gi, it in zip(g, items)]
    d = decide(items, figures, alpha=0.01)
    assert not d.held and d.p_value > 0.1  # a coin per thumb would read 10 of 12 pulling back: p ~ 0.003


def test_the_signal_sums_every_screen_per_rater_and_counts_feedback_measured_twice_once() -> None:
    companions, figures = flipped_thumbs("mallory", 5, 100)  # 1 / C(10, 5): the least p of 5 ups and 5 downs
    first = decide(companions, figures, alpha=0).figures(companions, figures, 0)
    later = decide(companions[:2], figures[:2], alpha=0).figures(companions[:2], figures[:2], 0)  # screened again
    honest = [pair("alice", i) for i in range(8)]
    third = decide(honest, [0.5] * 8, alpha=0).figures(honest, [0.5] * 8, 0)
    signal = {r["rater"]: r for r in rater_signal([first, later, third], alpha=0.01)}
    assert signal["mallory"]["items"] == 10 and signal["mallory"]["down"] == 10
    assert signal["mallory"]["flagged"] and signal["mallory"]["p_value"] < 0.01
    assert signal["alice"]["items"] == 8 and not signal["alice"]["flagged"]
    # figures recorded before thumbs carried their label read as pairs (a coin each), as they were tested then
    legacy = {**first, "items": [{k: v for k, v in it.items() if k != "thumb"} for it in first["items"]]}
    assert rater_signal([legacy])[0]["items"] == 10


def test_the_directions_combine_as_unit_vectors_and_each_is_tested() -> None:
    from loop.scheduler.screening import along, p_by_direction

    learned, anchored = [2.0, -4.0, 6.0], [10.0, 10.0, -30.0]
    assert along("learned", learned, anchored, 2.0, 10.0) == learned
    assert along("anchors", learned, anchored, 2.0, 10.0) == anchored
    assert along("both", learned, anchored, 2.0, 10.0) == [2.0, -1.0, 0.0]  # v/||v|| + g/||g||: linear
    assert along("both", [], anchored, 0.0, 10.0) == anchored and along("both", learned, [], 2.0, 0.0) == learned
    try:
        along("sideways", learned, anchored, 1.0, 1.0)
    except ValueError as exc:
        assert "sideways" in str(exc)
    else:
        raise AssertionError("an unknown direction was accepted")
    items = [pair("mallory", i) for i in range(8)]
    by = p_by_direction(items, [], [-1.0] * 8, 0.0, 3.0)
    assert by["learned"] is None and by["anchors"] == by["both"] == 1 / 256
