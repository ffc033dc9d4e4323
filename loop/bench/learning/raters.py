"""The synthetic raters of `loop bench learning`: each wants one trait of an answer and rates by it alone.

A rater has `approve(candidate) -> bool` (the trait; a candidate is what `POST /api/candidates` returns: at least
"content" and "finish_reason") and `pick(a, b) -> "a" | "b" | "tie"` for an A/B comparison: an approved answer beats
an unapproved one; two approved answers are a tie (the rater has nothing left to prefer); two unapproved ones go to
`secondary`, a tie unless the rater says why it prefers one. The traits were chosen on SmolLM2-135M-Instruct's own
answers to the bench's prompts: each holds for a minority of them (so there is something to learn) without being
rare (so the first rounds give pairs), and each can hold on every prompt without forcing one degenerate answer.

- short  (LENGTH): the answer finished by itself (finish_reason "stop") within 25 words.
- direct (FORMAT): the answer opens with a one-sentence direct answer: a plain statement of at most 12 words that
  ends with a full stop (not a list marker, no markdown), whatever follows it.
- number (CONTENT): the answer mentions a number: a numeral ("4", "3.5", "1990s", "100°C") or a number word
  ("two" ... "billion", "zero"); "one" is left out (mostly a pronoun: "one of the"), and so are numbered list
  markers ("1. ") and digits inside words ("H2O"), so a list or a formula does not count as mentioning a number.

Tests: `.venv/bin/python -m pytest -q tests/unit/bench/test_learning_raters.py`.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Mapping
from typing import Any

Candidate = Mapping[str, Any]


def words(text: str) -> int:
    return len(text.split())


def finished(cand: Candidate) -> bool:
    return cand.get("finish_reason") == "stop"


# The first sentence ends at the first . ! or ? followed by whitespace or the end of the text ("3.5" goes on).
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_LIST_MARKER = re.compile(r"^\s*(?:#+\s*)?[*_]*\s*(?:\d{1,3}[.)]|[-*•+])(?=\s|$)")
_MARKDOWN = re.compile(r"[*_#`|]")


def first_sentence(text: str) -> str | None:
    """The text up to its first sentence end, or None when no sentence ends (an answer cut off mid-sentence)."""
    text = text.strip()
    m = _SENTENCE_END.search(text)
    return text[:m.end()] if m else None


class Rater(abc.ABC):
    """Approved beats unapproved; two approved: tie; two unapproved: `secondary` (tie here)."""

    name = "rater"
    trait = "what the rater approves"

    @abc.abstractmethod
    def approve(self, cand: Candidate) -> bool:
        """Whether the answer has the trait this rater wants."""

    def secondary(self, a: Candidate, b: Candidate) -> str:
        return "tie"

    def pick(self, a: Candidate, b: Candidate) -> str:
        ok_a, ok_b = self.approve(a), self.approve(b)
        if ok_a != ok_b:
            return "a" if ok_a else "b"
        return "tie" if ok_a else self.secondary(a, b)


class ShortRater(Rater):
    name = "short"

    def __init__(self, max_words: int = 25) -> None:
        self.max_words = max_words
        self.trait = f"finishes by itself within {max_words} words"

    def approve(self, cand: Candidate) -> bool:
        return finished(cand) and words(cand["content"]) <= self.max_words

    def secondary(self, a: Candidate, b: Candidate) -> str:
        """Of two long answers a finished one beats a cut-off one, then the shorter wins: every step toward the
        trait is rewarded (the configuration docs/measurements.md's earlier learning runs measured)."""
        la, lb = (words(x["content"]) + (0 if finished(x) else 1000) for x in (a, b))
        return "tie" if la == lb else "a" if la < lb else "b"


class DirectRater(Rater):
    """No secondary rule: how far a long first sentence is from 12 words says little about whether the answer is
    direct, and a tie teaches nothing rather than something the trait rate does not measure."""

    name = "direct"

    def __init__(self, max_words: int = 12) -> None:
        self.max_words = max_words
        self.trait = f"opens with a plain statement of at most {max_words} words ending in a full stop"

    def approve(self, cand: Candidate) -> bool:
        text = cand["content"]
        first = first_sentence(text)
        return (first is not None and first.endswith(".") and 1 <= words(first) <= self.max_words
                and not _LIST_MARKER.match(text) and not _MARKDOWN.search(first))


_NUMERAL = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?:st|nd|rd|th|s)?(?!\w)")
_NUMBER_WORD = re.compile(
    r"\b(?:zero|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen|"
    r"seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety|hundred|thousand|"
    r"million|billion)s?\b", re.IGNORECASE)
_LIST_MARKERS = re.compile(r"^\s*(?:#+\s*)?[*_]*\s*\d{1,3}[.)](?=\s|$)", re.MULTILINE)


class NumberRater(Rater):
    """No secondary rule: an answer without a number is no nearer to one than another."""

    name = "number"
    trait = "mentions a number (a numeral or a number word other than 'one'; list markers do not count)"

    def approve(self, cand: Candidate) -> bool:
        text = _LIST_MARKERS.sub(" ", cand["content"])
        return bool(_NUMERAL.search(text) or _NUMBER_WORD.search(text))


RATERS: dict[str, type[Rater]] = {r.name: r for r in (ShortRater, DirectRater, NumberRater)}


def make_rater(name: str, *, max_words: int | None = None) -> Rater:
    """The rater called `name`; `max_words` overrides the short rater's word limit."""
    if name not in RATERS:
        raise ValueError(f"unknown rater {name!r}; choose one of {', '.join(RATERS)}")
    cls = RATERS[name]
    if max_words is not None and cls is ShortRater:
        return ShortRater(max_words)
    return cls()
