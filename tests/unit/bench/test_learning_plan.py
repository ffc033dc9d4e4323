"""`loop bench learning`'s round plan: `--poison KIND:N` and `--mixed N` parsing and the kind of every round."""

from __future__ import annotations

import argparse

import pytest

from loop.bench.learning.plan import parse_poison, parse_round, plan_rounds
from loop.cli import build_parser, main


def test_parse_poison_reads_kind_and_round() -> None:
    assert parse_poison("ab:4") == ("ab", 4)
    assert parse_poison(" thumbs:12 ") == ("thumbs", 12)


@pytest.mark.parametrize(("text", "message"), [
    ("ab", "KIND:ROUND"), ("kto:3", "ab, thumbs"), ("ab:x", "not a round number"), ("ab:0", "count from 1"),
    ("thumbs:-2", "count from 1"), (":3", "KIND:ROUND"),
])
def test_parse_poison_refuses_bad_values_and_says_what_to_send(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_poison(text)


def test_parse_round_counts_from_one() -> None:
    assert parse_round("1") == 1
    with pytest.raises(argparse.ArgumentTypeError, match="count from 1"):
        parse_round("0")


def test_plan_marks_each_special_round_once() -> None:
    assert plan_rounds(3) == ["clean"] * 3
    assert plan_rounds(5, [("ab", 2), ("thumbs", 5)], [3]) == ["clean", "ab", "mixed", "clean", "thumbs"]
    with pytest.raises(ValueError, match="past the last round"):
        plan_rounds(3, [("ab", 4)])
    with pytest.raises(ValueError, match="given twice"):
        plan_rounds(5, [("ab", 2), ("thumbs", 2)])
    with pytest.raises(ValueError, match="given twice"):
        plan_rounds(5, [("ab", 2)], [2])
    with pytest.raises(ValueError, match="at least 1"):
        plan_rounds(0)


def test_cli_takes_both_poison_kinds_and_a_mixed_round() -> None:
    args = build_parser().parse_args(["bench", "learning", "--rater", "number", "--rounds", "20", "--poison", "ab:4",
                                      "--poison", "thumbs:8", "--mixed", "12", "--scheduler-set", "margin_alpha=0.05"])
    assert (args.rater, args.rounds, args.poison, args.mixed) == ("number", 20, [("ab", 4), ("thumbs", 8)], [12])
    assert args.scheduler_set == [("margin_alpha", 0.05)]
    defaults = build_parser().parse_args(["bench", "learning"])
    assert (defaults.poison, defaults.mixed, defaults.scheduler_set, defaults.holdout) == ([], [], [], None)


def test_cli_refuses_a_plan_past_the_last_round_before_starting_anything(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "learning", "--rounds", "3", "--poison", "ab:4"]) == 2
    assert "past the last round" in capsys.readouterr().err
    assert main(["bench", "learning", "--heldout", "0"]) == 2
    assert "--heldout must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "learning", "--poison", "flip:2"])
    assert "ab, thumbs" in capsys.readouterr().err
