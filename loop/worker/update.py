"""The in-place apply: guard the staged update, then write it into the live weights.

What: `check_updates` refuses a non-finite or oversized update (naming the first bad tensor) before anything
is written; `apply_updates_` adds the deltas in place; `weights_checksum` proves bit-identity in tests.

Why stochastic rounding: bf16 keeps 8 significant bits, so adding an update smaller than half an ulp of the
weight (~0.2-0.4 % of its magnitude) with round-to-nearest returns the weight unchanged; with the small
learning rates of online preference tuning that is most updates, and training silently stops. Stochastic
rounding rounds up with probability equal to the remainder's fraction of an ulp, so the expected weight is
the exact sum and small updates accumulate over steps, without an fp32 master copy
(docs/design.md, "Zero-copy weights").
How (bf16): the sum is formed in fp32; bf16 is the top 16 bits of an fp32, so adding 16 uniform random bits
to the fp32 bit pattern and truncating the low 16 bits rounds up exactly with that probability (a carry into
the exponent is the correct round-up to the next binade). fp16 uses the neighbour-interpolation form; fp32
params get a plain add_.

The work is done one tensor at a time, so the extra memory is one tensor's fp32 size; contiguous bf16 CUDA
weights take the fused one-pass kernel in sr_triton.py instead.
Run the tests: .venv/bin/pytest tests/unit/worker/test_update.py
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

_LOW16 = 0xFFFF
_HIGH16 = -65536  # ~0xFFFF as a signed int32 mask


@dataclass
class UpdateCheck:
    """Outcome of check_updates: ok, or refused with a reason that names the first bad tensor."""

    ok: bool
    reason: str | None = None
    global_ratio: float = 0.0  # ||all deltas|| / ||all weights||
    max_tensor_ratio: float = 0.0
    worst_tensor: str | None = None
    ratios: dict[str, float] = field(default_factory=dict)
    update_norm: float = math.nan  # ||all deltas|| (the whole tensors' under tensor parallel); NaN if not reached


def _label(p: torch.Tensor, i: int, names: Mapping[torch.Tensor, str] | None) -> str:
    if names is not None and p in names:
        return names[p]
    return f"tensor #{i} {tuple(p.shape)} {str(p.dtype).removeprefix('torch.')}"


@torch.no_grad()
def check_updates(
    deltas: Mapping[torch.Tensor, torch.Tensor], max_ratio: float, *, names: Mapping[torch.Tensor, str] | None = None,
    tp: Any = None, tick: Callable[[], None] | None = None,
) -> UpdateCheck:
    """Every delta finite and shaped like its param; per-tensor and global ||delta||/||w|| <= max_ratio.

    A weight that is exactly zero has no meaningful ratio; it counts only in the global ratio. With `tp` (a rank of
    a tensor-parallel worker, loop/worker/tp.py) the norms are the whole tensors' and the verdict every rank's.
    `tick` is called after each tensor's norms are queued: a yield point for a trainer sharing the device with
    serving (loop/worker/pacing.py), since the norms read every weight and every delta."""
    check = _check_updates(deltas, max_ratio, names=names, tp=tp, tick=tick)
    if tp is None:
        return check
    ok, bad = tp.agree(check.ok)
    if check.ok and not ok:
        check.ok, check.reason = False, f"tensor-parallel rank(s) {bad} refused the update; nothing was written"
    return check


def _check_updates(
    deltas: Mapping[torch.Tensor, torch.Tensor], max_ratio: float, *, names: Mapping[torch.Tensor, str] | None,
    tp: Any, tick: Callable[[], None] | None,
) -> UpdateCheck:
    items = list(deltas.items())
    for i, (p, d) in enumerate(items):
        if d.shape != p.shape:
            return UpdateCheck(False, f"{_label(p, i, names)}: delta shape {tuple(d.shape)} does not match the weight "
                               f"{tuple(p.shape)}")
    if not items:
        return UpdateCheck(True)
    # all norms on the device, fp32-accumulated without fp32 copies, then ONE host sync for the lot
    dev = items[0][0].device
    rows = []
    for p, d in items:
        rows.append(torch.stack([torch.linalg.vector_norm(d, dtype=torch.float32).to(dev),
                                 torch.linalg.vector_norm(p, dtype=torch.float32).to(dev)]))
        if tick is not None:
            tick()
    stats = torch.stack(rows)
    if tp is not None:
        stats = tp.sum_squares([p for p, _ in items], stats)
    stats = stats.tolist()
    norm = math.sqrt(sum(dn * dn for dn, _ in stats))
    check = _verdict(items, stats, max_ratio, names, tp)
    check.update_norm = norm
    return check


def _verdict(items: list[tuple[torch.Tensor, torch.Tensor]], stats: list[list[float]], max_ratio: float,
             names: Mapping[torch.Tensor, str] | None, tp: Any) -> UpdateCheck:
    d2_total = 0.0
    w2_total = 0.0
    ratios: dict[str, float] = {}
    worst, worst_ratio = None, 0.0
    for i, ((p, d), (dn, wn)) in enumerate(zip(items, stats)):
        label = _label(p, i, names)
        if not math.isfinite(dn):  # a NaN/inf anywhere makes the norm non-finite (so does fp32 overflow)
            bad = int((~torch.isfinite(d)).sum())
            what = f"{bad} non-finite values (NaN/inf)" if bad else \
                "non-finite values (NaN/inf) in another tensor-parallel rank's slice" if tp is not None and tp.sharded(p) \
                else "a norm that overflows fp32"
            return UpdateCheck(False, f"{label}: update has {what}; nothing was written")
        d2_total += dn * dn
        w2_total += wn * wn
        if wn > 0:
            r = dn / wn
            ratios[label] = r
            if r > worst_ratio:
                worst, worst_ratio = label, r
            if r > max_ratio:
                return UpdateCheck(False, f"{label}: update norm ratio {r:.3g} exceeds the cap {max_ratio:g} "
                                   "(lower the learning rate or raise the cap); nothing was written",
                                   max_tensor_ratio=r, worst_tensor=label, ratios=ratios)
    g = math.sqrt(d2_total) / math.sqrt(w2_total) if w2_total > 0 else (0.0 if d2_total == 0 else math.inf)
    if g > max_ratio:
        return UpdateCheck(False, f"global update norm ratio {g:.3g} exceeds the cap {max_ratio:g}; nothing was written",
                           global_ratio=g, max_tensor_ratio=worst_ratio, worst_tensor=worst, ratios=ratios)
    return UpdateCheck(True, None, g, worst_ratio, worst, ratios)


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability (remainder / ulp): unbiased in expectation."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, _LOW16 + 1, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = (bits + noise) & _HIGH16  # carries propagate into the mantissa/exponent = round up
    return rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> dtype with stochastic rounding (bf16 by bit tricks; other floats by neighbour interpolation)."""
    if dtype == torch.bfloat16:
        return stochastic_round_bf16(x, generator)
    if dtype == torch.float32:
        return x
    near = x.to(dtype)
    nf = near.float()
    rest = x - nf
    toward = torch.where(rest >= 0, torch.full_like(near, math.inf), torch.full_like(near, -math.inf))
    other = torch.nextafter(near, toward)  # the neighbour on the other side of x, in the target dtype
    gap = (other.float() - nf).abs()
    prob = torch.where(gap > 0, rest.abs() / gap, torch.zeros_like(gap))
    u = torch.rand(x.shape, device=x.device, generator=generator)
    return torch.where(u < prob, other, near)


@torch.no_grad()
def apply_updates_(
    deltas: Mapping[torch.Tensor, torch.Tensor], *, stochastic_rounding: bool = True, generator: torch.Generator | None = None
) -> None:
    """param += delta, in place, one tensor at a time. Call check_updates first (this does not re-check).

    Contiguous bf16 CUDA weights take a fused Triton kernel (sr_triton.py: one read of w and delta, one write)."""
    from loop.worker import sr_triton

    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # the kernel's Philox seed; tensor i uses seed + i
    for i, (p, d) in enumerate(deltas.items()):
        if p.dtype == torch.float32 or p.dtype == torch.float64:
            p.add_(d.to(p.dtype))
            continue
        if stochastic_rounding and sr_triton.available(p, d):
            sr_triton.sr_add_(p, d, seed + i)
            continue
        s = p.float()
        s.add_(d)
        if stochastic_rounding and p.dtype == torch.bfloat16:  # in place: one fp32 and one int32 temporary
            bits = s.view(torch.int32)
            bits.add_(torch.randint(0, _LOW16 + 1, s.shape, dtype=torch.int32, device=s.device, generator=generator))
            bits.bitwise_and_(_HIGH16)
            p.copy_(s)  # exact: the low 16 bits are zero
        else:
            p.copy_(stochastic_round(s, p.dtype, generator) if stochastic_rounding else s)


@torch.no_grad()
def weights_checksum(params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names (if given), shapes, dtypes and the exact bytes of every tensor, in order."""
    h = hashlib.sha256()
    for item in params:
        name, t = item if isinstance(item, tuple) else ("", item)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        flat = t.detach().contiguous().reshape(-1)
        if flat.numel() == 0:
            continue
        raw = flat.view(torch.uint8)
        # GPU tensors travel to the host in 64 MiB chunks so a 7B model never needs a second full copy
        step = 1 << 26
        for start in range(0, raw.numel(), step):
            h.update(raw[start:start + step].cpu().numpy().data)
    return h.hexdigest()
