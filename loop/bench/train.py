"""Training benchmark (P2 memory, P4 throughput): APOLLO-Mini per-layer DPO against plain HF + AdamW.

What: on one HF causal LM, in the same run, time full-parameter DPO steps (reference log-probs + forward +
backward + optimizer + apply) and measure the peak memory each mode needs beyond the weights:
  apollo-mini-per-layer  loop's path: frozen embeddings, APOLLO-Mini, each delta applied with stochastic
                         rounding inside its post-accumulate-grad hook, answer-only chunked log-probs
  apollo-mini-staged     the same per-layer maths, deltas staged for the atomic apply, then applied
                         (the staged deltas cost 1x the trained weights in their dtype)
  hf-adamw               the plain recipe: all parameters, full logits, loss.backward(), torch AdamW .step()
Printed as a table: tokens/s, step time, peak extra bytes and that divided by the weight bytes.

Memory: loop/worker/memwatch.py, as the worker reports it each step: CUDA uses torch.cuda.max_memory_allocated
minus the allocation before the mode (the weights); the CPU the resident set's high-water mark over it (glibc's
malloc_trim returns freed memory first). CPU figures are indicative only; GPU figures are exact allocator peaks.

How to run (the CLI wiring is the lead's; this works as is):
  .venv/bin/python -m loop.bench.train --model ~/.cache/loop/models/SmolLM2-135M-Instruct-bf16 --pairs 2 --seq 256
  python -m loop.bench.train --model /path/to/qwen2-7b-config-dir --random-init --device cuda --pairs 4 --seq 1024
(--random-init builds the model from config.json alone, like vLLM's --load-format dummy.)
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loop.worker.apollo import make_optimizer, trainable_parameters
from loop.worker.memwatch import StepMemory
from loop.worker.objectives import (
    PairBatch,
    dpo_loss,
    enable_gradient_checkpointing,
    train_step,
)
from loop.worker.update import apply_updates_

MODES = ("apollo-mini-per-layer", "apollo-mini-staged", "hf-adamw")


@dataclass
class BenchRow:
    mode: str
    tokens_per_s: float
    step_s: float
    peak_extra_bytes: int
    weight_bytes: int
    optimizer_state_bytes: int

    @property
    def memory_ratio(self) -> float:
        return self.peak_extra_bytes / self.weight_bytes


def load_model(path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.bfloat16, random_init: bool = False) -> nn.Module:
    """An HF causal LM from a folder; random_init builds it from config.json only (no weight files needed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if random_init:
        cfg = AutoConfig.from_pretrained(str(path))
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
    return model


def synthetic_pairs(vocab_size: int, n_pairs: int, seq_len: int, answer_len: int, *, device: str = "cpu", seed: int = 0) -> PairBatch:
    """Random-token DPO batch (no padding): 2*n_pairs rows, the last answer_len tokens of each are scored."""
    if not 0 < answer_len < seq_len:
        raise ValueError(f"answer_len must be in (0, seq_len={seq_len}), got {answer_len}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (2 * n_pairs, seq_len), generator=g)
    ids[n_pairs:, : seq_len - answer_len] = ids[:n_pairs, : seq_len - answer_len]  # same prompt for both answers
    loss = torch.zeros_like(ids, dtype=torch.bool)
    loss[:, seq_len - answer_len:] = True
    return PairBatch(ids, torch.ones_like(ids), loss, n_pairs).to(device)


class _PeakMemory:
    """Peak bytes above the starting point (loop/worker/memwatch.py measures them, as the worker does each step),
    with the device settled first and last."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.peak = 0

    def __enter__(self) -> _PeakMemory:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        self._memory = StepMemory(self.device).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.peak = self._memory.stop() or 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _hf_adamw_runner(model: nn.Module, lr: float, beta: float) -> tuple[Callable[[PairBatch], None], Callable[[], int]]:
    model.train()
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr)

    def logps(batch: PairBatch) -> torch.Tensor:  # the usual recipe: full logits, log_softmax, gather
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits[:, :-1]
        lp = logits.float().log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
        return (lp * batch.loss_mask[:, 1:]).sum(-1)

    def step(batch: PairBatch) -> None:
        with torch.no_grad():
            ref = logps(batch)
        pol = logps(batch)
        n = batch.n_pairs
        loss, _ = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def state_bytes() -> int:
        return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))

    return step, state_bytes


def _apollo_runner(model: nn.Module, lr: float, beta: float, apply_in_hook: bool) -> tuple[Callable[[PairBatch], None], Callable[[], int]]:
    opt = make_optimizer("apollo-mini", [p for _, p in trainable_parameters(model)], lr=lr)

    def apply_now(p: torch.Tensor, d: torch.Tensor) -> None:
        apply_updates_({p: d})

    def step(batch: PairBatch) -> None:
        r = train_step(model, opt, batch, objective="dpo", beta=beta, per_layer=True, on_update=apply_now if apply_in_hook else None)
        if not apply_in_hook:
            apply_updates_(r.deltas)
            del r
        opt.commit()

    return step, opt.state_bytes


def bench_dpo(model: nn.Module, batch: PairBatch, *, modes: Sequence[str] = MODES, steps: int = 3, warmup: int = 1,
              lr: float = 1e-6, beta: float = 0.1, gradient_checkpointing: bool = True) -> list[BenchRow]:
    """Run each mode on the same model and batch; returns one row per mode (see the module docstring)."""
    device = next(model.parameters()).device
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    rows = []
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
        try:
            rows.append(_run_mode(model, batch, mode, device, weight_bytes, steps, warmup, lr, beta))
        except torch.OutOfMemoryError:  # the baseline may not fit where loop's path does: say so, go on
            rows.append(BenchRow(mode, float("nan"), float("nan"), -1, weight_bytes, -1))
        for p in model.parameters():
            p.grad = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _run_mode(model: nn.Module, batch: PairBatch, mode: str, device: torch.device, weight_bytes: int, steps: int,
              warmup: int, lr: float, beta: float) -> BenchRow:
    with _PeakMemory(device) as mem:
        if mode == "hf-adamw":
            step, state_bytes = _hf_adamw_runner(model, lr, beta)
        else:
            step, state_bytes = _apollo_runner(model, lr, beta, apply_in_hook=mode.endswith("per-layer"))
        for _ in range(warmup):
            step(batch)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step(batch)
        _sync(device)
        elapsed = time.perf_counter() - t0
        state = state_bytes()
    return BenchRow(mode, batch.n_tokens * steps / elapsed, elapsed / steps, int(mem.peak), weight_bytes, state)


def bench_apply(params: Sequence[torch.Tensor], repeats: int = 5) -> dict[str, float]:
    """Milliseconds to add a staged update to every given weight: apply_updates_ with stochastic rounding
    against the floor, a plain in-place add moving the same bytes (read w, read delta, write w)."""
    device = params[0].device
    deltas = {p: torch.randn_like(p) * 1e-6 for p in params}  # one staged update in the weights' dtype
    moved = sum(3 * p.numel() * p.element_size() for p in params)

    def timed(fn: Callable[[], None]) -> float:
        fn()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync(device)
        return (time.perf_counter() - t0) / repeats * 1e3

    def floor() -> None:
        with torch.no_grad():
            for p, d in deltas.items():
                p.add_(d)

    floor_ms = timed(floor)
    sr_ms = timed(lambda: apply_updates_(deltas))
    return {"floor_ms": floor_ms, "sr_apply_ms": sr_ms, "ratio": sr_ms / floor_ms, "floor_GBps": moved / floor_ms / 1e6}


def format_table(rows: Sequence[BenchRow], device_name: str) -> str:
    head = f"DPO step on {device_name}\n{'mode':<24}{'tokens/s':>12}{'step s':>10}{'peak extra GiB':>16}{'/ weights':>11}{'optim GiB':>11}"
    lines = [head]
    for r in rows:
        if r.peak_extra_bytes < 0:
            lines.append(f"{r.mode:<24}{'out of memory':>12}")
            continue
        lines.append(f"{r.mode:<24}{r.tokens_per_s:>12.1f}{r.step_s:>10.3f}{r.peak_extra_bytes / 2**30:>16.3f}"
                     f"{r.memory_ratio:>11.3f}{r.optimizer_state_bytes / 2**30:>11.4f}")
    base = next((r for r in rows if r.mode == "hf-adamw" and r.peak_extra_bytes >= 0), None)
    if base is not None:
        for r in rows:
            if r is not base and r.peak_extra_bytes >= 0:
                lines.append(f"{r.mode}: {r.tokens_per_s / base.tokens_per_s:.2f}x the throughput of hf-adamw "
                             f"at {r.peak_extra_bytes / max(base.peak_extra_bytes, 1):.2f}x its extra memory")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def main(argv: Sequence[str] | None = None) -> list[BenchRow]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--model", required=True, help="HF model folder (config.json; weights unless --random-init)")
    ap.add_argument("--random-init", action="store_true", help="random weights from config.json (like --load-format dummy)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512, help="tokens per sequence (prompt + answer)")
    ap.add_argument("--answer", type=int, default=0, help="scored answer tokens per sequence (default: seq // 2)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--apply", action="store_true", help="also time the in-place SR apply of one update over the trained weights")
    args = ap.parse_args(argv)
    model = load_model(Path(args.model).expanduser(), device=args.device, random_init=args.random_init)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    batch = synthetic_pairs(vocab, args.pairs, args.seq, args.answer or args.seq // 2, device=args.device)
    rows = bench_dpo(model, batch, modes=args.modes.split(","), steps=args.steps,
                     gradient_checkpointing=not args.no_gradient_checkpointing)
    print(format_table(rows, device_name(torch.device(args.device))))
    if args.apply:
        trained = [p for _, p in trainable_parameters(model)]
        a = bench_apply(trained)
        gb = sum(p.numel() * p.element_size() for p in trained) / 1e9
        print(f"apply of one update to {gb:.2f} GB of trained weights: SR {a['sr_apply_ms']:.2f} ms, "
              f"floor (plain add, same bytes) {a['floor_ms']:.2f} ms at {a['floor_GBps']:.0f} GB/s -> {a['ratio']:.2f}x the floor")
    return rows


if __name__ == "__main__":
    main()
