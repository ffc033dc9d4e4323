"""What the running API holds: settings, database, the vLLM client and the supervised parts.

One `LoopState` lives on `app.state.loop`. Routes reach it through `deps.StateDep`; nothing is a module global.
Optional parts (`supervisor`, `worker`, `trainer`, `scheduler`) are None when not running (attached vLLM,
worker disabled, unit tests).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from loop.config import Settings
from loop.db.models import WeightVersion

if TYPE_CHECKING:
    from loop.vllm.client import VLLMClient


@dataclass
class LoopState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    admin_token: str
    vllm: "VLLMClient"
    supervisor: Any = None  # loop.vllm.process.VLLMSupervisor
    worker: Any = None  # loop.control.WorkerControl
    trainer: Any = None  # loop.training.Trainer
    scheduler: Any = None  # loop.scheduler.Scheduler
    weight_version: int = 0
    # Held while weights change (apply, restore, rollback): one change at a time.
    weights_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    started_at: float = field(default_factory=time.time)
    extras: dict[str, Any] = field(default_factory=dict)

    def load_weight_version(self) -> int:
        """Read the live version from the database (creating version 0 on first start)."""
        with self.sessions() as s:
            latest = s.scalar(select(func.max(WeightVersion.version)))
            if latest is None:
                s.add(WeightVersion(version=0, kind="initial", status="live", note=f"as loaded: {self.settings.model}"))
                s.commit()
                latest = 0
        self.weight_version = int(latest)
        return self.weight_version
