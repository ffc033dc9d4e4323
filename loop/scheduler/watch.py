"""The base watch: after every kept run, how far the live weights are from the base model and what they generate.

What: the scheduler's eval guard (guard.py) judges each run against its own starting point; this judges the
total. `BaseWatch` measures the base model's figures once, while the base weights are served (version 0): its
top-k next-token distribution on the canary (health.DriftReference) and its answers to the canary prompts
(health.Health). They are kept in `<data dir>/base-figures.json` (written atomically), so a restart does not need
the base weights served again. After each kept run `measure()` reads the live weights' drift (KL(base || live) per
token, canary perplexity against the base's) and generation health, and `verdict()` says why to roll back:
- health past its limits (stutter, one opening for most answers, answers that never end, lost diversity): the run
  that did it is rolled back;
- drift past its budget: the run is rolled back AND the scheduler pauses, because drift is a total that every
  further run adds to — training stops and says why until an operator raises the limit or resumes on purpose.
When the base figures cannot be had (a service started from a checkpoint on a fresh data dir, another base model),
nothing is judged and the watch says so (`note`).
Tests: `.venv/bin/python -m pytest -q tests/unit/scheduler/test_watch.py tests/unit/scheduler/test_health.py`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loop.scheduler.guard import PostClient
from loop.scheduler.health import (
    DriftLimits,
    DriftReference,
    Health,
    HealthError,
    HealthLimits,
    HealthProbe,
    canary_token_ids,
    compare,
    drift_verdict,
    measure_drift,
    measure_reference,
)

log = logging.getLogger("loop.scheduler")

FIGURES_FILE = "base-figures.json"


@dataclass
class Verdict:
    health: str | None = None  # roll this run back
    drift: str | None = None  # roll back and stop training

    @property
    def reason(self) -> str | None:
        return "; ".join(r for r in (self.drift, self.health) if r) or None


class BaseWatch:
    def __init__(self, client: PostClient, tokenizer: Any, *, data_dir: Path, model: str, max_len: int = 2048,
                 probe: HealthProbe | None = None) -> None:
        self.client = client
        self.ids = canary_token_ids(tokenizer, max_len=max_len)
        self.path = Path(data_dir) / FIGURES_FILE
        self.model = model
        self.probe = probe or HealthProbe(client)
        self.reference: DriftReference | None = None
        self.base_health: Health | None = None
        self.note = "the base figures are not measured yet"

    @property
    def ready(self) -> bool:
        return self.reference is not None and self.base_health is not None

    async def ensure_base(self, *, live_is_base: bool, still_base: Callable[[], bool] | None = None) -> None:
        """Have the base figures: from the file, else measured now if the base weights are served. `still_base`
        is asked after measuring: figures taken while the weights changed are thrown away."""
        if self.ready:
            return
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                reference = DriftReference.from_dict(data["drift"])
                reference.check(self.model, self.ids)
                self.reference, self.base_health = reference, Health(**data["health"])
                self.note = ""
                return
            except (OSError, ValueError, KeyError, TypeError, HealthError) as exc:
                self.note = f"the stored base figures cannot be used ({exc})"
                if not live_is_base:
                    log.warning("%s; drift and generation health are not judged", self.note)
                    return
        if not live_is_base:
            self.note = ("no base figures: they are measured while the base weights are served (version 0), and "
                         "this service started from other weights; drift and generation health are not judged")
            return
        reference = await measure_reference(self.client, self.ids, model=self.model)
        health = await self.probe.measure()
        if still_base is not None and not still_base():
            self.note = "the weights changed while the base figures were measured; measured again later"
            return
        self._save({"drift": reference.to_dict(), "health": asdict(health)})
        self.reference, self.base_health, self.note = reference, health, ""
        log.info("base figures measured: canary perplexity %.3f, %d answers (%s)", reference.perplexity,
                 health.answers, self.path)

    def _save(self, data: dict[str, Any]) -> None:
        import os
        import tempfile

        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def measure(self) -> dict[str, Any] | None:
        """The live weights' drift and health figures (None when there are no base figures to compare with)."""
        if not self.ready:
            return None
        assert self.reference is not None and self.base_health is not None
        drift = await measure_drift(self.client, self.reference, self.ids, model=self.model)
        health = await self.probe.measure()
        return {"drift": drift.to_dict(), "health": {**asdict(health), "base": _brief(self.base_health)}}

    def verdict(self, figures: dict[str, Any] | None, drift_limits: DriftLimits | None,
                health_limits: HealthLimits | None) -> Verdict:
        if figures is None or self.base_health is None:
            return Verdict()
        out = Verdict()
        if drift_limits is not None:
            from loop.scheduler.health import Drift

            out.drift = drift_verdict(Drift(**figures["drift"]), drift_limits)
        if health_limits is not None:
            live = Health(**{k: v for k, v in figures["health"].items() if k != "base"})
            out.health = compare(self.base_health, live, health_limits)
        return out


def _brief(h: Health) -> dict[str, Any]:
    """The base's figures shown beside the live ones."""
    return {k: getattr(h, k) for k in ("stutter_rate", "collapse_share", "distinct_2", "unfinished_rate",
                                       "mean_tokens", "repeated_3gram_rate")}
