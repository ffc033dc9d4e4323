"""`loop bench direction`: what the pre-write screen (loop/worker/screen.py) costs a scheduled run.

The screen reads the learned direction v = w_live - w_base from the base folder's safetensors (keeping at most
the budget of it, in the weights' dtype) and then runs one forward + backward per distinct sequence of the batch,
dotting each probed weight's gradient with its v. This bench builds a model (random weights from a config with
--dummy, like vLLM's dummy load format), writes it as the "base" folder, moves the live weights a little, and times
both parts on a synthetic DPO batch (random tokens, every pair sharing its prompt) twice: the first pass pays the
warm-up, the second is the figure. The base is read from the page cache when the machine's memory holds it (it was
just written); a cold read from disk is slower by the disk's speed and is not what this measures.
Printed per pass: the direction read (seconds, tensors probed, share of ||v||^2, bytes of v kept) and the
per-sequence screen (ms per sequence and per pair), each with its peak memory beyond the weights (CUDA: allocator
peak; CPU: sampled RSS).

    loop bench direction --model smollm2
    loop bench direction --model loop/bench/configs/qwen2-7b --dummy --device cuda --budget-mib 1024
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def run(args: argparse.Namespace) -> int:
    from loop.bench.train import _PeakMemory, load_model, synthetic_pairs
    from loop.model_cache import resolve_model
    from loop.worker.apollo import trainable_parameters
    from loop.worker.screen import (
        BaseWeights,
        directional_derivatives,
        learned_direction,
    )

    path = args.model if args.dummy else resolve_model(args.model, Path(args.cache_dir).expanduser(), progress=True)
    model = load_model(path, device=args.device, random_init=args.dummy)
    device = next(model.parameters()).device
    trained = trainable_parameters(model)
    weight_bytes = sum(p.numel() * p.element_size() for _, p in trained)
    budget = args.budget_mib << 20
    tmp = Path(tempfile.mkdtemp(prefix="loop-bench-direction-", dir=args.tmp_dir))
    try:
        t0 = time.perf_counter()
        model.save_pretrained(tmp, max_shard_size="4GB")
        print(f"{len(trained)} trained tensors, {weight_bytes / 1e9:.2f} GB ({next(model.parameters()).dtype}) on "
              f"{args.device}; base written to {tmp} in {time.perf_counter() - t0:.1f} s; screen budget "
              f"{args.budget_mib} MiB", flush=True)
        g = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():  # the kept runs' change: a small step on every trained weight
            for _, p in trained:
                p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype), alpha=1e-3)
        batch = synthetic_pairs(model.config.vocab_size, args.pairs, args.seq_len, args.answer_len)
        prompt_len = args.seq_len - args.answer_len
        rows = [(ids, prompt_len) for ids in batch.input_ids.tolist()]
        for label in ("pass 1", "pass 2"):
            with _PeakMemory(device) as read_mem:
                t0 = time.perf_counter()
                direction = learned_direction(BaseWeights(tmp), trained, budget)
                read_s = time.perf_counter() - t0
            v_bytes = sum(v.numel() * v.element_size() for v in direction.v.values())
            with _PeakMemory(device) as screen_mem:
                t0 = time.perf_counter()
                per_row = directional_derivatives(model, rows, direction)
                screen_s = time.perf_counter() - t0
            direction.v.clear()
            ms = screen_s * 1000 / len(rows)
            print(f"{label}: direction read in {read_s:.2f} s ({len(direction.names)} tensors, "
                  f"{100 * direction.probed_fraction:.0f}% of ||v||^2, v {v_bytes / 2**20:.0f} MiB, peak "
                  f"{read_mem.peak / 2**20:.0f} MiB); screen {ms:.1f} ms per sequence of {args.seq_len} tokens "
                  f"({2 * ms:.1f} ms per pair, {len(rows)} sequences), peak {screen_mem.peak / 2**20:.0f} MiB "
                  f"beyond the weights and v; {sum(x < 0 for x in per_row)} of {len(per_row)} sequences pull back",
                  flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("direction", help="the cost of the pre-write screen on one model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, an HF folder, or a config folder with --dummy")
    p.add_argument("--dummy", action="store_true", help="random weights from config.json (no weight files)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget-mib", type=int, default=1024, help="the screen's budget for v (screen_budget_bytes)")
    p.add_argument("--pairs", type=int, default=8, help="DPO pairs in the screened batch")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (prompt + answer)")
    p.add_argument("--answer-len", type=int, default=64, help="answer tokens per sequence")
    p.add_argument("--cache-dir", default="~/.cache/loop")
    p.add_argument("--tmp-dir", default=None, help="where the base folder is written (default: the system's)")
    p.set_defaults(func=run)
