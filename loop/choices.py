"""The enumerations of loop's settings, runs and worker config, each declared once.

Settings (loop/config.py, which re-exports them), the CLI's choices, TrainRequest and the worker's config all use
these aliases. They live apart from loop/config.py because the training worker decodes its config with them and
must not import pydantic to do so (an idle worker stays small). Tests: tests/unit/config/test_settings_sources.py.
"""

from __future__ import annotations

from typing import Literal

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
TrainMode = Literal["atomic", "lowmem", "hogwild"]  # how an update is written into the live weights
PauseMode = Literal["keep", "wait"]  # what vLLM does with in-flight requests while an update is written
Optimizer = Literal["apollo", "apollo-mini", "adamw", "sgd"]  # loop/worker/apollo.py make_optimizer
Objective = Literal["dpo", "kto"]  # pairs (DPO) or single rated examples (KTO)
LogLevel = Literal["debug", "info", "warning", "error"]
