"""The composition root: every part the running service holds, typed, started and stopped in one place.

One `LoopState` lives on `app.state.loop`: loop/api/app.py builds it (`LoopState.open(settings)`), calls
`start()` when the app starts and `stop()` when it stops; routes reach its parts through loop/api/deps.py and
domain code (the trainer, the scheduler) gets it passed in. Nothing is a module global. The supervised parts
(`supervisor`, `worker`, `trainer`, `scheduler`) are None when not running (attached vLLM, worker disabled,
`manage=False`, unit tests). Three parts always exist, because requests leave work behind them: the rating writer
(group commit, loop.feedback.writer), the response writer (the proxy's rows, journaled before the reply and
committed after it: loop.feedback.responses; `open()` first replays what a previous process left in the journal)
and `stream_stores`, the tasks that store a stream's rows after its client left. `stop()` gives them their
outcome before anything else goes: every queued rating is committed and acknowledged or answered with its
documented error, every stream store is awaited (bounded, then logged), then the response rows are committed
(bounded; what is left stays in the journal for the next start).

Tests: tests/unit/api/test_state_shutdown.py (and every test that builds the app).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from loop.config import Settings
from loop.db.models import WeightVersion
from loop.feedback.responses import JOURNAL_NAME, ResponseWriter, replay_journal
from loop.feedback.writer import RatingWriter
from loop.raters import Accounts

if TYPE_CHECKING:
    from loop.openwebui import Poller
    from loop.scheduler.scheduler import Scheduler
    from loop.training import Trainer, WorkerControl
    from loop.training.leader import TrainerLock
    from loop.training.replicas import Replicas
    from loop.vllm.client import VLLMClient
    from loop.vllm.process import VLLMSupervisor

log = logging.getLogger("loop.state")

# How long stop() waits for the rating writer and for the stream stores, each. Both are single transactions of
# a few rows; a database that cannot commit them in this time will not commit them before the process exits.
DRAIN_TIMEOUT_S = 10.0
LEAD_CHECK_S = 2.0  # how often the trainer checks its lock, and a process in standby tries to take it


class BackgroundTasks:
    """Tasks that outlive the request that started them. A failure is logged (nobody awaits them otherwise);
    `close()` awaits those still running, up to a bound, then logs and cancels the rest."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: a background task failed", self.name, exc_info=task.exception())

    async def close(self, timeout_s: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._tasks:  # a task may spawn another as it ends: wait for those too, within the same bound
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            await asyncio.wait(set(self._tasks), timeout=left)
        if self._tasks:
            pending = set(self._tasks)
            log.error("shutting down: %d %s still running after %g s; cancelling them", len(pending), self.name,
                      timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=1.0)


@dataclass
class LoopState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    admin_token: str
    vllm: VLLMClient  # a ReplicaClient (the same interface, routed by load) with --replicas K > 1
    supervisor: VLLMSupervisor | None = None  # replica 0's, with --replicas
    supervisors: list[VLLMSupervisor] = field(default_factory=list)  # every replica's (loop/training/replicas.py)
    replicas: Replicas | None = None  # with --replicas K > 1: who may serve, and syncing a restarted replica
    trainer_lock: TrainerLock | None = None  # held: this process trains on the database (loop/training/leader.py)
    trainer_holder: str | None = None  # in standby: who holds the trainer lock, as far as can be told
    _lead_task: asyncio.Task[None] | None = None
    _on_refused: Callable[[str], None] | None = None
    worker: WorkerControl | None = None
    trainer: Trainer | None = None
    scheduler: Scheduler | None = None
    openwebui: Poller | None = None  # pulls Open WebUI's feedback (LOOP_OPENWEBUI_URL + _API_KEY)
    weight_version: int = 0
    # Held while weights change (apply, restore, rollback): one change at a time.
    weights_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # What serving sees of a change (LiveWeights sets both): while one is under way, the version vLLM made its
    # tokens with until it paused (the record may already say the next one); each finished change counts once.
    changing_from: int | None = None
    changes_done: int = 0
    started_at: float = field(default_factory=time.time)
    drain_timeout_s: float = DRAIN_TIMEOUT_S
    # The response writer's journal (None: rows wait only in memory for their commit).
    response_journal: Path | None = None
    response_writer: ResponseWriter = field(init=False)
    rating_writer: RatingWriter = field(init=False)
    accounts: Accounts = field(init=False)
    stream_stores: BackgroundTasks = field(default_factory=lambda: BackgroundTasks("stream stores"))

    def __post_init__(self) -> None:
        self.response_writer = ResponseWriter(self.sessions, self.response_journal)
        self.rating_writer = RatingWriter(self.sessions, responses=self.response_writer)
        self.accounts = Accounts(self.sessions)

    def replicas_lost(self, replicas: list[int], why: str) -> None:
        """Replicas the worker reports off the live weights (loop/worker/remotes.py): out of routing now."""
        if replicas and self.replicas is not None:
            self.replicas.lost(replicas, why)

    def serving_version(self) -> int:
        """The version a token that reaches loop now was generated with: during a change vLLM is paused (or, in
        hogwild, mid-write), so what arrives was made before it began."""
        return self.weight_version if self.changing_from is None else self.changing_from

    @classmethod
    def open(cls, settings: Settings) -> LoopState:
        """The database (migrated), the vLLM client and the live version; no supervised part yet."""
        from loop.db.session import make_engine, make_sessionmaker, migrate
        from loop.vllm.client import VLLMClient
        from loop.vllm.replicas import ReplicaClient

        settings.ensure_dirs()
        migrate(settings.db_url)
        engine = make_engine(settings.db_url)
        sessions, journal = make_sessionmaker(engine), settings.data_dir / JOURNAL_NAME
        replay_journal(sessions, journal)  # rows a killed process served but did not commit
        state = cls(settings=settings, engine=engine, sessions=sessions, response_journal=journal,
                    admin_token=settings.resolved_admin_token(),
                    vllm=VLLMClient(settings.vllm_address, timeout=settings.request_timeout_s,
                                    api_key=settings.vllm_api_key) if settings.all_replicas == 1 else
                    ReplicaClient([VLLMClient(settings.replica_address(k), settings.request_timeout_s,
                                              api_key=settings.vllm_api_key) for k in range(settings.replicas)]
                                  + [VLLMClient(url, settings.request_timeout_s, api_key=settings.replica_token)
                                     for url in settings.remote_replicas]))
        state.load_weight_version()
        return state

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

    async def start(self, *, manage: bool, on_fatal: Callable[[str], None] | None = None,
                    on_refused: Callable[[str], None] | None = None) -> None:
        """With `manage` (as under `loop serve`): build and start the supervised parts, in this order: the
        trainer and its worker (the worker waits for vLLM's weight-handle file by itself), vLLM's supervisor
        (unless `vllm_url` attaches to a running vLLM; the trainer picks the newest checkpoint and records
        restarts), the worker, then the scheduler. `on_fatal(reason)`: vLLM cannot be brought back;
        `on_refused(reason)`: the worker cannot train the model vLLM serves in place."""
        if not manage:
            return
        settings = self.settings
        self._on_refused = on_refused
        if settings.worker_enabled:
            from loop.training.leader import TrainerLock

            self.trainer_lock = TrainerLock(self.engine)
            if await asyncio.to_thread(self.trainer_lock.try_acquire):
                self._make_trainer()
            elif settings.vllm_url is None:  # its own vLLM would serve weights the shared record does not describe
                holder = await asyncio.to_thread(self.trainer_lock.holder)
                reason = (f"another loop process ({holder or 'holder unknown'}) trains on this database; a second "
                          "one that starts its own vLLM would serve other weights than the version record says. "
                          "Share its vLLM (--vllm-url, --runtime-dir: this process then stands by to take over "
                          "training), or give this one its own database")
                if on_fatal is None:
                    raise RuntimeError(reason)
                on_fatal(reason)
                return
            else:
                self.trainer_holder = await asyncio.to_thread(self.trainer_lock.holder)
                log.info("another loop process (%s) trains on this database: this one serves and stands by",
                         self.trainer_holder)
            self._lead_task = asyncio.create_task(self._lead(on_fatal), name="trainer-lock")
        if settings.vllm_url is None:
            from loop.vllm.process import VLLMSupervisor

            def vllm_failed(reason: str) -> None:
                if on_fatal is not None:
                    on_fatal(f"vLLM cannot be brought back: {reason}")

            # Replica 0 holds the weights the worker trains: past its restart limit the service stops (a process
            # manager restarts it whole). Another replica is only one of several serving: it is left out of
            # routing for a restart window and tried again, synced from the live weights before it serves.
            card_turn = asyncio.Lock()
            self.supervisors = [VLLMSupervisor(settings, on_failed=vllm_failed, index=k,
                                               park_s=None if k == 0 else settings.vllm_restart_window_s,
                                               card_turn=card_turn)
                                for k in range(settings.replicas)]
            self.supervisor = self.supervisors[0]
            if self.trainer is not None:
                self.trainer.prepare_supervisor(self.supervisor)
            for sup in self.supervisors:
                await sup.start()
            if settings.all_replicas > 1:
                from loop.training.replicas import RemoteReplica, Replicas

                remote = [RemoteReplica(settings.replicas + i, url, settings.replica_token)
                          for i, url in enumerate(settings.remote_replicas)]
                self.replicas = Replicas(self, [*self.supervisors, *remote])
                await self.replicas.start()
        if self.worker is not None:
            await self.worker.start()
        from loop.scheduler import (
            Scheduler,  # turns feedback into runs; idle without a trainer
        )

        self.scheduler = Scheduler(self)
        await self.scheduler.start()
        if settings.openwebui_url and settings.openwebui_api_key:
            from loop.openwebui import Poller

            self.openwebui = Poller(self.sessions, settings.openwebui_url, settings.openwebui_api_key,
                                    settings.openwebui_sync_interval_s)
            await self.openwebui.start()

    def _make_trainer(self) -> None:
        from loop.training import Trainer, WorkerControl

        self.worker = WorkerControl(self.settings, on_refused=self._on_refused)
        self.trainer = Trainer(self)

    async def _lead(self, on_fatal: Callable[[str], None] | None) -> None:
        """The trainer checks that its lock is still its own; a process in standby follows the version record and
        takes training over when the trainer's lock is free (loop/training/leader.py)."""
        lock = self.trainer_lock
        assert lock is not None
        while True:
            await asyncio.sleep(LEAD_CHECK_S)
            if self.trainer is not None:
                if not await asyncio.to_thread(lock.still_held):
                    reason = ("lost the trainer lock (its database connection failed): stopping, so that two "
                              "processes never train on one database")
                    if on_fatal is not None:
                        on_fatal(reason)
                    return
                continue
            await asyncio.to_thread(self.load_weight_version)  # the trainer elsewhere moves the live version
            if not await asyncio.to_thread(lock.try_acquire):
                self.trainer_holder = await asyncio.to_thread(lock.holder)
                continue
            log.warning("the trainer of this database went away: this process takes training over")
            self._make_trainer()
            assert self.worker is not None
            await self.worker.start()
            if self.scheduler is not None:  # what the old trainer left running is failed and its feedback freed
                recovered = await asyncio.to_thread(self.scheduler.recover_interrupted)
                if recovered:
                    log.warning("runs %s were interrupted when the old trainer went; feedback released", recovered)

    async def stop(self) -> None:
        """Stop every part; a part that fails to stop is logged and the rest still stop. What requests left
        behind goes first (ratings queued in the writer, streams' rows being stored), then the scheduler, the
        trainer, the worker and vLLM, then the vLLM client and the database."""
        leftovers = (self.rating_writer.close(self.drain_timeout_s), self.stream_stores.close(self.drain_timeout_s))
        for done in await asyncio.gather(*leftovers, return_exceptions=True):
            if isinstance(done, BaseException):
                log.error("shutting down: draining failed", exc_info=done)
        try:  # after the stream stores: they hand it their rows
            await self.response_writer.close(self.drain_timeout_s)
        except Exception:  # noqa: BLE001 - shutting down: log and go on with the rest
            log.exception("shutting down: committing the response rows failed")
        if self._lead_task is not None:
            self._lead_task.cancel()
            await asyncio.gather(self._lead_task, return_exceptions=True)
        for part in (self.openwebui, self.replicas, self.scheduler, self.trainer, self.worker,
                     *(self.supervisors or [self.supervisor])):
            if part is not None:
                try:
                    await part.stop()
                except Exception:  # noqa: BLE001 - shutting down: log and go on with the rest
                    log.exception("stopping %s failed", type(part).__name__)
        await self.vllm.aclose()
        self.engine.dispose()
