"""Agreement between raters: Krippendorff's alpha over the answers several raters rated, and each rater's rate of
agreement with the others.

Why alpha: it handles any number of raters, missing ratings (not every rater sees every answer) and a metric per
kind of value — nominal for thumbs (up and down are just different), interval for 1-10 scores (7 vs 8 is a
smaller disagreement than 2 vs 9) — and it corrects for the agreement chance alone would give. 1 is perfect
agreement, 0 is what chance gives, below 0 is systematic disagreement.

How (K. Krippendorff, "Computing Krippendorff's Alpha-Reliability", 2011, the coincidence-matrix form): a unit
(an answer) with m_u >= 2 values is pairable; each ordered pair of its values (c, k) from different raters adds
1 / (m_u - 1) to the coincidence o_ck. With n_c = sum_k o_ck and n = sum_c n_c (the pairable values),
    alpha = 1 - (n - 1) * sum_ck o_ck d(c, k) / sum_ck n_c n_k d(c, k),
d the squared difference of the metric (nominal: 0 if equal else 1; interval: (c - k)^2). Alpha is undefined
(None) when nothing is pairable or the expected disagreement is 0 (every pairable value the same: no variation
to agree about, and the definition gives 0/0).

Only current, non-withdrawn ratings count (a changed mind replaces the old verdict). Pure functions over plain
values here, plus `rating_values` / `agreement_summary` that read them from the database.
Tests: .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/feedback/test_agreement.py
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from loop.db.models import Rating

Metric = Literal["nominal", "interval"]


@dataclass(frozen=True)
class Alpha:
    """Krippendorff's alpha (None when undefined), the units it was computed over (those with >= 2 values) and the
    number of pairable values n."""

    alpha: float | None
    items: int
    values: int

    def to_json(self) -> dict[str, Any]:
        return {"alpha": None if self.alpha is None else round(self.alpha, 6), "items": self.items,
                "values": self.values}


def _distance(metric: Metric, c: float, k: float) -> float:
    if metric == "nominal":
        return 0.0 if c == k else 1.0
    if metric == "interval":
        return float(c - k) ** 2
    raise ValueError(f"metric must be 'nominal' or 'interval', got {metric!r}")


def krippendorff_alpha(units: Iterable[Sequence[float]], metric: Metric) -> Alpha:
    """Alpha over `units`, each the values its raters gave (one per rater; missing ratings simply absent).
    Units with fewer than two values are not pairable and are left out."""
    _distance(metric, 0, 0)  # refuse an unknown metric even when nothing is pairable
    coincidence: dict[tuple[float, float], float] = defaultdict(float)
    items = 0
    for values in units:
        m = len(values)
        if m < 2:
            continue
        items += 1
        for i, c in enumerate(values):
            for j, k in enumerate(values):
                if i != j:
                    coincidence[(c, k)] += 1.0 / (m - 1)
    totals: dict[float, float] = defaultdict(float)
    for (c, _), o in coincidence.items():
        totals[c] += o
    n = sum(totals.values())
    if n < 2:
        return Alpha(None, items, round(n))
    observed = sum(o * _distance(metric, c, k) for (c, k), o in coincidence.items())
    expected = sum(nc * nk * _distance(metric, c, k) for c, nc in totals.items() for k, nk in totals.items())
    if expected == 0:
        return Alpha(None, items, round(n))
    return Alpha(1.0 - (n - 1) * observed / expected, items, round(n))


@dataclass(frozen=True)
class RaterAgreement:
    """How often a rater's thumb matched the other raters' thumbs on the answers they shared: `agreed` of `pairs`
    (one pair per other rater per shared answer) over `items` shared answers; `rate` is None without any."""

    rater: str
    items: int
    pairs: int
    agreed: int

    @property
    def rate(self) -> float | None:
        return self.agreed / self.pairs if self.pairs else None

    def to_json(self) -> dict[str, Any]:
        return {"items": self.items, "pairs": self.pairs, "agreed": self.agreed,
                "rate": None if self.rate is None else round(self.rate, 6)}


def per_rater_agreement(units: Mapping[Hashable, Mapping[str, Hashable]]) -> dict[str, RaterAgreement]:
    """Each rater's agreement with the others: `units` maps an answer to {rater: value}. A rater with no shared
    answer is absent."""
    items: dict[str, int] = defaultdict(int)
    pairs: dict[str, int] = defaultdict(int)
    agreed: dict[str, int] = defaultdict(int)
    for by_rater in units.values():
        if len(by_rater) < 2:
            continue
        for rater, value in by_rater.items():
            others = [v for r, v in by_rater.items() if r != rater]
            items[rater] += 1
            pairs[rater] += len(others)
            agreed[rater] += sum(v == value for v in others)
    return {r: RaterAgreement(r, items[r], pairs[r], agreed[r]) for r in items}


def rating_values(s: Session) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """({answer: {rater: thumb}}, {answer: {rater: score}}) over the answers two or more raters rated (current,
    non-withdrawn ratings; a rating with neither a thumb nor a score adds nothing to either)."""
    shared = (select(Rating.response_id).where(Rating.is_current.is_(True),
                                               (Rating.thumb.is_not(None)) | (Rating.score.is_not(None)))
              .group_by(Rating.response_id).having(func.count(func.distinct(Rating.rater)) >= 2))
    thumbs: dict[str, dict[str, int]] = defaultdict(dict)
    scores: dict[str, dict[str, int]] = defaultdict(dict)
    rows = s.execute(select(Rating.response_id, Rating.rater, Rating.thumb, Rating.score)
                     .where(Rating.is_current.is_(True), Rating.response_id.in_(shared))
                     .order_by(Rating.response_id, Rating.id))
    for rid, rater, thumb, score in rows:
        if thumb is not None:
            thumbs[rid][rater] = thumb
        if score is not None:
            scores[rid][rater] = score
    return dict(thumbs), dict(scores)


def agreement_summary(s: Session, values: tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]] | None = None
                      ) -> dict[str, Any]:
    """Alpha for thumbs (nominal) and for scores (interval), as GET /api/stats shows it (`values`: what
    `rating_values(s)` returned, when the caller has it already)."""
    thumbs, scores = values if values is not None else rating_values(s)
    return {"thumbs": krippendorff_alpha([list(v.values()) for v in thumbs.values()], "nominal").to_json(),
            "scores": krippendorff_alpha([list(v.values()) for v in scores.values()], "interval").to_json()}
