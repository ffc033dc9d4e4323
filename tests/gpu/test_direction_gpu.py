"""The screen's learned direction (loop/worker/screen.py) on CUDA weights: the base is read from disk on the host,
compared on the card, and gives the v and probed share a CPU computation gives (GPU only)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loop.worker import screen
from loop.worker.screen import BaseWeights, learned_direction

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_learned_direction_on_cuda_matches_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(screen, "CHUNK", 1 << 12)  # several row chunks per tensor
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(300, 64, generator=g).bfloat16(), "b": torch.randn(999, generator=g).bfloat16(),
            "c": torch.randn(128, 32, generator=g).bfloat16()}
    save_file(base, str(tmp_path / "model.safetensors"))
    live = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}
    budget = (300 * 64 + 999) * 2  # room for two of the three tensors

    def direction(device: str) -> tuple[dict[str, torch.Tensor], float]:
        weights = [(k, v.to(device)) for k, v in live.items()]
        found = learned_direction(BaseWeights(tmp_path), weights, budget)
        by_name = {name: found.v[w].float().cpu() for name, w in weights if w in found.v}
        return by_name, found.probed_fraction

    cpu, cpu_share = direction("cpu")
    cuda, cuda_share = direction("cuda")
    assert set(cpu) == set(cuda) and len(cpu) == 2 and 0 < cpu_share < 1
    assert cuda_share == pytest.approx(cpu_share, rel=1e-6)
    for name in cpu:
        assert torch.equal(cpu[name], cuda[name])
