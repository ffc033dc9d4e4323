"""The API's end of the training worker: spawn it, talk to it, notice when it dies, bring it back.

`WorkerControl(settings)` binds a ZMQ ROUTER at `ipc://<runtime_dir>/worker.sock` (the folder is 0700, the socket
file 0600: only our user can talk to the process that holds vLLM's weights) and spawns
`python -m loop.worker.main` in its own process group. Messages are msgspec structs (`loop/worker/protocol.py`).

- `await call(msg, timeout)` sends a request and awaits the reply with the same `req` number; a timeout raises
  `WorkerTimeout`, an `Error` reply raises `WorkerFailed` (with the worker's traceback), a dead worker
  `WorkerUnavailable` — in-flight calls fail at once when the worker dies, they do not wait out their timeout.
- Watchdog: the worker's I/O thread sends a heartbeat every `worker_heartbeat_s`; no heartbeat for
  `worker_timeout_s` from a process that is stopped or made no CPU progress since (hung: see `_hung`; one
  merely starved of CPU gets up to 10x longer), or the process exiting → state "dead" → the process group is
  killed and a new worker started after a backoff (0.5 s, doubling, ≤ 10 s); after `max_restarts` consecutive
  failures (a worker that never says hello counts as one) the state stays "failed".
- A worker that refuses the model vLLM serves (a weight that is not a view: loop/worker/views.py) exits with
  `EXIT_REFUSED`: state "refused", no restart, `on_refused(reason)` (`loop serve` stops with the reason).
- `describe()` is what `/health` and `/api/train/status` show.

Run its tests: `.venv/bin/pytest tests/unit/training/test_control.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import zmq
import zmq.asyncio

from loop.config import SECRET_ENV, Settings, private_dir
from loop.errors import Unavailable, UpstreamTimeout
from loop.logs import open_private_log
from loop.worker import protocol as p
from loop.worker.config import EXIT_REFUSED, REFUSED_PREFIX, REPLICA_TOKEN_ENV, worker_command

REFUSAL_TAIL = 64 << 10  # bytes of worker.log read for a refusal's reason: its last lines

log = logging.getLogger("loop.training.worker")


class WorkerError(Unavailable):
    """Base of everything `call` raises: to a caller, training is unavailable (`worker_unavailable`)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="worker_unavailable")


class WorkerUnavailable(WorkerError):
    """The worker is dead, restarting, not started yet, or has given up."""


class WorkerTimeout(WorkerError, UpstreamTimeout):
    """The worker did not answer within the call's timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = "worker_timeout"


class WorkerFailed(WorkerError):
    """The worker answered with an Error."""

    def __init__(self, message: str, traceback: str = "") -> None:
        super().__init__(message)
        self.traceback = traceback


class WorkerControl:
    def __init__(self, settings: Settings, *, command: list[str] | None = None, max_restarts: int = 5,
                 startup_grace_s: float = 60.0, env: dict[str, str] | None = None,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.on_refused = on_refused  # the worker refused the model vLLM serves (no restart follows)
        self.socket_path = settings.runtime_dir / "worker.sock"
        self.endpoint = f"ipc://{self.socket_path}"
        self._command = command or worker_command(settings, self.endpoint)
        self.max_restarts = max_restarts
        # Before its first heartbeat the worker imports its modules; on a busy 2-core box that can take a while.
        self.startup_grace_s = max(startup_grace_s, settings.worker_timeout_s)
        self._env = env
        # stopped | starting | <worker-reported: waiting, idle, training, ...> | dead | failed | refused
        self.state = "stopped"
        self.pid: int | None = None
        self.restarts = 0
        self.last_error: str | None = None
        self.hello: p.Hello | None = None
        self.last_heartbeat: p.Heartbeat | None = None
        self._last_seen = 0.0
        self._cpu_at_seen = 0.0
        self._spawned_at = 0.0
        self._failures = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._identity: bytes | None = None
        self._pending: dict[int, asyncio.Future[p.Msg]] = {}
        self._req = itertools.count(1)
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._restart_task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._log_file: Any = None
        self.on_hello: list[Callable[[p.Hello], Awaitable[None] | None]] = []
        self.on_progress: list[Callable[[p.Progress], None]] = []

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        private_dir(self.settings.runtime_dir)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()  # a stale socket from a crashed run
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a gone worker raises instead of dropping
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(self.endpoint)
        os.chmod(self.socket_path, 0o600)
        self._log_file = open_private_log(self.settings.log_dir / "worker.log")  # kept open for the child's lifetime
        await self._spawn()
        self._tasks = [asyncio.create_task(self._receive(), name="worker-recv"),
                       asyncio.create_task(self._watchdog(), name="worker-watchdog")]

    async def stop(self) -> None:
        if self._restart_task is not None:
            self._restart_task.cancel()
        if self._proc is not None and self._proc.returncode is None and self._identity is not None:
            with contextlib.suppress(WorkerError, zmq.ZMQError):
                await self.call(p.Shutdown(), timeout=3.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._proc.wait(), 5.0)
        self.state = "stopped"
        await self._kill()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._fail_pending("the worker was stopped")
        if self._sock is not None:
            self._sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        if self._log_file is not None:
            self._log_file.close()

    async def wait_ready(self, timeout: float) -> p.Hello:
        """Wait until a worker has attached and said hello (raises TimeoutError)."""
        await asyncio.wait_for(self._ready.wait(), timeout)
        assert self.hello is not None
        return self.hello

    async def restart(self, reason: str) -> None:
        """Kill the worker now and start a new one (e.g. after a call timed out and its state is unknown)."""
        await self._declare_dead(reason)

    @property
    def alive(self) -> bool:
        return self.state not in ("stopped", "starting", "waiting", "dead", "failed") and self._identity is not None

    def describe(self) -> dict[str, Any]:
        hb = self.last_heartbeat
        return {"state": self.state, "pid": self.pid, "restarts": self.restarts,
                "last_heartbeat_age_s": round(time.monotonic() - self._last_seen, 3) if self._last_seen else None,
                "last_error": self.last_error, "run_id": hb.run_id if hb else None, "step": hb.step if hb else 0,
                "load_id": self.hello.load_id if self.hello else None,
                "model_path": self.hello.model_path if self.hello else None,
                "optimizer": self.hello.optimizer if self.hello else None,
                # how vLLM's loader placed the model's weights: every one a view, or the worker refused to attach
                "layout": dict(self.hello.layout) if self.hello else None,
                "tensor_parallel": self.hello.tensor_parallel if self.hello else None}

    # ------------------------------------------------------------ requests

    async def call(self, msg: p.Msg, timeout: float) -> p.Msg:
        if self._identity is None or self._sock is None or self.state in ("dead", "failed", "stopped"):
            why = f": {self.last_error}" if self.last_error else ""
            raise WorkerUnavailable(f"the training worker is {self.state}{why}")
        msg.req = next(self._req)
        fut: asyncio.Future[p.Msg] = asyncio.get_running_loop().create_future()
        self._pending[msg.req] = fut
        try:
            try:
                await self._sock.send_multipart([self._identity, p.encode(msg)])
            except zmq.ZMQError as e:  # ROUTER_MANDATORY: the peer is gone
                raise WorkerUnavailable(f"the training worker cannot be reached ({e})") from e
            try:
                reply = await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                raise WorkerTimeout(f"the training worker did not answer {type(msg).__name__} "
                                    f"within {timeout:g} s") from None
        finally:
            self._pending.pop(msg.req, None)
        if isinstance(reply, p.Error):
            raise WorkerFailed(f"the training worker failed: {reply.message}", reply.traceback)
        return reply

    # ------------------------------------------------------------ internals

    async def _spawn(self) -> None:
        self._identity = None
        self.hello = None
        self._ready.clear()
        env = dict(os.environ if self._env is None else self._env)
        for name in SECRET_ENV:  # the worker never needs them
            env.pop(name, None)
        if self.settings.remote_replicas and self.settings.replica_token:  # ... but this one, for the agents
            env[REPLICA_TOKEN_ENV] = self.settings.replica_token
        self._proc = await asyncio.create_subprocess_exec(
            *self._command, stdin=asyncio.subprocess.DEVNULL, stdout=self._log_file, stderr=self._log_file,
            start_new_session=True, env=env)
        self.pid = self._proc.pid
        self._spawned_at = time.monotonic()
        self._last_seen = 0.0
        self.state = "starting"
        log.info("training worker started (pid %d)", self.pid)

    async def _kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 10.0)

    def _fail_pending(self, reason: str) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(WorkerUnavailable(reason))

    async def _receive(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
            if len(frames) != 2 or self.pid is None or frames[0] != f"w{self.pid}".encode():
                continue  # not our current worker (a killed predecessor's last words)
            try:
                msg = p.decode(frames[1])
            except Exception as e:  # noqa: BLE001 - a malformed frame must not kill the receiver
                log.warning("undecodable message from the worker: %s", e)
                continue
            self._identity = frames[0]
            self._last_seen = time.monotonic()
            cpu = self._cpu()
            self._cpu_at_seen = cpu[1] if cpu else 0.0
            if isinstance(msg, p.Heartbeat):
                self.last_heartbeat = msg
                if self.state not in ("dead", "failed", "stopped"):
                    self.state = msg.state
            elif isinstance(msg, p.Hello):
                await self._on_hello(msg)
            elif isinstance(msg, p.Progress):
                for cb in self.on_progress:
                    cb(msg)
            elif msg.req and msg.req in self._pending:
                fut = self._pending[msg.req]
                if not fut.done():
                    fut.set_result(msg)
            elif isinstance(msg, p.Error):
                log.warning("worker error: %s", msg.message)

    async def _on_hello(self, msg: p.Hello) -> None:
        self.hello = msg
        self._failures = 0
        self.last_error = None if self.state != "dead" else self.last_error
        if self.state in ("starting", "waiting"):
            self.state = "idle"
        log.info("training worker ready: pid %d, %s, load %s", msg.pid, msg.model_path, msg.load_id)
        self._ready.set()
        for cb in list(self.on_hello):  # a callback may remove itself
            try:
                res = cb(msg)
                if asyncio.iscoroutine(res):
                    await res
            except Exception:  # noqa: BLE001 - a callback's failure must not stop the receiver
                log.exception("worker hello callback failed")

    async def _watchdog(self) -> None:
        tick = min(0.25, self.settings.worker_heartbeat_s / 2)
        while True:
            await asyncio.sleep(tick)
            if self.state in ("dead", "failed", "stopped", "refused") or self._proc is None:
                continue
            now = time.monotonic()
            if self._proc.returncode == EXIT_REFUSED:
                self._refused()
            elif self._proc.returncode is not None:
                await self._declare_dead(f"the worker exited with code {self._proc.returncode}{self._log_tail()}")
            elif self._last_seen and now - self._last_seen > self.settings.worker_timeout_s:
                why = self._hung(now - self._last_seen)
                if why:
                    await self._declare_dead(f"no heartbeat from the worker for {now - self._last_seen:.1f} s "
                                             f"(limit {self.settings.worker_timeout_s:g} s; {why})")
            elif not self._last_seen and now - self._spawned_at > self.startup_grace_s:
                await self._declare_dead(f"the worker sent nothing within {self.startup_grace_s:g} s of starting")

    def _cpu(self) -> tuple[str, float] | None:
        """(scheduler state letter, CPU seconds used) of the worker process, from /proc (Linux)."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return fields[0], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def _hung(self, silent_s: float) -> str | None:
        """Why a silent worker counts as hung, or None while it looks merely starved of CPU.

        On a busy 2-core box a worker deep in a backward can miss heartbeats while using CPU all along;
        killing it would lose the run for nothing. Silent AND stopped, or silent with no CPU progress since
        its last heartbeat, or silent for 10x the limit: hung."""
        cpu = self._cpu()
        if cpu is None:
            return "process not inspectable"
        state, used = cpu
        if state in ("T", "t"):
            return "the process is stopped"
        if used - self._cpu_at_seen < 0.05:
            return "and it used no CPU since"
        if silent_s > max(60.0, 10 * self.settings.worker_timeout_s):
            return "still silent while busy"
        return None

    def _refused(self) -> None:
        """The worker refused the model vLLM serves: no restart (it would refuse again); the reason is its last
        log line, and `on_refused` tells `loop serve`."""
        reason = "the worker refused the model (see worker.log)"
        with contextlib.suppress(OSError), open(self._log_file.name, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - REFUSAL_TAIL))  # the log keeps every run of the worker
            lines = f.read().decode(errors="replace").splitlines()
            said = [ln.split(REFUSED_PREFIX, 1)[1] for ln in lines if REFUSED_PREFIX in ln]
            if said:
                reason = said[-1]
        log.error("training worker: %s%s", REFUSED_PREFIX, reason)
        self.state = "refused"
        self.last_error = REFUSED_PREFIX + reason
        self._identity = None
        self._fail_pending(self.last_error)
        if self.on_refused is not None:
            self.on_refused(self.last_error)

    async def _declare_dead(self, reason: str) -> None:
        log.error("training worker (pid %s) is dead: %s", self.pid, reason)
        self.state = "dead"
        self.last_error = reason
        self._identity = None
        self._fail_pending(f"the training worker died: {reason}")
        await self._kill()
        self._failures += 1
        if self._failures > self.max_restarts:
            self.state = "failed"
            self.last_error = f"{reason}; gave up after {self.max_restarts} restarts"
            return
        if self._restart_task is None or self._restart_task.done():
            self._restart_task = asyncio.create_task(self._restart_later(), name="worker-restart")

    async def _restart_later(self) -> None:
        await asyncio.sleep(min(10.0, 0.5 * 2 ** (self._failures - 1)))
        if self.state == "dead":
            self.restarts += 1
            await self._spawn()

    def _log_tail(self, n: int = 3) -> str:
        try:
            with open(self._log_file.name, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
                text = f.read().decode(errors="replace")
            lines = [ln for ln in text.splitlines() if ln.strip()][-n:]
        except Exception:  # noqa: BLE001 - best effort
            return ""
        return (": " + " | ".join(lines)) if lines else ""
