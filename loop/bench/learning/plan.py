"""Which rounds of `loop bench learning` are poisoned or mixed, from `--poison KIND:N` and `--mixed N`.

Round kinds: "clean" (the rater's own A/B picks), "ab" (that round's A/B picks flipped), "thumbs" (that round rated
with thumbs instead, flipped: an approved answer gets a thumbs down, an unapproved one a thumbs up) and "mixed"
(A/B picks by two accounts, "honest" and "hostile", half the prompts each, the hostile ones flipped). Rounds are
numbered from 1; one round has one kind.

Tests: `.venv/bin/python -m pytest -q tests/unit/bench/test_learning_plan.py`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

POISON_KINDS = ("ab", "thumbs")
KINDS = ("clean", *POISON_KINDS, "mixed")


def parse_poison(text: str) -> tuple[str, int]:
    """`ab:N` or `thumbs:N` -> (kind, N); an argparse type, so a bad value names the flag and what to send."""
    kind, sep, number = text.strip().partition(":")
    if not sep or kind not in POISON_KINDS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KIND:ROUND with KIND one of {', '.join(POISON_KINDS)}, "
                                         "e.g. ab:4 or thumbs:8")
    return kind, parse_round(number)


def parse_round(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a round number (rounds count from 1)") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"round {n}: rounds count from 1")
    return n


def plan_rounds(rounds: int, poison: Iterable[tuple[str, int]] = (), mixed: Iterable[int] = ()) -> list[str]:
    """The kind of each round 1..rounds (index 0 is round 1). ValueError for a round past the last or given twice."""
    if rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {rounds}")
    plan = ["clean"] * rounds
    for kind, n in [*poison, *(("mixed", n) for n in mixed)]:
        if n > rounds:
            raise ValueError(f"{kind} round {n} is past the last round ({rounds}); raise --rounds or pick an "
                             "earlier round")
        if plan[n - 1] != "clean":
            raise ValueError(f"round {n} is given twice ({plan[n - 1]} and {kind}); one round has one kind")
        plan[n - 1] = kind
    return plan
