"""Small statistics shared by the eval guard (API process) and the training worker.

`t_statistic`: how many standard errors a mean lies from zero (the guard's per-token margins).
`sign_flip_p`: the one-sided sign-flip test of the pre-write screen (loop/worker/screen.py measures the values).
Pure functions, no torch (numpy, which transformers brings, only inside `sign_flip_p`).
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
