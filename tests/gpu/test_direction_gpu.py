"""The pre-write direction check (loop/worker/agreement.py) on CUDA weights: the base is read from disk on the host,
compared on the card, and gives the figures a CPU computation gives (GPU only)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loop.worker.agreement import BaseWeights, DirectionCheck

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_direction_on_cuda_matches_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loop.worker import agreement

    monkeypatch.setattr(agreement, "CHUNK", 1 << 12)  # several row chunks per tensor
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(300, 64, generator=g).bfloat16(), "b": torch.randn(999, generator=g).bfloat16()}
    save_file(base, str(tmp_path / "model.safetensors"))
    live = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}
    deltas = {k: (-0.5 * (live[k].float() - v.float()) + 1e-3 * torch.randn(v.shape, generator=g))
              for k, v in base.items()}

    def figures(device: str) -> agreement.Agreement:
        params = {k: torch.nn.Parameter(v.to(device)) for k, v in live.items()}
        check = DirectionCheck(BaseWeights(tmp_path), {p: k for k, p in params.items()})
        for k, p in params.items():
            check.observe(p, deltas[k].to(device))
        return check.result()

    gpu, cpu = figures("cuda"), figures("cpu")
    assert gpu.n_tensors == cpu.n_tensors == 2 and gpu.n_down == 2
    assert gpu.cosine == pytest.approx(cpu.cosine, rel=1e-4) and gpu.cosine < -0.9  # pulled back towards the base
    assert gpu.t == pytest.approx(cpu.t, rel=1e-4)
