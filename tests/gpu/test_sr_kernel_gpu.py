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


def test_the_staged_values_take_the_fused_kernel_into_the_delta_and_match_the_torch_path() -> None:
    from loop.worker.main import Worker

    exact = torch.randn(1 << 18, device="cuda") * 0.05
    base = exact.to(torch.bfloat16)
    rest = (exact - base.float()).to(torch.bfloat16)  # a bf16 delta: its memory takes the value
    ptr = rest.data_ptr()
    total = base.float() + rest.float()
    lo = (total.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    hi = torch.nextafter(lo, lo * float("inf"))
    ticks: list[int] = []
    torch.manual_seed(3)
    value = Worker._new_values({base: rest.clone()}, tick=lambda: ticks.append(1))[base]
    assert ticks == [1] and value.dtype == torch.bfloat16
    torch.manual_seed(3)
    in_place = Worker._new_values({base: rest})[base]
    assert in_place.data_ptr() == ptr  # written over the delta, no new tensor
    assert torch.equal(in_place, value)  # same seed, same bits
    assert bool(((value == lo) | (value == hi)).all())
    assert abs(float((value.double() - total.double()).mean())) < 2e-6  # unbiased
    f32 = Worker._new_values({base: (total - base.float())})[base]  # an fp32 delta: a new bf16 tensor
    assert f32.dtype == torch.bfloat16 and bool(((f32 == lo) | (f32 == hi)).all())
