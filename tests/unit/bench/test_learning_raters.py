"""The synthetic raters of `loop bench learning` (loop/bench/learning/raters.py): each trait on hand-made answers,
its edge cases, and the A/B pick rule (approved beats unapproved; two approved tie; two unapproved: secondary)."""

from __future__ import annotations

import pytest

from loop.bench.learning.raters import (
    RATERS,
    DirectRater,
    NumberRater,
    ShortRater,
    first_sentence,
    make_rater,
)


def ans(content: str, finish: str = "stop") -> dict[str, str]:
    return {"content": content, "finish_reason": finish}


def test_short_approves_finished_answers_within_the_word_limit() -> None:
    r = ShortRater(max_words=5)
    assert r.approve(ans("Paris is the capital."))
    assert r.approve(ans("one two three four five"))
    assert not r.approve(ans("one two three four five six"))
    assert not r.approve(ans("Paris", finish="length"))  # cut off: not finished, however short
    assert not r.approve(ans("Paris", finish=None))  # type: ignore[arg-type]


def test_short_prefers_finished_then_shorter_among_unapproved() -> None:
    r = ShortRater(max_words=3)
    long_done, longer_done, cut = ans("a b c d e"), ans("a b c d e f g"), ans("a b c d", finish="length")
    assert r.pick(long_done, cut) == "a" and r.pick(cut, long_done) == "b"
    assert r.pick(longer_done, long_done) == "b"
    assert r.pick(long_done, ans("e d c b a")) == "tie"
    assert r.pick(ans("Paris."), ans("It is Paris.")) == "tie"  # both approved
    assert r.pick(ans("Paris."), long_done) == "a" and r.pick(long_done, ans("Paris.")) == "b"


def test_first_sentence_ends_at_a_terminator_followed_by_space_or_the_end() -> None:
    assert first_sentence("  Paris. It is big.") == "Paris."
    assert first_sentence("It has 3.5 legs. Yes.") == "It has 3.5 legs."
    assert first_sentence("Really? Yes.") == "Really?"
    assert first_sentence("cut off mid") is None
    assert first_sentence("") is None


@pytest.mark.parametrize(("content", "finish", "approved"), [
    ("The capital of France is Paris.", "stop", True),
    ("Paris.", "stop", True),
    ("The capital of France is Paris. It has a long history and many museums and", "length", True),
    ("The capital of France, a large country in western Europe with a long history, is Paris.", "stop", False),
    ("one two three four five six seven eight nine ten eleven twelve.", "stop", True),
    ("one two three four five six seven eight nine ten eleven twelve thirteen.", "stop", False),
    ("Paris!", "stop", False),  # an exclamation, not a plain statement
    ("Is it Paris? Yes.", "stop", False),
    ("1. Paris is the capital.", "stop", False),  # a list opening is not a direct answer
    ("- Paris is the capital.", "stop", False),
    ("**Paris** is the capital.", "stop", False),  # markdown
    ("The capital of France is Paris", "length", False),  # no sentence ends
    ("", "stop", False),
])
def test_direct_approves_a_short_plain_first_sentence(content: str, finish: str, approved: bool) -> None:
    assert DirectRater().approve(ans(content, finish)) is approved


def test_direct_ties_two_unapproved_answers() -> None:
    r = DirectRater()
    assert r.pick(ans("Paris!"), ans("1. Paris")) == "tie"
    assert r.pick(ans("Paris!"), ans("Paris.")) == "b"


@pytest.mark.parametrize(("content", "approved"), [
    ("A spider has 8 legs.", True),
    ("A spider has eight legs.", True),
    ("Water boils at 100°C.", True),
    ("It is about 3.5 metres tall.", True),
    ("Hundreds of birds live there.", True),
    ("It happened in the 1990s.", True),
    ("The first month is January.", False),  # an ordinal word is not counted
    ("Zero.", True),
    ("It is one of the largest animals.", False),  # 'one' is left out: mostly a pronoun
    ("The symbol is H2O.", False),  # a digit inside a word
    ("1. Paris\n2. Rome", False),  # list markers do not count
    ("1. It has 4 legs.", True),  # a list whose item names a number does
    ("Someone tall.", False),  # 'one' inside a word
    ("Paris is the capital of France.", False),
])
def test_number_approves_a_numeral_or_number_word(content: str, approved: bool) -> None:
    assert NumberRater().approve(ans(content)) is approved


def test_number_ignores_how_the_answer_ended_and_ties_two_unapproved() -> None:
    r = NumberRater()
    assert r.approve(ans("It has 8 legs and", finish="length"))
    assert r.pick(ans("Blue."), ans("The sky.")) == "tie"
    assert r.pick(ans("Two."), ans("Three.")) == "tie"
    assert r.pick(ans("Blue."), ans("About 450 nm.")) == "b"


def test_make_rater_names_every_rater_and_refuses_an_unknown_one() -> None:
    assert set(RATERS) == {"short", "direct", "number"}
    assert all(make_rater(name).name == name for name in RATERS)
    short = make_rater("short", max_words=7)
    assert isinstance(short, ShortRater) and short.max_words == 7
    assert isinstance(make_rater("direct", max_words=7), DirectRater)
    assert make_rater("direct", max_words=7).max_words == 12  # the word limit is the short rater's
    with pytest.raises(ValueError, match="short, direct, number"):
        make_rater("kind")
