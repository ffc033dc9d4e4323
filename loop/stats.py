"""Small statistics shared by the eval guard (API process) and the training worker.

`t_statistic`: how many standard errors a mean lies from zero (the guard's per-token margins).
`sign_flip_p`: the one-sided sign-flip test of the guard's margins and of the pre-write screen's pairs;
`label_test_p`: the screen's test of a mix of pairs and thumbs (loop/worker/screen.py measures the values);
`turned_p`: the exact one-sided test that more pairs turned wrong than right (the guard's accuracy criterion).
Pure functions, no torch (numpy, which transformers brings, only inside the tests).
Tests: .venv/bin/python -m pytest -q tests/unit/test_stats.py
"""

from __future__ import annotations

import math
from collections.abc import Sequence

EXACT_UP_TO = 16  # non-zero values: up to 2^16 sign patterns are enumerated, beyond that they are sampled


def t_statistic(xs: Sequence[float]) -> float | None:
    """mean / standard error: how many standard errors the mean lies from zero (None below 2 values; +-inf when
    all values are equal and non-zero)."""
    n = len(xs)
    if n < 2:
        return None
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    if var <= 0:
        return None if mean == 0 else math.copysign(math.inf, mean)
    return mean / math.sqrt(var / n)


def turned_p(wrong: int, right: int) -> float:
    """One-sided p-value that `wrong` of the `wrong + right` pairs whose preference turned (right to wrong, or
    wrong to right) turned wrong by chance: P(X >= wrong) for X ~ Binomial(wrong + right, 1/2), the exact
    McNemar test. Under "the update did not harm these preferences" a pair that turns is as likely to turn
    either way, and pairs that did not turn carry no evidence either way. No pair turned: 1.0."""
    if wrong < 0 or right < 0:
        raise ValueError(f"counts must be non-negative, got {wrong} and {right}")
    n = wrong + right
    if n == 0:
        return 1.0
    return min(1.0, sum(math.comb(n, k) for k in range(wrong, n + 1)) / 2.0 ** n)


def sign_flip_p(values: Sequence[float], *, draws: int = 9999, seed: int = 0) -> float:
    """One-sided p-value of T = sum(values) against the sign-flip null: P(T* <= T) where T* = sum(e_i |v_i|) and
    the signs e_i are independent and +1 or -1 with probability 1/2 each. Small p: the values are more negative
    than signs drawn by a fair coin would make them.

    Why this null, and why it is exact. The screen's values are one per judged item (a DPO pair, a KTO example):
    s_i = <grad m_i, v>, the item's pull along the direction v = w_live - w_base that the kept runs taught. Swapping
    a pair's chosen and rejected answer (or a thumb's label) negates m_i and so negates s_i exactly; v is fixed by
    the past and does not depend on this batch's labels. Under the null "the labels are independent of the learned
    trait", each item's orientation is a fair coin given its content, independently across items, so given the
    magnitudes |s_i| every sign pattern is equally likely: the distribution of T under the null is exactly the
    sign-flip distribution, and P(p <= alpha) <= alpha for every alpha. Nothing is assumed about how the model's
    tensors are correlated: each s_i is one scalar that already sums over all (probed) tensors, and the
    exchangeability needed is between items, not tensors (a t statistic over per-tensor figures would need the
    tensors to be independent samples, which they are not).

    How: zeros carry no sign and are dropped. Up to EXACT_UP_TO non-zero values, all 2^n sign patterns are
    enumerated (exact). Beyond that, `draws` patterns are drawn with a generator seeded by `seed` and
    p = (1 + #{T* <= T}) / (1 + draws), a valid p-value for any number of draws (the observed pattern counts as
    one draw), deterministic for a given seed. Near-ties (within rounding of the sums) count as T* <= T, which can
    only raise p. Empty input (or only zeros): p = 1.0, nothing to judge. Non-finite values: ValueError."""
    xs = [float(v) for v in values]
    if any(not math.isfinite(x) for x in xs):
        raise ValueError("sign_flip_p needs finite values; got NaN or infinity")
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    mags = [abs(x) for x in xs if x != 0.0]
    if not mags:
        return 1.0
    import numpy as np

    a = np.asarray(mags, dtype=np.float64)
    observed = math.fsum(xs)
    tol = 1e-9 * float(a.sum())  # far above the rounding of a sum of n doubles, far below any real gap
    if len(mags) <= EXACT_UP_TO:
        sums = np.zeros(1)
        for m in a:
            sums = np.concatenate((sums + m, sums - m))
        return float(np.count_nonzero(sums <= observed + tol)) / sums.size
    rng = np.random.default_rng(seed)
    total = float(a.sum())
    rows = max(1, (1 << 22) // a.size)  # sign matrices of at most 4 Mi entries at a time
    hits, done = 0, 0
    while done < draws:
        k = min(rows, draws - done)
        negative = rng.random((k, a.size)) < 0.5
        hits += int(np.count_nonzero(total - 2.0 * (negative @ a) <= observed + tol))
        done += k
    return (1 + hits) / (1 + draws)


def label_test_p(values: Sequence[float], thumbs: Sequence[int | None], *, draws: int = 9999, seed: int = 0) -> float:
    """One-sided p-value of T = sum(values) when some values are pairs and some are thumbs: `thumbs[i]` is None for
    a pair (its value's sign is a fair coin under the null, as in `sign_flip_p`) and +1 / -1 for a thumb up / down,
    whose value is thumb * g with g = <grad log pi(answer), v> (the screen's signed figure).

    Why not a coin per thumb. A thumb is not a fair coin: a rater gives mostly ups (or mostly downs) whatever the
    learned trait, and the answers the live model samples tend to have g of one sign (they are what it learned to
    say), so sign-flipping thumbs would read a rater who simply says "down" a lot as poison. The null for thumbs is
    exchangeability: the labels are independent of the answers' content, so any permutation of the given thumbs
    over the answers is as likely as the one observed (the counts of ups and downs are kept). Small p: the thumbs
    land against the learned direction (downs on the answers it made likelier) more than shuffled thumbs would.

    How: pairs get independent random signs and thumbs a random permutation, jointly, in each of `draws` draws;
    p = (1 + #{T* <= T}) / (1 + draws) (valid for any number of draws, deterministic for a seed). Only pairs, or
    thumbs all of one kind (a permutation changes nothing), is exactly `sign_flip_p` of the pairs; then no pairs
    means p = 1.0. Non-finite values or a thumb other than +-1: ValueError."""
    if len(values) != len(thumbs):
        raise ValueError(f"{len(values)} values for {len(thumbs)} labels")
    if any(t not in (None, 1, -1) for t in thumbs):
        raise ValueError("a label is None (a pair), +1 (thumb up) or -1 (thumb down)")
    if any(not math.isfinite(float(v)) for v in values):
        raise ValueError("label_test_p needs finite values; got NaN or infinity")
    pair_values = [float(v) for v, t in zip(values, thumbs) if t is None]
    labelled = [(float(v) * t, t) for v, t in zip(values, thumbs) if t is not None]
    if len({t for _, t in labelled}) < 2:
        return sign_flip_p(pair_values, draws=draws, seed=seed)
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    import numpy as np

    p_mag = np.abs(np.asarray(pair_values, dtype=np.float64))
    g = np.asarray([x for x, _ in labelled], dtype=np.float64)
    y = np.asarray([t for _, t in labelled], dtype=np.float64)
    observed = math.fsum(values)
    tol = 1e-9 * (float(p_mag.sum()) + float(np.abs(g).sum()))
    rng = np.random.default_rng(seed)
    rows = max(1, (1 << 22) // (p_mag.size + g.size))
    hits, done = 0, 0
    while done < draws:
        k = min(rows, draws - done)
        signs = np.where(rng.random((k, p_mag.size)) < 0.5, -1.0, 1.0)
        shuffled = rng.permuted(np.broadcast_to(y, (k, y.size)), axis=1)
        hits += int(np.count_nonzero(signs @ p_mag + shuffled @ g <= observed + tol))
        done += k
    return (1 + hits) / (1 + draws)


def joint_label_test_p(directions: Sequence[Sequence[float]], thumbs: Sequence[int | None], *, draws: int = 9999,
                       seed: int = 0) -> float:
    """One-sided p-value of the batch's labels measured along several directions at once (the screen's learned
    direction, its anchors' gradient, their unit sum): small when the labels pull against any one of them.

    Why. Summing two directions into one can be weaker than either alone: a batch that reads p = 0.0001 along
    what the kept runs taught and 0.016 along the anchors can read 0.012 along their sum, because the weaker
    direction's figures add noise. Testing each at alpha / k (Bonferroni) keeps the stronger one's power but pays
    the full k for directions that mostly agree. This test pays only what their disagreement costs.

    How: each direction d gets its statistic T_d = sum of its values, standardised by its null mean and standard
    deviation (pairs: mean 0, variance sum of squares; thumbs: the permutation mean and variance of a shuffle of
    the given thumbs over the answers), which do not change under the null's moves. The statistic is the most
    negative z_d. One draw moves every direction alike (the same coin per pair, the same shuffle of the thumbs,
    as `label_test_p` draws them), so the null distribution of min_d z_d is drawn exactly, whatever the
    correlation between the directions; p = (1 + #{min z* <= min z}) / (1 + draws). A direction with nothing to
    move (every value zero, or no pairs and thumbs of one kind) is left out; one direction left is `label_test_p`
    of it, none gives p = 1.0."""
    if any(len(d) != len(thumbs) for d in directions):
        raise ValueError(f"every direction needs one value per label ({len(thumbs)} labels)")
    if any(t not in (None, 1, -1) for t in thumbs):
        raise ValueError("a label is None (a pair), +1 (thumb up) or -1 (thumb down)")
    if any(not math.isfinite(float(v)) for d in directions for v in d):
        raise ValueError("joint_label_test_p needs finite values; got NaN or infinity")
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    import numpy as np

    is_pair = np.asarray([t is None for t in thumbs], dtype=bool)
    y = np.asarray([t for t in thumbs if t is not None], dtype=np.float64)
    vals = np.asarray([[float(v) for v in d] for d in directions], dtype=np.float64).reshape(len(directions), -1)
    s = vals[:, is_pair]  # pairs: the observed figures (a coin flips each)
    g = vals[:, ~is_pair] * y  # thumbs: the label-free figure, thumb * value
    n_t = y.size
    y_var = float(y.var()) if n_t > 1 else 0.0
    mean = y.mean() * g.sum(axis=1) if n_t else np.zeros(len(directions))
    var = (s ** 2).sum(axis=1)
    if n_t > 1:
        var = var + n_t / (n_t - 1) * y_var * ((g - g.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    live = [k for k in range(len(directions)) if var[k] > 0]
    if len(live) <= 1:
        return label_test_p(list(directions[live[0]]), thumbs, draws=draws, seed=seed) if live else 1.0
    s, g, mean, sd = s[live], g[live], mean[live], np.sqrt(var[live])
    observed = float(((vals[live].sum(axis=1) - mean) / sd).min())
    rng = np.random.default_rng(seed)
    rows = max(1, (1 << 22) // (len(live) * max(1, len(thumbs))))
    hits, done = 0, 0
    while done < draws:
        k = min(rows, draws - done)
        t = np.zeros((k, len(live)))
        if s.shape[1]:
            t += np.where(rng.random((k, s.shape[1])) < 0.5, -1.0, 1.0) @ s.T
        if n_t:
            t += rng.permuted(np.broadcast_to(y, (k, n_t)), axis=1) @ g.T
        hits += int(np.count_nonzero(((t - mean) / sd).min(axis=1) <= observed + 1e-9))
        done += k
    return (1 + hits) / (1 + draws)
