"""`loop bench direction`: what the pre-write direction check (loop/worker/agreement.py) costs a scheduled run.

The check reads the base model's safetensors tensor by tensor (in row chunks) and, per trained tensor, takes the
dot product of the staged update with the weights' change since the base. This bench builds a model (random
weights from a config with --dummy, like vLLM's dummy load format), writes it as the "base" folder (HF shards),
moves the live weights a little, and times the check over every trained tensor twice. Both passes read the base
from the page cache when the machine's memory holds it (it was just written); a cold read from disk is slower by
the disk's speed and is not what this measures.
Printed: tensors, weight bytes, seconds and GB/s per pass, and the check's own peak memory beyond the weights
and the staged update (CUDA: allocator peak).

    loop bench direction --model smollm2
    loop bench direction --model loop/bench/configs/qwen2-7b --dummy --device cuda
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def run(args: argparse.Namespace) -> int:
    from loop.bench.train import load_model
    from loop.model_cache import resolve_model
    from loop.worker.agreement import BaseWeights, DirectionCheck
    from loop.worker.apollo import trainable_parameters

    path = args.model if args.dummy else resolve_model(args.model, Path(args.cache_dir).expanduser(), progress=True)
    model = load_model(path, device=args.device, random_init=args.dummy)
    trained = trainable_parameters(model)
    weight_bytes = sum(p.numel() * p.element_size() for _, p in trained)
    tmp = Path(tempfile.mkdtemp(prefix="loop-bench-direction-", dir=args.tmp_dir))
    try:
        t0 = time.perf_counter()
        model.save_pretrained(tmp, max_shard_size="4GB")
        print(f"{len(trained)} trained tensors, {weight_bytes / 1e9:.2f} GB ({next(model.parameters()).dtype}) on "
              f"{args.device}; base written to {tmp} in {time.perf_counter() - t0:.1f} s", flush=True)
        g = torch.Generator(device=args.device).manual_seed(0)
        with torch.no_grad():  # the kept runs' change: a small step on every weight
            for _, p in trained:
                p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype), alpha=1e-3)
            deltas = {p: torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * 1e-4
                      for _, p in trained}
        names = {p: n for n, p in trained}
        for label in ("pass 1", "pass 2"):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base_alloc = torch.cuda.memory_allocated()
            check = DirectionCheck(BaseWeights(tmp), names)
            t0 = time.perf_counter()
            for p, d in deltas.items():
                check.observe(p, d)
            found = check.result()
            s = time.perf_counter() - t0
            check.base.close()
            peak = (f", peak {(torch.cuda.max_memory_allocated() - base_alloc) / 2**20:.0f} MiB beyond weights and "
                    f"update") if args.device.startswith("cuda") else ""
            print(f"{label}: {s:.2f} s for {found.n_tensors} tensors ({weight_bytes / 1e9 / s:.1f} GB/s of base "
                  f"read and compared){peak}; cosine {found.cosine:+.4f}, t {found.t:+.2f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("direction", help="the cost of the pre-write direction check on one model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, an HF folder, or a config folder with --dummy")
    p.add_argument("--dummy", action="store_true", help="random weights from config.json (no weight files)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache-dir", default="~/.cache/loop")
    p.add_argument("--tmp-dir", default=None, help="where the base folder is written (default: the system's)")
    p.set_defaults(func=run)
