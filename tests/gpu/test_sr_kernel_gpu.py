"""The fused Triton stochastic-rounding apply matches the torch path's statistics and is unbiased (GPU only)."""

import pytest
import torch

from loop.worker import sr_triton
from loop.worker.update import stochastic_round_bf16

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_kernel_is_unbiased_and_keeps_sub_ulp_updates():
    w0 = torch.full((1 << 20,), 1.0, device="cuda", dtype=torch.bfloat16)
    d = torch.full_like(w0, 1e-3)  # far below half an ulp of 1.0 in bf16 (2**-8 = 0.0039)
    plain = (w0.float() + d.float()).to(torch.bfloat16)
    assert torch.equal(plain, w0), "round-to-nearest loses the update: the reason for SR"
    w = w0.clone()
    assert sr_triton.available(w, d)
    sr_triton.sr_add_(w, d, seed=1)
    mean = w.float().mean().item()
    assert abs(mean - 1.001) < 2e-4, mean
    ref = stochastic_round_bf16(w0.float() + d.float()).float().mean().item()
    assert abs(mean - ref) < 2e-4


def test_kernel_writes_in_place_and_handles_ragged_sizes():
    for n in (1, 4095, 4097, 3 * 4096 + 5):
        w = torch.randn(n, device="cuda").to(torch.bfloat16)
        ptr = w.data_ptr()
        d = torch.randn_like(w) * 0.1
        exact = w.float() + d.float()
        sr_triton.sr_add_(w, d, seed=n)
        assert w.data_ptr() == ptr
        lo = exact.to(torch.bfloat16).float()
        ulp = (lo.abs() * 2**-7).clamp_min(1e-30)
        assert torch.all((w.float() - exact).abs() <= ulp * 1.01)
