"""The figures of one `loop bench learning` round, and the summary: each target met, not met, or not judged.

`RoundRecord` holds what a round measured; its model figures (accuracy, perplexity, drift, health) describe the
weights served after the round: the run's eval after the write when the run was kept, its eval before the write
when it was rejected or rolled back (the served weights did not change), None when the run did not report them.
`judge` turns the records and the base figures into `Target`s:
- trait: the held-out trait rate goes from its base to >= `target` within `within` rounds;
- drift: after the last round, canary perplexity vs base <= +`max_ppl_rise` and KL(base || live) per token
  within its limit;
- health: after the last round, stutter and collapse shares <= their base + `health_points`;
- poison: every poisoned round ("ab", "thumbs") was rejected before the write or rolled back, or its own feedback
  was held back: every item of it that the run took up was quarantined before the write (`withheld`; a batch
  that also holds other feedback, say an earlier round's that a failed run gave back, trains on the rest);
- false stops: at most one good ("clean") round in 20 was rejected, rolled back or withheld.
A target whose figures are missing is not judged (met None); it is never counted as met.

Tests: `.venv/bin/python -m pytest -q tests/unit/bench/test_learning_targets.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loop.bench.learning.plan import POISON_KINDS

STOPPED = ("rejected", "rolled_back")


@dataclass
class RoundRecord:
    index: int  # from 1
    kind: str  # loop.bench.learning.plan.KINDS
    rated_rate: float | None = None  # trait rate of the fresh answers the round rated (before its run)
    rated_n: int = 0
    heldout_rate: float | None = None  # trait rate on the held-out prompts, after the round's run
    heldout_n: int = 0
    heldout_words: float | None = None
    traits: dict[str, float] = field(default_factory=dict)  # every rater's held-out rate, after the run
    run_id: int | None = None
    status: str = "-"  # the run's status; "-": no run (nothing trainable)
    screen_p: float | None = None
    screen_n: int | None = None
    screen_quarantined: int | None = None
    # the batch's test along each of the screen's directions (learned, anchors, both), whichever one decided
    screen_p_by: dict[str, float | None] | None = None
    quarantined: int | None = None  # new entries of GET /api/quarantine during the round (None: no such route)
    accuracy: float | None = None
    accuracy_before: float | None = None  # the same eval pairs before the run's write
    turned_wrong: int | None = None  # eval pairs whose preference the write turned wrong / right (guard.py)
    turned_right: int | None = None
    turned_p: float | None = None
    perplexity: float | None = None
    margin_t: float | None = None
    kl_per_token: float | None = None
    ppl_vs_base: float | None = None
    stutter: float | None = None
    collapse: float | None = None
    distinct_2: float | None = None
    unfinished: float | None = None
    mean_tokens: float | None = None
    # the round's own feedback that its run took up (in the batch or screened beside it), and how much of that
    # the screen quarantined before the write; None: not known (no run, or the service reports no feedback ids)
    own_taken: int | None = None
    own_quarantined: int | None = None
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def withheld(self) -> bool:
        """Every item of this round's feedback that the run took up was quarantined before the write."""
        return bool(self.own_taken) and self.own_quarantined == self.own_taken

    @property
    def stopped_by_status(self) -> bool:
        return self.status in STOPPED

    @property
    def stopped(self) -> bool:
        return self.stopped_by_status or self.withheld


@dataclass
class Base:
    """The figures before any training: the held-out trait rate, and the first run's eval before its write."""

    heldout_rate: float | None = None
    perplexity: float | None = None
    stutter: float | None = None
    collapse: float | None = None


@dataclass
class Limits:
    target: float = 0.9
    within: int = 10
    max_ppl_rise: float = 0.05
    max_kl_per_token: float | None = None  # None: unknown, the drift target is not judged
    health_points: float = 0.05


@dataclass
class Target:
    name: str
    met: bool | None  # None: not judged (figures missing, or nothing to judge)
    text: str

    def line(self) -> str:
        verdict = {True: "met", False: "NOT MET", None: "not judged"}[self.met]
        return f"{self.name}: {self.text}: {verdict}"


def _pct(x: float | None, signed: bool = False) -> str:
    return "-" if x is None else f"{x * 100:+.1f} %" if signed else f"{x * 100:.1f} %"


def _last(records: Sequence[RoundRecord], name: str) -> Any:
    """The latest figure: a round without one (no run, or a stopped run that reported none) served the same
    weights as the round before it."""
    return next((getattr(r, name) for r in reversed(records) if getattr(r, name) is not None), None)


def trait_target(records: Sequence[RoundRecord], base: Base, limits: Limits) -> Target:
    reached = next((r.index for r in records if r.heldout_rate is not None and r.heldout_rate >= limits.target
                    and r.index <= limits.within), None)
    last = _last(records, "heldout_rate")
    text = (f"held-out trait rate {_pct(base.heldout_rate)} -> {_pct(last)}, >= {limits.target * 100:.0f} % "
            + (f"first at round {reached}" if reached is not None else f"not within {limits.within} rounds"))
    if base.heldout_rate is None and last is None:
        return Target("trait", None, "no held-out figures")
    return Target("trait", reached is not None, text)


def drift_target(records: Sequence[RoundRecord], base: Base, limits: Limits) -> Target:
    rise = _last(records, "ppl_vs_base")
    if rise is None:
        ppl = _last(records, "perplexity")
        rise = ppl / base.perplexity - 1 if ppl is not None and base.perplexity else None
    kl = _last(records, "kl_per_token")
    kl_limit = limits.max_kl_per_token
    text = (f"canary perplexity vs base {_pct(rise, signed=True)} (limit +{limits.max_ppl_rise * 100:.0f} %), "
            f"KL {'-' if kl is None else f'{kl:.4f}'} nats/token "
            f"(limit {'unknown' if kl_limit is None else f'{kl_limit:.4f}'})")
    if rise is None or kl is None or kl_limit is None:
        return Target("drift", None, text)
    return Target("drift", rise <= limits.max_ppl_rise + 1e-12 and kl <= kl_limit + 1e-12, text)


def health_target(records: Sequence[RoundRecord], base: Base, limits: Limits) -> Target:
    stutter, collapse = _last(records, "stutter"), _last(records, "collapse")
    text = (f"stutter {_pct(base.stutter)} -> {_pct(stutter)}, collapse {_pct(base.collapse)} -> {_pct(collapse)} "
            f"(limit base + {limits.health_points * 100:.0f} points)")
    if None in (stutter, collapse, base.stutter, base.collapse):
        return Target("health", None, text)
    allowed = limits.health_points + 1e-12
    ok = stutter <= base.stutter + allowed and collapse <= base.collapse + allowed
    return Target("health", ok, text)


def poison_target(records: Sequence[RoundRecord]) -> Target:
    poisoned = [r for r in records if r.kind in POISON_KINDS]
    if not poisoned:
        return Target("poison", None, "no poisoned round (--poison ab:N, --poison thumbs:N)")
    text = ", ".join(f"round {r.index} ({r.kind}) {_outcome(r)}" for r in poisoned)
    return Target("poison", all(r.stopped for r in poisoned),
                  text + " (each must be rejected, rolled back or its feedback quarantined)")


def _outcome(r: RoundRecord) -> str:
    status = r.status if r.status != "-" else "no run"
    if r.withheld and not r.stopped_by_status:
        return f"{status}, its {r.own_taken} items quarantined before the write"
    return status


def false_stop_target(records: Sequence[RoundRecord]) -> Target:
    good = [r for r in records if r.kind == "clean" and r.run_id is not None]
    stopped = [r.index for r in good if r.stopped]
    text = (f"{len(stopped)} of {len(good)} good rounds rejected, rolled back or withheld"
            + (f" (rounds {', '.join(map(str, stopped))})" if stopped else "") + " (limit 1 in 20)")
    if not good:
        return Target("false stops", None, text)
    return Target("false stops", len(stopped) * 20 <= max(len(good), 20), text)


def judge(records: Sequence[RoundRecord], base: Base, limits: Limits) -> list[Target]:
    return [trait_target(records, base, limits), drift_target(records, base, limits),
            health_target(records, base, limits), poison_target(records), false_stop_target(records)]


def verdict(targets: Sequence[Target]) -> str:
    if any(t.met is False for t in targets):
        return "TARGETS NOT MET"
    unjudged = sum(t.met is None for t in targets)
    return f"TARGETS NOT ALL JUDGED ({unjudged} without figures)" if unjudged else "TARGETS MET"
