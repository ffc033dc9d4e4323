"""The scheduler's runtime tunables: one model, derived from the settings they override.

`POST /api/scheduler/config` (loop/api/routes/runs.py) and `loop scheduler config` change some settings while the
scheduler runs; the scheduler persists the changes and lays them over Settings (Scheduler.config). Each tunable
is a Settings field under a shorter name (SETTING below) and takes that field's type, range, description and
default, so a range is declared once (loop/config.py) and holds alike at start-up, on the API and for a value
stored by an earlier run. Numbers must be finite. `Tunables` is the effective set; `TunableChanges` is a change
(a field left out is kept, `null` resets it to the setting).
Tests: tests/unit/config/test_settings_sources.py, tests/unit/scheduler/test_scheduler.py, tests/unit/api/test_errors.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from loop.config import Settings

# tunable name -> the Settings field it overrides
SETTING: dict[str, str] = {
    "interval_s": "scheduler_interval_s",
    "min_pairs": "scheduler_min_pairs",
    "max_wait_s": "scheduler_max_wait_s",
    "batch_size": "batch_size",
    "steps": "scheduler_steps",
    "learning_rate": "learning_rate",
    "nll_weight": "nll_weight",
    "replay_pairs": "replay_pairs",
    "max_accuracy_drop": "max_accuracy_drop",
    "accuracy_alpha": "accuracy_alpha",
    "max_perplexity_rise": "max_perplexity_rise",
    "margin_alpha": "margin_alpha",
    "poison_alpha": "poison_alpha",
    "guard_enabled": "guard_enabled",
    "drift_enabled": "drift_enabled",
    "max_drift_kl": "max_drift_kl",
    "max_perplexity_vs_base": "max_perplexity_vs_base",
    "health_enabled": "health_enabled",
    "rater_min_agreement": "rater_min_agreement",
    "rater_agreement_min_pairs": "rater_agreement_min_pairs",
}
_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)


def _kind(name: str) -> type:
    """The tunable's value type (bool, int or float), without the `| None` of an optional setting."""
    annotation = Settings.model_fields[SETTING[name]].annotation
    return next(t for t in (bool, int, float) if annotation in (t, t | None))


def _constrained(name: str) -> Any:
    field = Settings.model_fields[SETTING[name]]
    return Annotated[(_kind(name), *field.metadata)] if field.metadata else _kind(name)


def _optional_in_settings(name: str) -> bool:
    return Settings.model_fields[SETTING[name]].annotation is not _kind(name)


Tunables: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "Tunables", __config__=ConfigDict(**_CONFIG, frozen=True), __doc__="The scheduler's effective thresholds.",
    **{name: (_constrained(name) | None if _optional_in_settings(name) else _constrained(name),
              Field(Settings.model_fields[s].default, description=Settings.model_fields[s].description))
       for name, s in SETTING.items()})

TunableChanges: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "TunableChanges", __config__=_CONFIG,
    __doc__="Thresholds to change at runtime (persisted). Leave a field out to keep it; `null` resets it to the "
            "setting. Ranges are the settings' own (loop/config.py); numbers must be finite.",
    **{name: (_constrained(name) | None, Field(None, description=Settings.model_fields[s].description))
       for name, s in SETTING.items()})


def effective(settings: Settings, overrides: Mapping[str, Any]) -> BaseModel:
    """The thresholds in force: each override (already checked), else its setting."""
    return Tunables.model_validate({name: overrides[name] if name in overrides else getattr(settings, s)
                                    for name, s in SETTING.items()})


def _range(name: str) -> str:
    marks = {Gt: (">", "gt"), Ge: (">=", "ge"), Lt: ("<", "lt"), Le: ("<=", "le")}
    return ", ".join(f"{marks[type(m)][0]} {getattr(m, marks[type(m)][1]):g}"
                     for m in Settings.model_fields[SETTING[name]].metadata if type(m) in marks)


def check(name: str, value: Any) -> Any:
    """`value` as tunable `name` takes it, or ValueError saying what is wrong and what it takes."""
    if name not in SETTING:
        raise ValueError(f"unknown scheduler setting {name!r}; known: {sorted(SETTING)}")
    kind = _kind(name)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, not {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite {kind.__name__} ({_range(name)}), not {value!r}")
    try:
        return getattr(TunableChanges.model_validate({name: value}), name)
    except ValidationError:
        raise ValueError(f"{name} must be a finite {kind.__name__} ({_range(name)}), not {value!r}") from None
