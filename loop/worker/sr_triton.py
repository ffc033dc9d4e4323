"""One fused GPU kernel for the in-place apply: w <- stochastic_round_bf16(float(w) + float(delta)).

Why: the torch path in update.py builds the fp32 sum, a tensor of random ints and the rounded result — several
full-size temporaries and about ten passes over memory per weight. The apply runs while vLLM is paused, so its
cost is serving downtime. This kernel reads w and delta once and writes w once (6 bytes/element for bf16
deltas), drawing the 16 random bits in registers (Philox, seeded per call), so the apply runs at memory
bandwidth. Same bit trick as update.stochastic_round_bf16: bf16 is the top half of an fp32; add 16 uniform random
bits below it and truncate.

Used by update.apply_updates_ for contiguous bf16 CUDA weights when Triton is importable; everything else takes
the torch path. Tested against the torch path on the GPU (tests/gpu/test_sr_kernel_gpu.py).
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
    def _sr_add_kernel(w_ptr, d_ptr, n, seed, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        w = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
        d = tl.load(d_ptr + offs, mask=mask).to(tl.float32)
        s = w + d
        bits = s.to(tl.int32, bitcast=True)
        noise = (tl.randint(seed, offs) & 0xFFFF).to(tl.int32)
        rounded = (bits + noise) & -65536
        out = rounded.to(tl.float32, bitcast=True).to(tl.bfloat16)
        tl.store(w_ptr + offs, out, mask=mask)


@torch.no_grad()
def sr_add_(p: torch.Tensor, d: torch.Tensor, seed: int) -> None:
    """p += d with stochastic rounding to bf16, in place, in one pass. Caller checks `available(p, d)`."""
    n = p.numel()
    if n == 0:
        return
    block = 4096
    grid = (triton.cdiv(n, block),)
    _sr_add_kernel[grid](p, d, n, seed, BLOCK=block)
