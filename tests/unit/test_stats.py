"""The sign-flip test of the pre-write screen (loop/stats.py `sign_flip_p`): exact for small n (checked against a
hand enumeration), calibrated under symmetric nulls of several shapes (the rejection rate at alpha never exceeds
alpha by more than binomial noise), powerful against a batch that all pulls back, and defined at the edges.
Its mix of pairs and thumbs (`label_test_p`): calibrated for a rater who says "down" to most answers whatever
they say (where a coin per thumb misfires), powerful against flipped thumbs, and the sign-flip test without them.
Several directions at once (`joint_label_test_p`): calibrated whatever their correlation, and as strong as the
stronger one where their sum is not."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from loop.stats import joint_label_test_p, label_test_p, sign_flip_p, turned_p


def by_hand(values: list[float]) -> float:
    """P(sum of e_i |v_i| <= sum v_i) over all 2^n sign patterns, counted one by one."""
    observed = sum(values)
    patterns = list(itertools.product((1, -1), repeat=len(values)))
    hits = sum(sum(e * abs(v) for e, v in zip(signs, values)) <= observed + 1e-12 for signs in patterns)
    return hits / len(patterns)


@pytest.mark.parametrize("values", [
    [1.0], [-1.0], [2.0, -1.0], [-3.0, 1.0, 0.5], [0.4, -0.1, -0.2, 0.3, -0.25],
    [1.0, -1.0, 1.0, -1.0],  # ties between patterns count as <= T
    [-0.7, 1.3, -2.1, 0.2, -0.05, 0.9, -1.1],
])
def test_small_batches_are_exact(values: list[float]) -> None:
    assert sign_flip_p(values) == pytest.approx(by_hand(values), abs=1e-15)


def test_the_exact_values_of_small_cases() -> None:
    assert sign_flip_p([-1.0]) == 0.5 and sign_flip_p([1.0]) == 1.0
    assert sign_flip_p([2.0, -1.0]) == 0.75  # patterns: +3, +1, -1, -3; T = +1
    assert sign_flip_p([-2.0, 1.0]) == 0.5  # T = -1: -1 and -3
    assert sign_flip_p([1.0, -1.0]) == 0.75  # T = 0: +0 twice and -2


def test_all_negative_is_the_smallest_p_the_batch_allows() -> None:
    rng = random.Random(1)
    assert sign_flip_p([-rng.uniform(0.1, 5) for _ in range(12)]) == 1 / 4096
    assert sign_flip_p([rng.uniform(0.1, 5) for _ in range(12)]) == 1.0


def test_large_batches_are_sampled_reproducibly_and_never_below_one_over_draws() -> None:
    rng = random.Random(2)
    values = [-rng.expovariate(1.0) for _ in range(40)]
    assert sign_flip_p(values, draws=999, seed=7) == 1 / 1000  # (1 + 0) / (1 + draws)
    mixed = [rng.gauss(0, 1) for _ in range(40)]
    p = sign_flip_p(mixed, draws=2000, seed=3)
    assert p == sign_flip_p(mixed, draws=2000, seed=3)
    assert 0 < p <= 1 and p * 2001 == pytest.approx(round(p * 2001))  # (1 + hits) / (1 + draws)
    # the sampled p estimates the exact one: 17 values, 2^17 patterns, checked against a near-exact sample
    seventeen = [rng.gauss(-0.3, 1) for _ in range(17)]
    assert sign_flip_p(seventeen, draws=200_000, seed=1) == pytest.approx(by_hand(seventeen), abs=0.005)


def test_zeros_carry_no_sign_and_empty_means_nothing_to_judge() -> None:
    assert sign_flip_p([]) == 1.0
    assert sign_flip_p([0.0, 0.0, 0.0]) == 1.0
    assert sign_flip_p([0.0, -1.0, 0.0, -2.0]) == sign_flip_p([-1.0, -2.0]) == 0.25
    # 20 entries but only 3 non-zero: still enumerated exactly
    assert sign_flip_p([0.0] * 17 + [-1.0, -1.0, -1.0]) == 1 / 8


def test_non_finite_values_and_no_draws_are_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        sign_flip_p([1.0, math.nan])
    with pytest.raises(ValueError, match="finite"):
        sign_flip_p([-math.inf])
    with pytest.raises(ValueError, match="draws"):
        sign_flip_p([1.0] * 20, draws=0)


NULLS = {  # symmetric about zero: each value's sign is a fair coin given its magnitude
    "normal": lambda r: r.gauss(0, 1),
    "cauchy": lambda r: math.tan(math.pi * (r.random() - 0.5)),  # heavy tails: one value can dominate the sum
    "scaled": lambda r: r.choice((-1, 1)) * r.lognormvariate(0, 2),  # magnitudes over orders of magnitude
}


@pytest.mark.parametrize("shape", sorted(NULLS))
@pytest.mark.parametrize("n", [6, 12, 24, 64])
def test_calibrated_under_symmetric_nulls(shape: str, n: int) -> None:
    alpha, trials = 0.05, 400
    rng = random.Random(f"{shape}-{n}")
    draw = NULLS[shape]
    rejected = sum(sign_flip_p([draw(rng) for _ in range(n)], draws=999, seed=t) <= alpha for t in range(trials))
    noise = 3 * math.sqrt(alpha * (1 - alpha) / trials)
    assert rejected / trials <= alpha + noise  # never above alpha by more than noise
    # and not far below it either: the test uses its level (n=6 allows p in steps of 1/64, so 3/64 at most)
    floor = (3 / 64 if n == 6 else alpha) - noise
    assert rejected / trials >= floor


def test_tied_magnitudes_stay_at_or_below_the_level() -> None:
    """Values of a few magnitudes (many exact ties): the test is conservative, never liberal."""
    rng = random.Random(5)
    trials = 400
    for n in (8, 30):
        rejected = sum(sign_flip_p([rng.choice((-1, 1)) * rng.choice((1.0, 2.0)) for _ in range(n)],
                                   draws=999, seed=t) <= 0.05 for t in range(trials))
        assert rejected / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)


def _honest_but_grumpy(rng: random.Random, n: int, up_share: float) -> tuple[list[float], list[int]]:
    """Thumbs independent of the answers: every answer one the model learned to say (g > 0), a rater who gives
    `up_share` ups; the screen's figure of a thumb is thumb * g."""
    g = [abs(rng.gauss(1.0, 0.6)) for _ in range(n)]
    y = [1 if rng.random() < up_share else -1 for _ in range(n)]
    return [gi * yi for gi, yi in zip(g, y)], y


def test_thumbs_are_exchanged_not_flipped_so_a_grumpy_honest_rater_is_not_poison() -> None:
    rng = random.Random(7)
    trials, alpha = 400, 0.05
    coin = label = 0
    for k in range(trials):
        values, thumbs = _honest_but_grumpy(rng, 24, 0.2)
        coin += sign_flip_p(values, draws=499, seed=k) < alpha
        label += label_test_p(values, thumbs, draws=499, seed=k) < alpha
    assert coin / trials > 0.5  # a coin per thumb reads most of this honest rater's rounds as poison
    assert label / trials <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)


def test_flipped_thumbs_and_pairs_together_are_caught() -> None:
    rng = random.Random(3)
    g = [rng.gauss(0.0, 1.0) for _ in range(30)]
    flipped = [-1 if gi > 0 else 1 for gi in g]  # downs on what was learned, ups on what was unlearned
    assert label_test_p([gi * yi for gi, yi in zip(g, flipped)], flipped) < 0.001
    honest = [-y for y in flipped]
    assert label_test_p([gi * yi for gi, yi in zip(g, honest)], honest) > 0.5
    # two flipped pairs alone cannot reach 0.01; with the rater's thumbs they do
    assert label_test_p([-1.0, -2.0], [None, None]) == 0.25
    values = [-1.0, -2.0] + [gi * yi for gi, yi in zip(g[:10], flipped[:10])]
    assert label_test_p(values, [None, None] + flipped[:10]) < 0.01


def test_without_both_kinds_of_thumb_it_is_the_sign_flip_test_of_the_pairs() -> None:
    pairs = [-0.7, 1.3, -2.1, 0.2]
    assert label_test_p(pairs, [None] * 4) == sign_flip_p(pairs)
    assert label_test_p(pairs + [3.0, 1.0], [None] * 4 + [-1, -1]) == sign_flip_p(pairs)  # no shuffle moves them
    assert label_test_p([3.0, -1.0], [1, 1]) == 1.0 and label_test_p([], []) == 1.0
    with pytest.raises(ValueError, match="labels"):
        label_test_p([1.0], [])
    with pytest.raises(ValueError, match="thumb up"):
        label_test_p([1.0], [2])
    with pytest.raises(ValueError, match="finite"):
        label_test_p([math.nan, 1.0], [1, -1])


def test_turned_p_is_the_exact_binomial_tail() -> None:
    assert turned_p(0, 0) == 1.0 and turned_p(0, 5) == 1.0
    assert turned_p(1, 0) == 0.5  # one pair of eight turning wrong, none right: a coin
    assert turned_p(5, 0) == pytest.approx(1 / 32) and turned_p(7, 0) == pytest.approx(1 / 128)
    assert turned_p(4, 1) == pytest.approx(6 / 32)  # P(X >= 4), X ~ Bin(5, 1/2)
    with pytest.raises(ValueError, match="non-negative"):
        turned_p(-1, 2)


def test_turned_p_is_calibrated_when_pairs_turn_either_way_at_random() -> None:
    rng = random.Random(3)
    rounds, fired = 2000, 0
    for _ in range(rounds):
        turned = rng.randint(0, 12)
        wrong = sum(rng.random() < 0.5 for _ in range(turned))
        fired += turned_p(wrong, turned - wrong) < 0.05
    assert fired / rounds <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / rounds)


def test_joint_test_of_one_direction_is_the_label_test() -> None:
    values, thumbs = [-0.7, 1.3, -2.1, 0.2, 3.0, -1.0], [None, None, None, None, 1, -1]
    assert joint_label_test_p([values], thumbs) == label_test_p(values, thumbs)
    # a direction with nothing to move is left out: the other one decides alone
    assert joint_label_test_p([values, [0.0] * 6], thumbs) == label_test_p(values, thumbs)
    assert joint_label_test_p([[0.0] * 3], [None] * 3) == 1.0 and joint_label_test_p([[], []], []) == 1.0
    with pytest.raises(ValueError, match="one value per label"):
        joint_label_test_p([values, values[:-1]], thumbs)
    with pytest.raises(ValueError, match="finite"):
        joint_label_test_p([values, [math.inf] * 6], thumbs)


def _null_batch(rng: random.Random, n_pairs: int, n_thumbs: int, rho: float) -> tuple[list[list[float]], list]:
    """Labels independent of the figures along two directions correlated by `rho`; the thumbs of a rater who gives
    mostly downs, on answers the model made likelier."""
    def two() -> tuple[float, float]:
        a, b = rng.gauss(0, 1), rng.gauss(0, 1)
        return a, rho * a + math.sqrt(1 - rho * rho) * b

    pairs = [two() for _ in range(n_pairs)]
    signs = [rng.choice((-1, 1)) for _ in range(n_pairs)]
    g = [(abs(rng.gauss(1, 0.6)), abs(rng.gauss(1, 0.6)) * rng.lognormvariate(0, 1)) for _ in range(n_thumbs)]
    y = [1 if rng.random() < 0.25 else -1 for _ in range(n_thumbs)]
    dirs = [[e * p[k] for e, p in zip(signs, pairs)] + [t * gi[k] for t, gi in zip(y, g)] for k in (0, 1)]
    return dirs, [None] * n_pairs + y


@pytest.mark.parametrize("rho", [0.0, 0.6, -0.5])
def test_joint_test_is_calibrated_whatever_the_directions_correlation(rho: float) -> None:
    rng = random.Random(f"joint-{rho}")
    alpha, trials = 0.05, 300
    rejected = 0
    for t in range(trials):
        dirs, thumbs = _null_batch(rng, 10, 14, rho)
        rejected += joint_label_test_p(dirs, thumbs, draws=499, seed=t) <= alpha
    assert rejected / trials <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)
    assert rejected / trials >= alpha - 3 * math.sqrt(alpha * (1 - alpha) / trials)  # it uses its level


def test_joint_test_keeps_the_stronger_directions_power_where_their_sum_loses_it() -> None:
    """The failure the default screen had: flipped pairs read clearly along what was learned (v) while the anchors'
    gradient (g) says little about them; the unit sum carries g's noise and sometimes misses at 0.01."""
    sum_missed = 0
    for seed in range(40):
        rng = random.Random(seed)
        n = 17
        v = [-abs(rng.gauss(1.0, 0.3)) for _ in range(n)]  # every flipped pair pulls back along v
        g = [rng.gauss(0.0, 1.0) for _ in range(n)]
        nv, ng = math.sqrt(sum(x * x for x in v)), math.sqrt(sum(x * x for x in g))
        unit_sum = [a / nv + b / ng for a, b in zip(v, g)]
        pairs = [None] * n
        sum_missed += label_test_p(unit_sum, pairs, seed=seed) >= 0.01
        joint = joint_label_test_p([unit_sum, v, g], pairs, seed=seed)
        assert joint < 0.01 and joint <= 3 * label_test_p(v, pairs, seed=seed)  # at most Bonferroni's price
    assert sum_missed >= 1  # the case is one where the sum alone lets a batch through
