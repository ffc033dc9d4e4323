"""One fused GPU kernel for the apply: out <- stochastic_round_bf16(float(w) + float(delta)), out = w in place.

Why: the torch path in update.py builds the fp32 sum, a tensor of random ints and the rounded result — several
full-size temporaries and about ten passes over memory per weight. The apply runs while vLLM is paused, so its
cost is serving downtime. This kernel reads w and delta once and writes w once (6 bytes/element for bf16
deltas), drawing the 16 random bits in registers (Philox, seeded per call), so the apply runs at memory
bandwidth. Same bit trick as update.stochastic_round_bf16: bf16 is the top half of an fp32; add 16 uniform random
bits below it and truncate.

Used by update.apply_updates_ (in place) and by the worker's staged values (`sr_sum_`, written into the bf16
delta's own memory, so a step's rounding before the pause is one pass too: it runs beside serving) for contiguous
bf16 CUDA weights when Triton is importable; everything else takes the torch path. Tested against the torch path on the GPU (tests/gpu/test_sr_kernel_gpu.py).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path is used
    triton = None


def available(p: torch.Tensor, d: torch.Tensor) -> bool:
    return (triton is not None and p.is_cuda and p.dtype == torch.bfloat16 and p.is_contiguous()
            and d.is_contiguous() and d.device == p.device and d.shape == p.shape)


if triton is not None:

    @triton.jit
    def _sr_add_part(w_ptr, d_ptr, o_ptr, offs, n, rand):
        mask = offs < n
        s = tl.load(w_ptr + offs, mask=mask).to(tl.float32) + tl.load(d_ptr + offs, mask=mask).to(tl.float32)
        rounded = (s.to(tl.int32, bitcast=True) + (rand & 0xFFFF).to(tl.int32)) & -65536
        tl.store(o_ptr + offs, rounded.to(tl.float32, bitcast=True).to(tl.bfloat16), mask=mask)

    @triton.jit
    def _sr_add_kernel(w_ptr, d_ptr, o_ptr, n, seed, BLOCK: tl.constexpr):
        # One Philox call per element (tl.randint) made the kernel compute-bound at 2x the bandwidth floor on
        # an H200. randint4x gives 4 words = 8 x 16 random bits per call, one per eighth of the block: at floor.
        part: tl.constexpr = BLOCK // 8
        pid = tl.program_id(0).to(tl.int64)
        lane = tl.arange(0, part)
        r0, r1, r2, r3 = tl.randint4x(seed, (pid * part + lane).to(tl.uint32))
        base = pid * BLOCK + lane
        _sr_add_part(w_ptr, d_ptr, o_ptr, base, n, r0)
        _sr_add_part(w_ptr, d_ptr, o_ptr, base + part, n, r0 >> 16)
        _sr_add_part(w_ptr, d_ptr, o_ptr, base + 2 * part, n, r1)
        _sr_add_part(w_ptr, d_ptr, o_ptr, base + 3 * part, n, r1 >> 16)
        _sr_add_part(w_ptr, d_ptr, o_ptr, base + 4 * part, n, r2)
        _sr_add_part(w_ptr, d_ptr, o_ptr, base + 5 * part, n, r2 >> 16)
        _sr_add_part(w_ptr, d_ptr, o_ptr, base + 6 * part, n, r3)
        _sr_add_part(w_ptr, d_ptr, o_ptr, base + 7 * part, n, r3 >> 16)


@torch.no_grad()
def sr_add_(p: torch.Tensor, d: torch.Tensor, seed: int) -> None:
    """p += d with stochastic rounding to bf16, in place, in one pass. Caller checks `available(p, d)`."""
    sr_sum_(p, d, p, seed)


@torch.no_grad()
def sr_sum_(p: torch.Tensor, d: torch.Tensor, out: torch.Tensor, seed: int) -> torch.Tensor:
    """out <- p + d with stochastic rounding to bf16, one pass; `out` may be `p` or `d` (each element is read
    before its own store). Caller checks `available(p, d)` and that `out` is a contiguous bf16 tensor of p's
    shape on its device. Returns out."""
    if not (out.dtype == torch.bfloat16 and out.is_contiguous() and out.shape == p.shape and out.device == p.device):
        raise ValueError(f"sr_sum_ writes a contiguous bf16 tensor of shape {tuple(p.shape)} on {p.device}; got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    n = p.numel()
    if n == 0:
        return out
    block = 8192
    grid = (triton.cdiv(n, block),)
    _sr_add_kernel[grid](p, d, out, n, seed, BLOCK=block)
    return out
