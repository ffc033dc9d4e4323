"""The screen before a scheduled run trains: which of its items pull against what the kept runs taught.

What: the worker measures, per item of the batch, its contribution along the weights' change since the base
model, s_i = <grad m_i, w_live - w_base> (loop/worker/screen.py; m_i is the pair's log-prob margin, or an
example's signed log-prob). An item agreeing with what was learned has s_i > 0; a flipped label negates it.
`decide` tests those contributions exactly (`loop.stats.label_test_p`): under the null "these labels are
independent of the learned trait" a pair's orientation is a fair coin (its s_i as likely to carry either sign)
and a rater's thumbs are exchangeable over the answers they judged (any shuffle of them as likely: a rater who
gives mostly downs is not a coin), so the one-sided p-value is exact whatever the correlations inside the model,
and a batch is held back at level `alpha` with probability at most `alpha` when its labels carry no information
against the learned direction. A batch that carries them (the same pairs rated the other way round, one hostile
account) reads p far below it.

Companions: a pair batch built from thumbs uses only the thumbs that differ on one prompt; the same raters'
other thumbs wait as single examples for a later KTO run. Flipped thumbs on a model that already shows the trait
make few pairs (too few for any test at 0.01: 2^-n is the smallest p n pairs can give) and many singles. So the
scheduler screens the batch's raters' waiting thumbs beside the batch (`companions`, measured, never trained by
this run): they are tested with the items of their rater, and held back (quarantined) with them, so the thumbs
that poisoned a pair batch are not trained later as examples either. Companions that are not held stay waiting.

Groups: items are grouped by their raters. With more than one group, each group is tested, and then whatever no
group test held back is tested as one; the level is split over those k + 1 tests (Bonferroni), so the chance of
holding back anything from an innocent batch stays at most `alpha`. With one group it is one test at `alpha`.

Directions: v = w_live - w_base is young after a few small kept runs: it holds what they taught and their noise,
and splits honest items about half and half, so the test, exact, has little power then. The guard's eval pairs
(held-out feedback older than the batch, and pairs kept runs learned from) are trusted already: the worker also
measures each item along g, the gradient of those anchor pairs' margins at the live weights (what the guard's
margin test will judge after the write, to first order), which exists from the first run on. `along` gives the
contributions the test uses: "learned" (v), "anchors" (g), or "both". Each is fixed before the batch's labels
are seen, so a test along it stays exact under its null; which has the power is measured (`loop bench learning`
records each one's p per round), and the figures carry all three. "both" tests v, g and their unit sum
v/||v|| + g/||g|| jointly (`loop.stats.joint_label_test_p`: the most negative standardised figure among the three,
its null drawn with one coin per pair and one shuffle of the thumbs for all three), and shows the unit sum as
each item's contribution. The sum alone can be weaker than either direction (a batch read p = 0.0001 along v,
0.016 along g, 0.012 along their sum); the joint test keeps the stronger one's power at a small price for
testing three, and stays exact whatever the correlation between them.

Nothing learned yet and no anchors, or a base the worker cannot read and no anchors, gives no contributions:
nothing is judged (the screen says so). Held-back items are quarantined, not lost (loop/training/quarantine.py).
Tests: `.venv/bin/python -m pytest -q tests/unit/scheduler/test_screening.py`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loop.pairs import Item
from loop.stats import joint_label_test_p, label_test_p

DEFAULT_ALPHA = 0.01
DIRECTIONS = ("learned", "anchors", "both")
DEFAULT_DIRECTION = "both"


def along(direction: str, learned: Sequence[float], anchored: Sequence[float], learned_norm: float,
          anchor_norm: float) -> list[float]:
    """The contributions along `direction` (module docstring) from the worker's figures along v and g (either may
    be empty: not measured). "both" with one of them measured is that one."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown screen direction {direction!r}; one of {', '.join(DIRECTIONS)}")
    if direction == "learned":
        return list(learned)
    if direction == "anchors":
        return list(anchored)
    if learned and anchored and learned_norm > 0 and anchor_norm > 0:
        return [a / learned_norm + b / anchor_norm for a, b in zip(learned, anchored, strict=True)]
    return list(learned or anchored)


def tested_with(direction: str, learned: Sequence[float], anchored: Sequence[float]) -> list[list[float]]:
    """The directions tested jointly with `along(direction, ...)`: for "both" with both measured, v and g
    themselves (module docstring), else none."""
    return [list(learned), list(anchored)] if direction == "both" and learned and anchored else []


def p_by_direction(items: Sequence[Item], learned: Sequence[float], anchored: Sequence[float], learned_norm: float,
                   anchor_norm: float, *, seed: int = 0) -> dict[str, float | None]:
    """The whole batch's test along each direction (None: not measured), so a run records what each would have
    read whichever one decided."""
    thumbs = [thumb_of(item) for item in items]
    out: dict[str, float | None] = {}
    for d in DIRECTIONS:
        values = along(d, learned, anchored, learned_norm, anchor_norm)
        joint = [values, *tested_with(d, learned, anchored)]
        out[d] = joint_label_test_p(joint, thumbs, seed=seed) if values and len(values) == len(items) else None
    return out


def thumb_of(item: Item) -> int | None:
    """None for a pair; +1 / -1 for an example with a thumb up / down (how `label_test_p` takes it)."""
    return None if item.kind == "pair" else (1 if item.example.label else -1)


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
    companions: set[int] = field(default_factory=set)  # indices of items measured as evidence, not trained

    def held_indices(self) -> set[int]:
        return {i for h in self.held for i in h.indices}

    def figures(self, items: Sequence[Item], contributions: Sequence[float], alpha: float) -> dict[str, Any]:
        """What a run records (run.metrics["screen"]): the test, per group and per item, so the evidence and the
        per-rater signal (`rater_signal`) can be read back later."""
        held = self.held_indices()
        return {"alpha": alpha, "p_value": self.p_value, "n": len(contributions), "note": self.note,
                "quarantined": len(held), "groups": self.groups, "companions": len(self.companions),
                "items": [{"group": group_of(item), "contribution": float(c), "held": i in held,
                           "thumb": thumb_of(item), "companion": i in self.companions,
                           "rating_ids": list(item.rating_ids), "comparison_ids": list(item.comparison_ids)}
                          for i, (item, c) in enumerate(zip(items, contributions))]}


def _why(scope: str, values: Sequence[float], p: float, level: float) -> str:
    down = sum(v < 0 for v in values)
    who = "the batch" if scope == "batch" else f"rater {scope.removeprefix('rater:')}"
    return (f"{who}: {down} of {len(values)} items pull the model back from what the kept runs taught "
            f"(exact test p = {p:.2g} < {level:.2g})")


def decide(items: Sequence[Item], contributions: Sequence[float], *, alpha: float = DEFAULT_ALPHA,
           note: str = "", seed: int = 0, companions: Sequence[int] = (),
           also: Sequence[Sequence[float]] = ()) -> Decision:
    """Which items to hold back. `contributions` are the worker's s_i, in the order of `items` (empty: nothing
    was measured, `note` says why); `companions` are the indices of items screened as evidence only (see the
    module's docstring): tested with their rater's items, held with them, never alone enough to hold a batch
    item of another rater. `also`: more directions' figures of the same items, tested jointly with
    `contributions` (`tested_with`; each test is then `joint_label_test_p` over all of them)."""
    if not contributions:
        return Decision(note=note or "nothing measured")
    if any(len(c) != len(items) for c in (contributions, *also)):
        raise ValueError(f"{len(contributions)} contributions for {len(items)} items")
    thumbs = [thumb_of(item) for item in items]

    def p_of(idx: Sequence[int]) -> float:
        labels = [thumbs[i] for i in idx]
        if not also:
            return label_test_p([contributions[i] for i in idx], labels, seed=seed)
        return joint_label_test_p([[c[i] for i in idx] for c in (contributions, *also)], labels, seed=seed)

    by_group: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_group[group_of(item)].append(i)
    decision = Decision(p_value=p_of(range(len(items))), note=note, companions=set(companions))
    for g, idx in by_group.items():
        vals = [contributions[i] for i in idx]
        decision.groups[g] = {"n": len(idx), "p_value": p_of(idx), "mean": sum(vals) / len(vals),
                              "down": sum(v < 0 for v in vals),
                              "companions": sum(i in decision.companions for i in idx)}
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
        p = p_of(rest)
        if p < level:
            decision.held.append(Held("batch", rest, p, level, _why("batch", [contributions[i] for i in rest],
                                                                     p, level)))
    return decision


def rater_signal(screens: Sequence[dict[str, Any]], *, alpha: float = DEFAULT_ALPHA, seed: int = 0
                 ) -> list[dict[str, Any]]:
    """Per rater, over every screened item of the given runs' `metrics["screen"]`: how many items, how many
    pulled back, the mean contribution, and the p-value of all of them together (`label_test_p`; flagged below
    `alpha`): poison coming from one account shows here before (or without) a batch being held back. Feedback
    measured by more than one run (a companion that stayed waiting, screened again later) counts once."""
    per: dict[str, dict[Any, tuple[float, int | None, bool]]] = defaultdict(dict)
    for n, screen in enumerate(screens):
        for k, it in enumerate(screen.get("items") or []):
            c = it.get("contribution")
            if isinstance(c, (int, float)):
                thumb = it.get("thumb") if it.get("thumb") in (1, -1) else None
                ids = (tuple(it.get("rating_ids") or ()), tuple(it.get("comparison_ids") or ()))
                key = ids if any(ids) else (n, k)  # feedback screened twice (a companion, later trained) once
                for rater in str(it.get("group") or "anonymous").split("+"):
                    per[rater][key] = (float(c), thumb, bool(it.get("held")))
    out = []
    for rater, rows_by_key in sorted(per.items()):
        rows = list(rows_by_key.values())
        vals = [c for c, _, _ in rows]
        p = label_test_p(vals, [t for _, t, _ in rows], seed=seed)
        out.append({"rater": rater, "items": len(vals), "down": sum(v < 0 for v in vals),
                    "mean_contribution": sum(vals) / len(vals), "p_value": p,
                    "quarantined": sum(h for _, _, h in rows), "flagged": alpha > 0 and p < alpha})
    return out
