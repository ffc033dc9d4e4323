"""vLLM as a supervised child process, reachable only by loop.

`VLLMSupervisor.start()` launches `python -m vllm.entrypoints.openai.api_server` in its own process group and
returns at once: the API listens meanwhile and answers 503 with progress ("vLLM is starting (12 s)"). A
background task polls vLLM's /health, prints progress to stderr, and once it is ready calls every registered
ready-callback (the training worker re-attaches there). While ready it keeps probing /health: vLLM's API process
answers non-200 when its engine core died underneath it, and after `UNHEALTHY_AFTER` failed probes in a row it
is restarted like a crash; meanwhile `unhealthy` says what the last probe found (set by a failed probe, or by one
still unanswered after `PROBE_SLOW_S`), and a replica other than the first is out of routing while it is set.
A crash (or such a restart) is retried with exponential backoff, at most `settings.vllm_restart_limit` times
within `settings.vllm_restart_window_s` (older crashes no longer count); past that, or when vLLM cannot be started
at all, the state becomes "failed" and `on_failed(reason)` is called (`loop serve` then shuts down and exits
non-zero, so a process manager restarts the whole service); a replica other than the first is parked instead
(`park_s`): left out of routing, then started again. vLLM's output goes to data_dir/logs/vllm.log; `last_error`
carries its tail so /health and 503s can say why.

Only loop reaches vLLM: it listens on a Unix socket in the 0700 run dir (`--uds`, no TCP port), because its dev
routes (/pause, /collective_rpc, ...) answer anyone who can connect and vLLM's --api-key does not guard them.
Its internal ZMQ sockets and temporary files go to a private folder there too (VLLM_RPC_BASE_PATH, TMPDIR).
The child gets VLLM_SERVER_DEV_MODE=1 (pause/resume/reset_prefix_cache), LOOP_RUNTIME_DIR (where the loop
plugin writes the weight handles), on the CPU VLLM_CPU_KVCACHE_SPACE and --enforce-eager; never
PYTORCH_CUDA_ALLOC_CONF=expandable_segments, which breaks CUDA IPC export of the weights. With
`settings.tensor_parallel` above 1 it gets --tensor-parallel-size, and on the CPU the multiprocess executor and
each rank's share of this process's cores (VLLM_CPU_OMP_THREADS_BIND, unless the user set it).

Tests: tests/unit/vllm/test_process.py (a fake vLLM on a Unix socket), tests/e2e/test_supervisor_e2e.py and
tests/e2e/test_vllm_private_e2e.py (the real one).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from loop.config import SECRET_ENV, Settings, private_dir, vllm_tensor_parallel
from loop.logs import open_private_log
from loop.vllm.client import VLLMClient

T = TypeVar("T")
ReadyCallback = Callable[[], Awaitable[None]]
FailedCallback = Callable[[str], None]

POLL_S = 0.5
PROGRESS_EVERY_S = 5.0
MAX_BACKOFF_S = 30.0
WATCH_S = 2.0  # how often a ready vLLM's /health is probed
PROBE_TIMEOUT_S = 10.0
PROBE_SLOW_S = 3.0  # a probe still unanswered this long marks vLLM unhealthy (out of routing) before it times out
UNHEALTHY_AFTER = 3  # failed probes in a row before a ready vLLM is restarted
# AF_UNIX paths (vLLM's socket, its ZMQ ipc:// sockets: a 36-character name in the tmp dir) hold 107 bytes.
MAX_SOCKET_PATH = 107
RPC_NAME_LEN = 37


def kernel_args(model_path: str | Path, device: str) -> list[str]:
    """vLLM flags the model's kernels need on this machine: a Gated DeltaNet hybrid (Qwen3.5) prefills through
    FlashInfer on Hopper by default and dies at its first prompt where FlashInfer is not installed; Triton has the
    same kernel."""
    if device != "cuda" or importlib.util.find_spec("flashinfer") is not None:
        return []
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return []
    if "linear_key_head_dim" in config.get("text_config", config):
        return ["--gdn-prefill-backend", "triton"]
    return []


def omp_threads_bind(cores: list[int], ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` vLLM-CPU ranks: `cores` split evenly into contiguous groups, one per
    rank ("0-3|4-7"); with fewer cores than ranks each rank gets one core, wrapping around ("0|1|0")."""
    return "|".join(_id_list(group) for group in _split(cores, ranks))


def replica_binding(cores: list[int], replicas: int, index: int, ranks: int) -> str | None:
    """VLLM_CPU_OMP_THREADS_BIND for replica `index` of `replicas` with `ranks` tensor-parallel ranks, or None for
    vLLM's own (one replica, one rank). Replicas on one machine each get their own share of the cores, or they fight
    over all of them; vLLM's own binding gives each rank a NUMA node and refuses a machine with fewer nodes than
    ranks, so a replica's share is split between its ranks, which works on any machine."""
    if replicas <= 1 and ranks <= 1:
        return None
    share = cores
    if replicas > 1:
        share = _split(cores, replicas)[index]
    if ranks > 1 and len(share) < ranks:
        _say(f"{ranks} tensor-parallel ranks on {len(share)} cores: ranks share cores, one each "
             "(set VLLM_CPU_OMP_THREADS_BIND to choose)")
    return omp_threads_bind(share, ranks)


def _split(cores: list[int], n: int) -> list[list[int]]:
    """`cores` in n contiguous groups as even as they can be; with fewer cores than groups one core each, wrapping."""
    if len(cores) < n:
        return [[cores[i % len(cores)]] for i in range(n)]
    size, extra = divmod(len(cores), n)
    groups, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        groups.append(cores[start:end])
        start = end
    return groups


def _id_list(cores: list[int]) -> str:
    """Sorted core ids as vLLM's id-list syntax: runs as ranges, joined by commas ([0, 1, 2, 5] -> "0-2,5")."""
    runs: list[list[int]] = []
    for core in cores:
        if runs and core == runs[-1][1] + 1:
            runs[-1][1] = core
        else:
            runs.append([core, core])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def _say(message: str) -> None:
    print(f"loop: {message}", file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    """In the child, before exec: own process group, files (its socket too) for its owner only, and SIGTERM if
    loop itself dies (no orphaned vLLM)."""
    os.setsid()
    os.umask(0o077)
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def tail(path: Path, lines: int = 20, max_bytes: int = 64 * 1024) -> str:
    """The last `lines` lines of a file (empty if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def last_meaningful_line(text: str) -> str:
    """The line of a log tail that most likely says what went wrong (access-log lines are skipped)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "HTTP/1.1\"" not in ln]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "Exception" in ln:
            return ln[-300:]
    return lines[-1][-300:] if lines else "no output"


def error_line(text: str) -> str:
    """The last line that looks like an error, or "" (a SIGKILL leaves none)."""
    line = last_meaningful_line(text)
    return line if ("rror" in line or "Exception" in line) else ""


def exit_description(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def group_shm_files(pgid: int) -> set[str]:
    """The /dev/shm files that processes of the process group `pgid` have mapped (Linux /proc; empty elsewhere)."""
    found: set[str] = set()
    with contextlib.suppress(OSError):
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
        for pid in entries:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) != pgid:  # after the name: state, ppid, pgrp
                    continue
                for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                    at = line.find("/dev/shm/")
                    if at >= 0:
                        found.add(line[at:].removesuffix(" (deleted)"))
            except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
                continue
    return found


def remove_shm_files(paths: set[str]) -> int:
    """Unlink these /dev/shm files (those still there and ours); how many were removed."""
    removed = 0
    for path in paths:
        with contextlib.suppress(OSError):
            if os.stat(path).st_uid == os.getuid():
                os.unlink(path)
                removed += 1
    return removed


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pick_device(setting: str) -> str:
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


async def noting_silence(call: Awaitable[T], slow_s: float, silent: Callable[[], None]) -> T:
    """`await call`, calling `silent()` once if it has not answered within `slow_s`: what a watcher does with a
    probe that is slow before it times out (a hung engine or host goes quiet; it seldom refuses)."""
    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait({task}, timeout=slow_s)
        if not done:
            silent()
        return await task
    finally:
        task.cancel()


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); None when /proc/cpuinfo cannot say. Without
    it torch emulates bf16 matrix products, and training bf16 weights is many times slower than fp32 (see
    docs/measurements.md), so `loop serve` says so when it serves bf16 on such a CPU."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
                return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        return None
    return None


def visible_cards() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES names them (indices when it is unset)."""
    import torch

    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [c.strip() for c in given.split(",") if c.strip()][:torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def replica_card(cards: list[str], replicas: int, index: int, ranks: int = 1) -> str | None:
    """The card(s) replica `index` gets to itself when there are enough for every replica's `ranks` tensor-parallel
    ranks (replica k on the k-th group of `ranks` cards, as CUDA_VISIBLE_DEVICES takes them); None: the replicas
    share what vLLM picks, each with 1/K of the memory share."""
    if replicas <= 1 or len(cards) < replicas * ranks:
        return None
    return ",".join(cards[index * ranks:(index + 1) * ranks])


class VLLMSupervisor:
    """Starts, watches and restarts one vLLM server. Attributes are read by /health and the proxy."""

    def __init__(self, settings: Settings, *, on_failed: FailedCallback | None = None, index: int = 0,
                 park_s: float | None = None, card_turn: asyncio.Lock | None = None) -> None:
        """`on_failed(reason)` is called once vLLM cannot be brought back (state "failed"). `index`: which of
        `settings.replicas` replicas this is; each has its own run dir (socket, weight handles), log and cores.
        `park_s`: instead of giving up for good past the restart limit, stay "failed" this long and then start
        again with the count cleared (a replica that others serve beside: losing it must not stop the service).
        `card_turn`: a lock the replicas of one service share; those that share a CUDA card hold it from launch to
        ready, one at a time, because vLLM sizes its KV cache from the card's free memory, which another vLLM
        loading its weights meanwhile would take from it."""
        self.settings = settings
        self.index = index
        self.park_s = park_s
        self.retry_at: float | None = None  # monotonic time of the next start while parked
        self.run_dir = settings.replica_dir(index)
        self.name = "vLLM" if index == 0 else f"vLLM replica {index}"
        self.state: str = "stopped"  # starting | ready | restarting | failed | stopped
        self.last_error: str | None = None
        self.restarts = 0  # every restart since loop started (crashes and reloads)
        self.socket_path = self.run_dir / "vllm.sock"
        self.address = f"unix:{self.socket_path}"
        self.tmp_dir = self.run_dir / "tmp"  # vLLM's ZMQ sockets and temporary files (see _private_tmp)
        self.model_path: str | None = None  # set before a restart to load another folder (e.g. a checkpoint)
        self.log_path = settings.data_dir / "logs" / ("vllm.log" if index == 0 else f"vllm-{index}.log")
        self.pid_path = self.run_dir / "vllm.pid"
        self.device: str | None = None
        self.card_turn = card_turn
        self.card: str | None = None  # a replica's own CUDA device (CUDA_VISIBLE_DEVICES), when each gets one
        self.attempt_started: float = time.monotonic()
        self.ready_in_s: float | None = None
        self.exit_reason = ""
        self.unhealthy: str | None = None  # the last failed /health probe while ready (None: the last one passed)
        self._crashes: deque[float] = deque()  # when counted restarts happened (monotonic), newest last
        self._reload_reason: str | None = None
        self._on_failed = on_failed
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._callbacks: list[ReadyCallback] = []
        self._ready = asyncio.Event()
        self._stopping = False
        self._client = VLLMClient(self.address, timeout=10.0)
        # Shared memory vLLM's processes mapped (its engine's message queues, a CPU tensor-parallel group's
        # buffers): a process killed by a signal never unlinks its segments, so _kill does once the group is gone.
        self._shm_files: set[str] = set()

    # --- public API ---
    def add_ready_callback(self, fn: ReadyCallback) -> None:
        """`await fn()` after every (re)start becomes ready."""
        self._callbacks.append(fn)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    @property
    def recent_restarts(self) -> int:
        """Restarts after a crash within the last `vllm_restart_window_s` (what the limit counts)."""
        horizon = time.monotonic() - self.settings.vllm_restart_window_s
        while self._crashes and self._crashes[0] < horizon:
            self._crashes.popleft()
        return len(self._crashes)

    def elapsed_s(self) -> float:
        return time.monotonic() - self.attempt_started

    def describe(self) -> str:
        """One sentence on why vLLM cannot serve right now (for 503 messages)."""
        s = self.settings
        if self.state == "starting":
            return f"vLLM is starting ({self.elapsed_s():.0f} s); retry shortly"
        if self.state == "restarting" and self.exit_reason.startswith("reload: "):
            return f"vLLM is restarting ({self.exit_reason}, {self.elapsed_s():.0f} s); retry shortly"
        if self.state == "restarting":
            err = error_line(self.last_error or "")
            return (f"vLLM crashed ({self.exit_reason}{': ' + err if err else ''}); restarting "
                    f"(attempt {self.recent_restarts}/{s.vllm_restart_limit} within {s.vllm_restart_window_s:g} s, "
                    f"{self.elapsed_s():.0f} s)")
        retry = (f"; trying again in {max(0.0, self.retry_at - time.monotonic()):.0f} s"
                 if self.state == "failed" and self.retry_at is not None else "")
        if self.state == "failed" and self.restarts == 0:
            return f"vLLM did not start: {last_meaningful_line(self.last_error or '')}; see {self.log_path}{retry}"
        if self.state == "failed":
            return (f"vLLM failed ({self.exit_reason}) and was not restarted again: {self.recent_restarts} restarts "
                    f"within {s.vllm_restart_window_s:g} s (the limit is {s.vllm_restart_limit}): "
                    f"{last_meaningful_line(self.last_error or '')}; see {self.log_path}{retry}")
        if self.state == "stopped":
            return "vLLM is stopped"
        return "vLLM is ready"

    async def start(self) -> None:
        """Launch vLLM and return at once; readiness is watched in the background."""
        if self._task is not None and not self._task.done():
            return
        self._stopping = False
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.state = "starting"
        self.attempt_started = time.monotonic()
        self._task = asyncio.create_task(self._run(), name=f"vllm-supervisor-{self.index}")

    async def _prepare(self) -> bool:
        """Resolve the model folder and the device (importing torch takes seconds: not in start())."""
        from loop.model_cache import resolve_model

        try:
            self._check_socket_paths()
            self.tmp_dir = self._private_tmp()
            if self.model_path is None:
                self.model_path = await asyncio.to_thread(resolve_model, self.settings.model,
                                                          self.settings.cache_dir)
            if self.device is None:
                self.device = await asyncio.to_thread(pick_device, self.settings.device)
                if self.index == 0 and self.device == "cpu" and self.settings.dtype == "bfloat16" \
                        and cpu_has_native_bf16() is False:
                    _say("this CPU has no native bf16 (no AVX-512 BF16 or AMX): training bf16 weights here is many "
                         "times slower than fp32; set LOOP_DTYPE=float32 (twice the memory) to train faster")
            if self.device == "cuda" and self.settings.replicas > 1:
                cards = await asyncio.to_thread(visible_cards)
                self.card = replica_card(cards, self.settings.replicas, self.index, self.settings.tensor_parallel)
        except Exception as exc:  # noqa: BLE001 - reported through /health and 503s
            self._fail(f"could not prepare vLLM's start: {exc}")
            return False
        return True

    def _check_socket_paths(self) -> None:
        length = len(os.fsencode(self.socket_path))
        if length > MAX_SOCKET_PATH:
            raise ValueError(f"the data dir {self.settings.data_dir} is too long for vLLM's Unix socket "
                             f"{self.socket_path} ({length} bytes, at most {MAX_SOCKET_PATH}); choose a shorter "
                             "--data-dir")

    def _private_tmp(self) -> Path:
        """The run dir's tmp/ folder, or, where vLLM's ipc:// names would not fit under it, a fresh private
        (0700, unguessable) folder in the system's temp dir, removed again by stop()."""
        inside = self.run_dir / "tmp"
        if len(os.fsencode(inside)) + RPC_NAME_LEN <= MAX_SOCKET_PATH:
            return private_dir(inside)
        if self.tmp_dir.parent != self.run_dir and self.tmp_dir.is_dir():
            return self.tmp_dir  # made by an earlier start of this supervisor
        return Path(tempfile.mkdtemp(prefix="loop-vllm-"))

    async def wait_ready(self, timeout: float) -> None:
        """Return once vLLM is ready; TimeoutError after `timeout` s, RuntimeError if it failed for good (a parked
        replica has not: it is waited for)."""
        deadline = time.monotonic() + timeout
        while self.state != "ready":
            if self.state == "stopped" or (self.state == "failed" and self.retry_at is None):
                raise RuntimeError(self.describe())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"vLLM not ready after {timeout:.0f} s: {self.describe()}")
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout=min(remaining, 1.0))

    async def reload(self, reason: str) -> None:
        """Restart vLLM now, loading `model_path` afresh (its live weights can no longer be trusted). A reload
        asked for is not a crash: it does not count against the restart limit."""
        _say(f"restarting {self.name}: {reason}")
        self._reload_reason = reason
        self.exit_reason = f"reload: {reason}"
        self.state = "restarting"
        self._ready.clear()
        await self._kill()  # _run sees the exit and starts it again

    async def stop(self) -> None:
        """Stop vLLM: SIGTERM to its whole process group, SIGKILL after 15 s."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._kill()
        await self._client.aclose()
        if self.tmp_dir.parent != self.run_dir:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.state = "stopped"

    # --- internals ---
    def command(self) -> list[str]:
        s = self.settings
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_path),
               "--served-model-name", s.model_name, "--uds", str(self.socket_path),
               "--dtype", s.dtype, "--max-model-len", str(s.max_model_len)]
        if self.device == "cpu" or s.enforce_eager:
            cmd.append("--enforce-eager")
        if self.device == "cuda":  # replicas sharing one card share the share loop gives vLLM
            share = s.gpu_memory_utilization if self.card is not None else s.gpu_memory_utilization / s.replicas
            cmd += ["--gpu-memory-utilization", str(round(share, 4))]
        if s.tensor_parallel > 1:
            if vllm_tensor_parallel(s.vllm_args) is None:  # Settings refused a different one there
                cmd += ["--tensor-parallel-size", str(s.tensor_parallel)]
            if self.device == "cpu":  # vllm-cpu's default executor runs one rank only
                cmd += ["--distributed-executor-backend", "mp"]
        return cmd + kernel_args(self.model_path, self.device) + list(s.vllm_args)

    def child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        env["VLLM_SERVER_DEV_MODE"] = "1"
        env["LOOP_RUNTIME_DIR"] = str(self.run_dir)
        env["PYTHONUNBUFFERED"] = "1"
        # vLLM's ZMQ ipc:// sockets default to /tmp, where any local user could connect to them
        env["VLLM_RPC_BASE_PATH"] = str(self.tmp_dir)
        env["TMPDIR"] = str(self.tmp_dir)
        if "expandable_segments" in env.get("PYTORCH_CUDA_ALLOC_CONF", ""):
            del env["PYTORCH_CUDA_ALLOC_CONF"]  # breaks CUDA IPC export of the weights
        if self.card is not None:  # the worker finds this card again by its UUID in the handle file
            env["CUDA_VISIBLE_DEVICES"] = self.card
        if self.device == "cpu":
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.settings.cpu_kv_cache_gib)
            if "VLLM_CPU_OMP_THREADS_BIND" not in env:
                binding = replica_binding(sorted(os.sched_getaffinity(0)), self.settings.replicas, self.index,
                                          self.settings.tensor_parallel)
                if binding:
                    env["VLLM_CPU_OMP_THREADS_BIND"] = binding
        return env

    async def _spawn(self) -> asyncio.subprocess.Process:
        private_dir(self.settings.runtime_dir)
        private_dir(self.run_dir)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()  # left by a vLLM that did not exit cleanly: binding would fail
        with open_private_log(self.log_path) as log:
            log.write(f"\n===== loop: starting vLLM at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"{' '.join(self.command())}\n".encode())
            log.flush()
            proc = await asyncio.create_subprocess_exec(*self.command(), stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=log, stderr=asyncio.subprocess.STDOUT,
                                                        env=self.child_env(), preexec_fn=_die_with_parent)
        self.pid_path.write_text(f"{proc.pid}\n")
        return proc

    def _fail(self, message: str, *, last_error: str | None = None) -> None:
        """vLLM cannot be brought back: say so, and tell whoever asked (loop serve exits)."""
        self.last_error = last_error or message
        self.state = "failed"
        self._ready.set()
        _say(message)
        if self._on_failed is not None:
            try:
                self._on_failed(self.describe())
            except Exception as exc:  # noqa: BLE001 - the failure is reported already
                _say(f"on_failed callback failed: {exc!r}")

    async def _park(self, message: str) -> None:
        """Failed for now (never `on_failed`): wait `park_s`, then start again as if the crashes were old."""
        assert self.park_s is not None
        self.state = "failed"
        self._ready.set()
        self.retry_at = time.monotonic() + self.park_s
        _say(message)
        try:
            await asyncio.sleep(self.park_s)
        finally:
            self.retry_at = None
        self._crashes.clear()
        self._ready.clear()
        self.state = "restarting"

    async def _run(self) -> None:
        if not await self._prepare():
            return
        while not self._stopping:
            self.attempt_started = time.monotonic()
            _say(f"starting {self.name} (model {self.model_path}, {self.device}) on {self.address}; log: {self.log_path}")
            async with self._start_turn():
                try:
                    self._proc = await self._spawn()
                except OSError as exc:
                    self._fail(f"could not start vLLM: {exc}")
                    return
                ready = await self._wait_healthy(self._proc)
                if ready:
                    self.ready_in_s = self.elapsed_s()
                    self._private_socket()
                    self._shm_files = await asyncio.to_thread(group_shm_files, self._proc.pid)
                    if self.device == "cpu" and self.settings.cpu_nice:
                        from loop.worker.pacing import engine_behind_api

                        await asyncio.to_thread(engine_behind_api, self._proc.pid, self.settings.cpu_nice)
                    self.state = "ready"
                    self._ready.set()
                    _say(f"{self.name} ready in {self.ready_in_s:.0f} s")
            unhealthy = None
            if ready:
                for fn in list(self._callbacks):
                    try:
                        await fn()
                    except Exception as exc:  # noqa: BLE001 - one bad callback must not stop supervision
                        _say(f"ready callback {getattr(fn, '__qualname__', fn)} failed: {exc!r}")
                unhealthy = await self._watch(self._proc)
            if self._stopping:
                return
            self.state = "restarting"  # until decided otherwise below: nothing is sent to a dying vLLM meanwhile
            self._ready.clear()
            code = self._proc.returncode
            reload_reason, self._reload_reason = self._reload_reason, None
            self.exit_reason = (f"its engine stopped answering: {unhealthy}" if unhealthy
                                else f"reload: {reload_reason}" if reload_reason else exit_description(code))
            self.last_error = f"vLLM exited ({self.exit_reason})\n{tail(self.log_path)}"
            await self._kill()  # its other processes (EngineCore, workers) too
            self.restarts += 1
            if reload_reason is not None:
                self.state = "restarting"
                self.attempt_started = time.monotonic()
                continue
            if self.recent_restarts >= self.settings.vllm_restart_limit:
                self.restarts -= 1  # not restarted after all
                message = (f"{self.name} exited ({self.exit_reason}) and the restart limit "
                           f"({self.settings.vllm_restart_limit} within {self.settings.vllm_restart_window_s:g} s) is "
                           "reached; ")
                if self.park_s is not None:
                    await self._park(message + f"leaving it out and trying again in {self.park_s:g} s. Last lines "
                                     f"of {self.log_path}:\n{tail(self.log_path, 10)}")
                    continue
                self._fail(message + f"giving up. Last lines of {self.log_path}:\n{tail(self.log_path, 10)}",
                           last_error=self.last_error)
                return
            self._crashes.append(time.monotonic())
            self.state = "restarting"
            self.attempt_started = time.monotonic()
            backoff = min(MAX_BACKOFF_S, 2.0 ** (self.recent_restarts - 1))
            _say(f"{self.name} exited ({self.exit_reason}) {error_line(self.last_error)}; restarting in {backoff:.0f} s "
                 f"(attempt {self.recent_restarts}/{self.settings.vllm_restart_limit} within "
                 f"{self.settings.vllm_restart_window_s:g} s)")
            await asyncio.sleep(backoff)

    def _start_turn(self) -> contextlib.AbstractAsyncContextManager[object]:
        """The shared card's turn while this replica starts (see `card_turn`); nothing to wait for otherwise."""
        shares_card = self.device == "cuda" and self.settings.replicas > 1 and self.card is None
        return self.card_turn if shares_card and self.card_turn is not None else contextlib.nullcontext()

    def _private_socket(self) -> None:
        """vLLM created its socket under our umask; make sure it is ours alone whatever the umask was."""
        with contextlib.suppress(OSError):
            st = self.socket_path.stat()
            if stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077:
                os.chmod(self.socket_path, 0o600)

    async def _watch(self, proc: asyncio.subprocess.Process) -> str | None:
        """While vLLM is ready: return None when its process exits, or the last probe's failure once /health
        failed `UNHEALTHY_AFTER` times in a row (its API process lives on, its engine does not)."""
        failures = 0
        self.unhealthy = None
        try:
            while proc.returncode is None and not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), timeout=WATCH_S)
                if proc.returncode is not None or self._stopping:
                    return None
                problem = await self._probe()
                if problem is None:
                    failures, self.unhealthy = 0, None
                    continue
                failures += 1
                self.unhealthy = problem
                _say(f"vLLM failed a health probe ({failures}/{UNHEALTHY_AFTER}): {problem}")
                if failures >= UNHEALTHY_AFTER:
                    return problem
            return None
        finally:
            self.unhealthy = None

    async def _probe(self) -> str | None:
        """One /health probe. One that has not answered within PROBE_SLOW_S sets `unhealthy` at once, so that a
        replica whose engine hangs leaves routing seconds before the probe times out; the answer, when it comes,
        decides (a slow 200 clears it, and only failed probes count towards a restart)."""
        def silent() -> None:
            self.unhealthy = f"no answer to GET /health in {PROBE_SLOW_S:g} s"

        return await noting_silence(self._client.health_problem(timeout=PROBE_TIMEOUT_S), PROBE_SLOW_S, silent)

    async def _wait_healthy(self, proc: asyncio.subprocess.Process) -> bool:
        """Poll /health until 200 (True) or the process exits (False); print progress meanwhile."""
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        deadline = time.monotonic() + self.settings.vllm_start_timeout_s
        while proc.returncode is None:
            if await self._client.health(timeout=2.0):
                return True
            if time.monotonic() > deadline:
                _say(f"vLLM not ready after {self.settings.vllm_start_timeout_s:.0f} s; killing it")
                await self._kill()
                return False
            if time.monotonic() >= next_progress:
                _say(f"… {self.elapsed_s():.0f} s (waiting for vLLM)")
                next_progress += PROGRESS_EVERY_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout=POLL_S)
        return False

    async def _kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self._shm_files |= await asyncio.to_thread(group_shm_files, proc.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=15.0)
        except TimeoutError:
            pass
        # The group may outlive its leader (EngineCore, workers): make sure all of it is gone.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), timeout=5.0)
        for _ in range(30):  # its orphans are reaped by init a moment after the leader
            if not _group_alive(proc.pid):
                break
            await asyncio.sleep(0.1)
        if self._shm_files and not _group_alive(proc.pid):  # nobody of vLLM's left to use them
            removed = remove_shm_files(self._shm_files)
            if removed:
                _say(f"removed {removed} shared-memory file(s) {self.name} left in /dev/shm")
            self._shm_files = set()
        for path in (self.pid_path, self.socket_path):
            with contextlib.suppress(OSError):
                path.unlink()
