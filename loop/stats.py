"""Small statistics shared by the eval guard (API process) and the training worker."""

from __future__ import annotations

import math
from collections.abc import Sequence


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
