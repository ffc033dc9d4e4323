"""Krippendorff's alpha (loop/feedback/agreement.py) against published and hand-computed values, its degenerate
cases, and each rater's agreement rate.

Run: .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/feedback/test_agreement.py
"""

from __future__ import annotations

import pytest

from loop.feedback.agreement import krippendorff_alpha, per_rater_agreement

# K. Krippendorff, "Computing Krippendorff's Alpha-Reliability" (2011), section C: 4 observers x 12 units with
# missing values ("." below). Per unit, the values the observers gave:
#   unit:   1  2  3  4  5  6  7  8  9 10 11 12
#   A:      1  2  3  3  2  1  4  1  2  .  .  .
#   B:      1  2  3  3  2  2  4  1  2  5  .  3
#   C:      .  3  3  3  2  3  4  2  2  5  1  .
#   D:      1  2  3  3  2  4  4  1  2  5  1  .
# Unit 12 has one value and is not pairable; n = 40 pairable values. The paper gives alpha = 0.743 (nominal) and
# 0.849 (interval).
PAPER_UNITS = [[1, 1, 1], [2, 2, 3, 2], [3, 3, 3, 3], [3, 3, 3, 3], [2, 2, 2, 2], [1, 2, 3, 4], [4, 4, 4, 4],
               [1, 1, 2, 1], [2, 2, 2, 2], [5, 5, 5], [1, 1], [3]]


def test_the_papers_nominal_example() -> None:
    a = krippendorff_alpha(PAPER_UNITS, "nominal")
    assert round(a.alpha, 3) == 0.743 and a.items == 11 and a.values == 40


def test_the_papers_interval_example() -> None:
    a = krippendorff_alpha(PAPER_UNITS, "interval")
    assert round(a.alpha, 3) == 0.849 and a.items == 11 and a.values == 40


def test_a_small_example_by_hand() -> None:
    """Thumbs (+1/-1) of three answers by two raters: [up, up], [up, down], [down, down].
    Coincidences (each unit has m=2, so each ordered pair weighs 1): o(up,up)=2, o(down,down)=2,
    o(up,down)=o(down,up)=1; n_up = n_down = 3, n = 6.
    Nominal: alpha = 1 - (n-1) * sum o*d / sum n_c n_k d = 1 - 5 * 2 / (3*3 + 3*3) = 1 - 10/18 = 4/9.
    Interval on +1/-1 (d = 4 between them): 1 - 5 * 8 / (2 * 9 * 4) = 4/9 as well (two values: every metric
    is a rescaled nominal one)."""
    units = [[1, 1], [1, -1], [-1, -1]]
    assert krippendorff_alpha(units, "nominal").alpha == pytest.approx(4 / 9)
    assert krippendorff_alpha(units, "interval").alpha == pytest.approx(4 / 9)


def test_interval_weighs_distance_and_nominal_does_not() -> None:
    """Scores [5, 6] and [5, 9], [1, 1] by hand. Coincidences: (5,6),(6,5),(5,9),(9,5) once each, (1,1) twice;
    n_1 = 2, n_5 = 2, n_6 = 1, n_9 = 1, n = 6.
    Interval: sum o*d = 2*1 + 2*16 = 34; sum n_c n_k d over ordered pairs = 2*(2*2*16 + 2*1*25 + 2*1*64 + 2*1*1
    + 2*1*16 + 1*1*9) = 2*(64 + 50 + 128 + 2 + 32 + 9) = 570; alpha = 1 - 5*34/570 = 40/57.
    Nominal: sum o*d = 4; sum n_c n_k d = 6^2 - (4 + 4 + 1 + 1) = 26; alpha = 1 - 5*4/26 = 3/13."""
    units = [[5, 6], [5, 9], [1, 1]]
    assert krippendorff_alpha(units, "interval").alpha == pytest.approx(40 / 57)
    assert krippendorff_alpha(units, "nominal").alpha == pytest.approx(3 / 13)


def test_perfect_agreement_with_variation_is_one() -> None:
    assert krippendorff_alpha([[1, 1, 1], [-1, -1], [1, 1]], "nominal").alpha == pytest.approx(1.0)


def test_systematic_disagreement_is_below_zero() -> None:
    assert krippendorff_alpha([[1, -1], [-1, 1], [1, -1]], "nominal").alpha < 0


def test_all_the_same_value_is_undefined() -> None:
    """No variation: the expected disagreement is 0 and the definition gives 0/0."""
    a = krippendorff_alpha([[1, 1], [1, 1, 1]], "nominal")
    assert a.alpha is None and a.items == 2 and a.values == 5


def test_one_rater_per_unit_is_undefined() -> None:
    a = krippendorff_alpha([[1], [-1], [5]], "interval")
    assert (a.alpha, a.items, a.values) == (None, 0, 0)
    assert krippendorff_alpha([], "nominal").alpha is None


def test_an_unknown_metric_is_refused() -> None:
    with pytest.raises(ValueError, match="metric"):
        krippendorff_alpha([[1, 2]], "ordinal")  # type: ignore[arg-type]


def test_per_rater_agreement_counts_pairs_with_each_other_rater() -> None:
    units = {"a": {"ann": 1, "bob": 1, "cy": -1}, "b": {"ann": -1, "bob": 1}, "c": {"ann": 1}}
    got = {r: (x.items, x.pairs, x.agreed, x.rate) for r, x in per_rater_agreement(units).items()}
    assert got == {"ann": (2, 3, 1, 1 / 3), "bob": (2, 3, 1, 1 / 3), "cy": (1, 2, 0, 0.0)}


def test_a_rater_with_nothing_shared_is_absent() -> None:
    assert per_rater_agreement({"a": {"ann": 1}}) == {}
