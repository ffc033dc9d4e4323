"""The screen before a scheduled run trains: which of its items pull against what the kept runs taught.

What: the worker measures, per item of the batch, its contribution along the weights' change since the base
model, s_i = <grad m_i, w_live - w_base> (loop/worker/screen.py; m_i is the pair's log-prob margin, or an
example's signed log-prob). An item agreeing with what was learned has s_i > 0; a flipped label negates it.
`decide` tests those contributions with an exact sign-flip test (`loop.stats.sign_flip_p`): under the null "these
labels are independent of the learned trait" each s_i is as likely to carry either sign, so the one-sided p-value
is exact whatever the correlations inside the model, and a batch is held back at level `alpha` with probability
at most `alpha` when its labels carry no information against the learned direction. A batch that carries them
(the same pairs rated the other way round, one hostile account) reads p far below it.

Groups: items are grouped by their raters. With more than one group, each group is tested, and then whatever no
group test held back is tested as one; the level is split over those k + 1 tests (Bonferroni), so the chance of
holding back anything from an innocent batch stays at most `alpha`. With one group it is one test at `alpha`.
A group can only be held back once it has enough items for its level: 2^-n is the smallest p n items can give.

Nothing learned yet (no kept run: w_live == w_base), or a base the worker cannot read, gives no contributions:
nothing is judged (the screen says so). Held-back items are quarantined, not lost (loop/training/quarantine.py).
Tests: `.venv/bin/python -m pytest -q tests/unit/scheduler/test_screening.py`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loop.pairs import Item
from loop.stats import sign_flip_p

DEFAULT_ALPHA = 0.01


def group_of(item: Item) -> str:
    """The raters behind an item, as one key (a pair built from two raters' thumbs belongs to both)."""
    raters = sorted(set(item.raters)) or ["anonymous"]
    return "+".join(raters)


@dataclass
class Held:
    """Items held back together, and why."""

    scope: str  # "batch" | "rater:<group>"
    indices: list[int]  # into the screened items
    p_value: float
    alpha: float  # the level this test was held to
    reason: str


@dataclass
class Decision:
    held: list[Held] = field(default_factory=list)
    p_value: float | None = None  # of the whole batch (None: nothing measured)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    note: str = ""

    def held_indices(self) -> set[int]:
        return {i for h in self.held for i in h.indices}

    def figures(self, items: Sequence[Item], contributions: Sequence[float], alpha: float) -> dict[str, Any]:
        """What a run records (run.metrics["screen"]): the test, per group and per item, so the evidence and the
        per-rater signal (`rater_signal`) can be read back later."""
        held = self.held_indices()
        return {"alpha": alpha, "p_value": self.p_value, "n": len(contributions), "note": self.note,
                "quarantined": len(held), "groups": self.groups,
                "items": [{"group": group_of(item), "contribution": float(c), "held": i in held,
                           "rating_ids": list(item.rating_ids), "comparison_ids": list(item.comparison_ids)}
                          for i, (item, c) in enumerate(zip(items, contributions))]}


def _why(scope: str, values: Sequence[float], p: float, level: float) -> str:
    down = sum(v < 0 for v in values)
    who = "the batch" if scope == "batch" else f"rater {scope.removeprefix('rater:')}"
    return (f"{who}: {down} of {len(values)} items pull the model back from what the kept runs taught "
            f"(sign-flip test p = {p:.2g} < {level:.2g})")


def decide(items: Sequence[Item], contributions: Sequence[float], *, alpha: float = DEFAULT_ALPHA,
           note: str = "", seed: int = 0) -> Decision:
    """Which items to hold back. `contributions` are the worker's s_i, in the order of `items` (empty: nothing
    was measured, `note` says why)."""
    if not contributions:
        return Decision(note=note or "nothing measured")
    if len(contributions) != len(items):
        raise ValueError(f"{len(contributions)} contributions for {len(items)} items")
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_group[group_of(item)].append(i)
    decision = Decision(p_value=sign_flip_p(contributions, seed=seed), note=note)
    for g, idx in by_group.items():
        vals = [contributions[i] for i in idx]
        decision.groups[g] = {"n": len(idx), "p_value": sign_flip_p(vals, seed=seed),
                              "mean": sum(vals) / len(vals), "down": sum(v < 0 for v in vals)}
    if alpha <= 0:
        return decision
    if len(by_group) == 1:
        p = decision.p_value
        if p < alpha:
            decision.held.append(Held("batch", list(range(len(items))), p, alpha,
                                      _why("batch", contributions, p, alpha)))
        return decision
    level = alpha / (len(by_group) + 1)
    for g, idx in by_group.items():
        p = decision.groups[g]["p_value"]
        if p < level:
            decision.held.append(Held(f"rater:{g}", idx, p, level,
                                      _why(f"rater:{g}", [contributions[i] for i in idx], p, level)))
    rest = [i for i in range(len(items)) if i not in decision.held_indices()]
    if rest:
        vals = [contributions[i] for i in rest]
        p = sign_flip_p(vals, seed=seed)
        if p < level:
            decision.held.append(Held("batch", rest, p, level, _why("batch", vals, p, level)))
    return decision


def rater_signal(screens: Sequence[dict[str, Any]], *, alpha: float = DEFAULT_ALPHA, seed: int = 0
                 ) -> list[dict[str, Any]]:
    """Per rater, over every screened item of the given runs' `metrics["screen"]`: how many items, how many
    pulled back, the mean contribution, and the sign-flip p-value of all of them together (flagged below
    `alpha`): poison coming from one account shows here before (or without) a batch being held back."""
    per: dict[str, list[tuple[float, bool]]] = defaultdict(list)
    for screen in screens:
        for it in screen.get("items") or []:
            c = it.get("contribution")
            if isinstance(c, (int, float)):
                for rater in str(it.get("group") or "anonymous").split("+"):
                    per[rater].append((float(c), bool(it.get("held"))))
    out = []
    for rater, rows in sorted(per.items()):
        vals = [c for c, _ in rows]
        p = sign_flip_p(vals, seed=seed)
        out.append({"rater": rater, "items": len(vals), "down": sum(v < 0 for v in vals),
                    "mean_contribution": sum(vals) / len(vals), "p_value": p,
                    "quarantined": sum(h for _, h in rows), "flagged": alpha > 0 and p < alpha})
    return out
