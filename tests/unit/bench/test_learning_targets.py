"""The summary of `loop bench learning` (loop/bench/learning/targets.py): met, not met and not judged, on synthetic
round records."""

from __future__ import annotations

from loop.bench.learning.targets import Base, Limits, RoundRecord, judge, verdict

BASE = Base(heldout_rate=0.3, perplexity=10.0, stutter=0.02, collapse=0.20)
LIMITS = Limits(target=0.9, within=10, max_ppl_rise=0.05, max_kl_per_token=0.05, health_points=0.05)


def rec(index: int, kind: str = "clean", status: str = "succeeded", heldout: float = 0.5, **kw: object) -> RoundRecord:
    figures = {"kl_per_token": 0.01, "ppl_vs_base": 0.02, "perplexity": 10.2, "stutter": 0.03, "collapse": 0.22}
    figures.update(kw)  # type: ignore[arg-type]
    return RoundRecord(index=index, kind=kind, status=status, run_id=index if status != "-" else None,
                       heldout_rate=heldout, **figures)  # type: ignore[arg-type]


def by_name(records: list[RoundRecord], base: Base = BASE, limits: Limits = LIMITS) -> dict[str, bool | None]:
    return {t.name: t.met for t in judge(records, base, limits)}


def good_run() -> list[RoundRecord]:
    return [rec(1, heldout=0.6), rec(2, heldout=0.8), rec(3, "ab", "rejected", 0.8), rec(4, heldout=0.92),
            rec(5, "thumbs", "rolled_back", 0.91), rec(6, heldout=0.95)]


def test_a_run_that_meets_everything() -> None:
    targets = judge(good_run(), BASE, LIMITS)
    assert {t.name: t.met for t in targets} == {"trait": True, "drift": True, "health": True, "poison": True,
                                                "false stops": True}
    assert "first at round 4" in targets[0].line() and targets[0].line().endswith(": met")
    assert verdict(targets) == "TARGETS MET"


def test_a_poisoned_round_that_was_not_stopped_is_not_met() -> None:
    records = good_run()
    records[2] = rec(3, "ab", "succeeded", 0.5)
    targets = judge(records, BASE, LIMITS)
    poison = next(t for t in targets if t.name == "poison")
    assert poison.met is False and "round 3 (ab) succeeded" in poison.text and "NOT MET" in poison.line()
    assert verdict(targets) == "TARGETS NOT MET"


def test_a_poisoned_round_without_a_run_is_not_stopped() -> None:
    records = good_run()
    records[4] = rec(5, "thumbs", "-", 0.9)  # its feedback still waits: a later run would train on it
    assert by_name(records)["poison"] is False


def test_the_trait_must_be_reached_within_the_limit() -> None:
    late = [rec(i, heldout=0.5) for i in range(1, 11)] + [rec(11, heldout=0.95)]
    assert by_name(late)["trait"] is False
    assert by_name(late, limits=Limits(within=11, max_kl_per_token=0.05))["trait"] is True
    assert by_name([rec(1, heldout=0.899)])["trait"] is False


def test_drift_judges_the_last_figures_and_needs_a_limit() -> None:
    assert by_name([rec(1), rec(2, ppl_vs_base=0.051)])["drift"] is False
    assert by_name([rec(1), rec(2, kl_per_token=0.06)])["drift"] is False
    assert by_name([rec(1, ppl_vs_base=0.2), rec(2, ppl_vs_base=0.05, kl_per_token=0.05)])["drift"] is True
    unknown = judge([rec(1)], BASE, Limits(max_kl_per_token=None))
    assert unknown[1].met is None and "limit unknown" in unknown[1].text and unknown[1].line().endswith("not judged")


def test_a_round_without_figures_keeps_the_weights_of_the_round_before() -> None:
    # round 2 was rolled back and reported no drift: the live weights are round 1's
    records = [rec(1, kl_per_token=0.01), rec(2, "clean", "rolled_back", 0.6, kl_per_token=None, ppl_vs_base=None)]
    assert by_name(records)["drift"] is True
    records = [rec(1, kl_per_token=0.09), rec(2, "clean", "-", 0.6, kl_per_token=None)]
    assert by_name(records)["drift"] is False


def test_drift_falls_back_to_canary_perplexity_against_the_base() -> None:
    records = [rec(1, ppl_vs_base=None, perplexity=10.6)]
    targets = judge(records, BASE, LIMITS)
    assert targets[1].met is False and "+6.0 %" in targets[1].text


def test_health_allows_five_points_over_the_base() -> None:
    assert by_name([rec(1, stutter=0.07, collapse=0.25)])["health"] is True
    assert by_name([rec(1, stutter=0.071)])["health"] is False
    assert by_name([rec(1, collapse=0.26)])["health"] is False
    assert by_name([rec(1)], base=Base(heldout_rate=0.3))["health"] is None


def test_false_stops_allow_one_good_round_in_twenty() -> None:
    one = [rec(i) for i in range(1, 18)] + [rec(18, "clean", "rolled_back")]
    assert by_name(one)["false stops"] is True
    two = one + [rec(19, "clean", "rejected")]
    assert by_name(two)["false stops"] is False
    assert by_name([rec(i, status="rejected" if i == 40 else "succeeded") for i in range(1, 41)])["false stops"]
    # poisoned and mixed rounds are not good rounds; a round without a run is not counted
    assert by_name([rec(1, "mixed", "rejected"), rec(2, "ab", "rejected"), rec(3, status="-"),
                    rec(4)])["false stops"] is True


def test_without_poisoned_rounds_the_poison_target_is_not_judged() -> None:
    targets = judge([rec(1, heldout=0.95)], BASE, LIMITS)
    assert targets[3].met is None and "--poison" in targets[3].text
    assert verdict(targets) == "TARGETS NOT ALL JUDGED (1 without figures)"


def test_a_poisoned_round_whose_own_feedback_was_all_quarantined_is_stopped() -> None:
    """The screen held back every item of the round that the run took up and trained on the rest of the batch
    (an earlier round's feedback given back by a failed run): the poison never reached the weights."""
    records = good_run()
    records[2] = rec(3, "ab", "succeeded", 0.8, own_taken=19, own_quarantined=19)
    targets = judge(records, BASE, LIMITS)
    poison = next(t for t in targets if t.name == "poison")
    assert poison.met is True and "round 3 (ab) succeeded, its 19 items quarantined before the write" in poison.text
    records[2] = rec(3, "ab", "succeeded", 0.8, own_taken=19, own_quarantined=18)  # one poisoned pair trained
    assert by_name(records)["poison"] is False
    records[2] = rec(3, "ab", "failed", 0.8, own_taken=0, own_quarantined=0)  # nothing of it taken up: not stopped
    assert by_name(records)["poison"] is False


def test_a_good_round_whose_feedback_was_all_quarantined_is_a_false_stop() -> None:
    records = [rec(i) for i in range(1, 21)]
    records[4] = rec(5, own_taken=10, own_quarantined=10)
    false_stops = next(t for t in judge(records, BASE, LIMITS) if t.name == "false stops")
    assert false_stops.met is True and "1 of 20 good rounds rejected, rolled back or withheld (rounds 5)" in \
        false_stops.text
    records[9] = rec(10, "clean", "rejected")
    assert by_name(records)["false stops"] is False
