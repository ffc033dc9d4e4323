"""Shared parts of the Trainer tests: a fake vLLM that records pause / reset / resume, a Trainer on a real SQLite
file with the fake worker process (tests/unit/fake_worker.py) over real ZMQ, and feedback rows to train on."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

from loop.state import LoopState
from loop.config import Settings
from loop.training.worker import WorkerControl
from loop.db.models import Comparison, Response, TrainingRun
from loop.db.session import make_engine, make_sessionmaker, migrate
from loop.training import RunHandle, Trainer

FAKE = str(Path(__file__).with_name("fake_worker.py"))
PAIR = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}


class FakeVLLM:
    def __init__(self, state: LoopState | None = None) -> None:
        self.calls: list[str] = []
        self.state = state
        self.fail_reset = False
        self.dead = False  # its engine died: /health fails

    async def pause(self, mode: str = "wait") -> None:
        self.calls.append(f"pause:{mode}")

    async def reset_prefix_cache(self) -> None:
        self.calls.append("reset")
        if self.fail_reset:
            raise RuntimeError("reset failed")

    async def resume(self) -> None:
        # the version must already be bumped when vLLM serves again
        self.calls.append(f"resume@v{self.state.weight_version if self.state else '?'}")

    async def health(self, timeout: float = 5.0) -> bool:
        return not self.dead

    async def aclose(self) -> None:
        pass


async def make(tmp_path: Path, **settings_kw: Any) -> tuple[Trainer, LoopState, FakeVLLM]:
    settings = Settings(data_dir=tmp_path, worker_heartbeat_s=0.2, worker_timeout_s=3.0, **settings_kw)
    settings.ensure_dirs()
    migrate(settings.db_url)
    engine = make_engine(settings.db_url)
    vllm = FakeVLLM()
    state = LoopState(settings=settings, engine=engine, sessions=make_sessionmaker(engine), admin_token="t" * 16,
                      vllm=vllm)  # type: ignore[arg-type]
    vllm.state = state
    state.load_weight_version()
    endpoint = f"ipc://{settings.runtime_dir / 'worker.sock'}"
    state.worker = WorkerControl(settings, command=[sys.executable, FAKE, endpoint, "0.2"])
    await state.worker.start()
    await state.worker.wait_ready(30)
    state.trainer = Trainer(state)
    return state.trainer, state, vllm


async def finish(trainer: Trainer, handle: RunHandle) -> TrainingRun:
    """The run's record once its handle says it ended (and the status the handle gave is the record's)."""
    status = await handle.finished(30)
    with trainer.state.sessions() as s:
        run = s.get(TrainingRun, handle.id)
        assert run is not None and run.status == status
        return run


async def stop(state: LoopState) -> None:
    await state.trainer.stop()
    await state.worker.stop()
    state.engine.dispose()


def add_comparison(state: LoopState) -> int:
    with state.sessions() as s:
        for rid, text in (("resp-a", "4"), ("resp-b", "5")):
            s.add(Response(id=rid, group_id=rid, endpoint="chat", model="m", weight_version=0, request={},
                           messages=[{"role": "user", "content": "2+2?"}], prompt_hash="h" * 64, completion=text))
        s.flush()  # the comparison's foreign keys need the responses first
        c = Comparison(response_a_id="resp-a", response_b_id="resp-b", winner="a")
        s.add(c)
        s.commit()
        return c.id



def add_pair(state: LoopState) -> int:
    """A fresh A/B comparison (two new responses to one prompt); returns its id."""
    ids = [f"resp-{uuid.uuid4().hex}" for _ in range(2)]
    with state.sessions() as s:
        for rid, text in zip(ids, ("4", "5")):
            s.add(Response(id=rid, group_id=rid, endpoint="chat", model="m", weight_version=0, request={},
                           messages=[{"role": "user", "content": "2+2?"}], prompt_hash="h" * 64, completion=text))
        s.flush()
        c = Comparison(response_a_id=ids[0], response_b_id=ids[1], winner="a")
        s.add(c)
        s.commit()
        return c.id


class FakeSupervisor:
    def __init__(self) -> None:
        self.state, self.model_path, self.reloads, self.exit_reason = "ready", None, [], ""

    async def reload(self, reason: str) -> None:
        self.reloads.append(reason)


