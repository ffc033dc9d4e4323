"""The guarded in-place apply with stochastic rounding (loop/worker/update.py)."""

from __future__ import annotations

import pytest
import torch

from loop.worker.update import apply_updates_, check_updates, stochastic_round, weights_checksum


def _bf16_weights(n: int = 4096, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.05).to(torch.bfloat16)


def _ulp_bf16(w: torch.Tensor) -> torch.Tensor:
    """Distance from |w| to the next bf16 above it."""
    a = w.abs()
    return (torch.nextafter(a, torch.full_like(a, float("inf"))).float() - a.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased(dtype: torch.dtype) -> None:
    w = _bf16_weights(2048).to(dtype)
    exact = w.float() + 0.3 * _ulp_bf16(w.to(torch.bfloat16)).to(torch.float32) * torch.sign(torch.randn(2048))
    gen = torch.Generator().manual_seed(1)
    draws = 2000
    total = torch.zeros(2048, dtype=torch.float64)
    for _ in range(draws):
        total += stochastic_round(exact, dtype, gen).double()
    mean = total / draws
    err = (mean - exact.double()).abs()
    ulp = _ulp_bf16(w.to(torch.bfloat16)).double()
    # each draw is one of two neighbours <= 1 ulp apart: the mean's std is <= ulp / (2 sqrt(draws))
    assert float((err / ulp).mean()) < 0.02
    nearest = exact.to(dtype).double()
    assert float((nearest - exact.double()).abs().mean()) > 5 * float(err.mean())  # RNE is biased here, SR is not


def test_sr_results_are_neighbours_of_the_exact_value() -> None:
    exact = torch.randn(10_000) * 3
    out = stochastic_round(exact, torch.bfloat16, torch.Generator().manual_seed(0))
    toward_zero = (exact.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)  # exact cast
    away = torch.nextafter(toward_zero, toward_zero * float("inf"))
    assert bool(((out == toward_zero) | (out == away)).all())
    assert 0.3 < float((out == away).float().mean()) < 0.7  # both neighbours occur


def test_plain_bf16_add_loses_tiny_updates_and_sr_keeps_them() -> None:
    w0 = _bf16_weights()
    step = (0.1 * _ulp_bf16(w0)).float()  # a tenth of an ulp: round-to-nearest drops it every time
    plain, sr = w0.clone(), w0.clone()
    gen = torch.Generator().manual_seed(2)
    for _ in range(50):
        apply_updates_({plain: step}, stochastic_rounding=False)
        apply_updates_({sr: step}, stochastic_rounding=True, generator=gen)
    assert torch.equal(plain, w0)
    moved = (sr.float() - w0.float()) / (50 * step)
    assert 0.8 < float(moved.mean()) < 1.2  # in expectation the full 50 steps arrived


def test_fp32_params_get_an_exact_add() -> None:
    w = torch.randn(100)
    d = torch.randn(100) * 1e-3
    expected = w + d
    apply_updates_({w: d})
    assert torch.equal(w, expected)


def test_same_generator_seed_same_result() -> None:
    a, b = _bf16_weights(), _bf16_weights()
    d = torch.randn(4096) * 1e-4
    apply_updates_({a: d}, generator=torch.Generator().manual_seed(9))
    apply_updates_({b: d}, generator=torch.Generator().manual_seed(9))
    assert weights_checksum([a]) == weights_checksum([b])


def test_nan_update_is_refused_and_weights_stay_bit_identical() -> None:
    good, bad = _bf16_weights(seed=1), _bf16_weights(seed=2)
    before = weights_checksum([good, bad])
    dbad = torch.zeros(4096)
    dbad[17] = float("nan")
    deltas = {good: torch.full((4096,), 1e-4), bad: dbad}
    check = check_updates(deltas, max_ratio=0.5, names={good: "layers.0.mlp", bad: "layers.1.attn.q_proj.weight"})
    assert not check.ok and "layers.1.attn.q_proj.weight" in check.reason and "non-finite" in check.reason
    if check.ok:  # the worker's protocol: apply only after a passing check
        apply_updates_(deltas)
    assert weights_checksum([good, bad]) == before


def test_inf_and_unnamed_tensor_reason() -> None:
    w = torch.ones(3, 4)
    check = check_updates({w: torch.tensor([[0, 0, 0, float("inf")]] * 3)}, max_ratio=1.0)
    assert not check.ok and "tensor #0 (3, 4) float32" in check.reason


def test_oversized_update_is_refused_per_tensor_and_globally() -> None:
    a, b = torch.ones(100), torch.ones(100)
    check = check_updates({a: torch.full((100,), 0.01), b: torch.full((100,), 0.2)}, max_ratio=0.1, names={a: "a", b: "b"})
    assert not check.ok and check.reason.startswith("b:") and "0.2" in check.reason
    ok = check_updates({a: torch.full((100,), 0.01), b: torch.full((100,), 0.02)}, max_ratio=0.1)
    assert ok.ok and ok.reason is None
    assert ok.global_ratio == pytest.approx((0.01**2 + 0.02**2) ** 0.5 / 2**0.5, rel=1e-5)
    zero = torch.zeros(10)  # a zero weight has no per-tensor ratio, but counts globally
    glob = check_updates({zero: torch.ones(10), a: torch.zeros(100)}, max_ratio=0.2)
    assert not glob.ok and "global" in glob.reason


def test_the_check_reports_the_whole_update_norm_and_ticks_once_per_tensor() -> None:
    a, b = torch.ones(100), torch.ones(50)
    ticks: list[int] = []
    ok = check_updates({a: torch.full((100,), 0.01), b: torch.full((50,), 0.02)}, max_ratio=0.1,
                       tick=lambda: ticks.append(1))
    assert ok.ok and len(ticks) == 2
    assert ok.update_norm == pytest.approx((100 * 0.01**2 + 50 * 0.02**2) ** 0.5, rel=1e-5)
    refused = check_updates({a: torch.full((100,), 0.5)}, max_ratio=0.1)  # a refusal still says how large
    assert not refused.ok and refused.update_norm == pytest.approx(5.0, rel=1e-5)


def test_shape_mismatch_is_refused() -> None:
    w = torch.ones(4, 4)
    check = check_updates({w: torch.zeros(16)}, max_ratio=1.0)
    assert not check.ok and "shape" in check.reason


def test_checksum_sees_one_bit_and_names() -> None:
    w = _bf16_weights()
    base = weights_checksum([w])
    assert weights_checksum([w.clone()]) == base
    flipped = w.clone()
    flipped.view(torch.int16)[123] ^= 1
    assert weights_checksum([flipped]) != base
    assert weights_checksum([("x", w)]) != weights_checksum([("y", w)])
    assert weights_checksum([w.view(64, 64)]) != base  # shape is part of the identity


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_apply_is_unbiased_and_a_refused_update_writes_nothing() -> None:
    w0 = _bf16_weights(1 << 16).cuda()
    step = (0.1 * _ulp_bf16(w0)).float()
    w = w0.clone()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(100):
        apply_updates_({w: step}, generator=gen)
    moved = (w.float() - w0.float()) / (100 * step)
    assert 0.95 < float(moved.mean()) < 1.05
    before = weights_checksum([w])
    bad = step.clone()
    bad[5] = float("nan")
    assert not check_updates({w: bad}, max_ratio=1.0).ok
    assert weights_checksum([w]) == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_and_torch_paths_agree_in_distribution() -> None:
    exact = torch.randn(1 << 18, device="cuda") * 0.05
    base = exact.to(torch.bfloat16)
    rest = exact - base.float()
    fused = base.clone()
    apply_updates_({fused: rest}, generator=torch.Generator(device="cuda").manual_seed(1))  # contiguous: the kernel
    strided = torch.empty((1 << 18) * 2, dtype=torch.bfloat16, device="cuda")[::2]
    strided.copy_(base)
    apply_updates_({strided: rest}, generator=torch.Generator(device="cuda").manual_seed(1))  # the torch path
    for out in (fused, strided):
        toward_zero = (exact.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
        away = torch.nextafter(toward_zero, toward_zero * float("inf"))
        assert bool(((out == toward_zero) | (out == away)).all())
        assert abs(float((out.double() - exact.double()).mean())) < 2e-6  # unbiased: errors cancel

