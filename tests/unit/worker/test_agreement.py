"""The pre-write direction check (loop/worker/agreement.py): does an update pull the weights back from their
change since the base model? Exact figures on small tensors, shards and row chunks, and the verdict's rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loop.worker import agreement
from loop.worker.agreement import Agreement, BaseWeights, DirectionCheck


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(6, 4, generator=g), "b.weight": torch.randn(5, generator=g),
            "c.weight": torch.randn(3, 7, generator=g)}


def _check(base: Path, live: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> Agreement:
    params = {name: torch.nn.Parameter(t.clone()) for name, t in live.items()}
    check = DirectionCheck(BaseWeights(base), {prm: name for name, prm in params.items()})
    for name, prm in params.items():
        check.observe(prm, deltas[name])
    return check.result()


def test_figures_match_a_direct_computation_across_shards_and_chunks(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    base, live, deltas = _tensors(0), _tensors(1), _tensors(2)
    save_file({"a.weight": base["a.weight"]}, str(tmp_path / "part-1.safetensors"))
    save_file({k: base[k] for k in ("b.weight", "c.weight")}, str(tmp_path / "part-2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "part-1.safetensors", "b.weight": "part-2.safetensors", "c.weight": "part-2.safetensors"}}))
    monkeypatch.setattr(agreement, "CHUNK", 8)  # a.weight in 3 chunks of 2 rows, b.weight in chunks of 8
    found = _check(tmp_path, live, deltas)
    dots = [float((deltas[k] * (live[k] - base[k])).sum()) for k in base]
    d2 = sum(float((deltas[k] ** 2).sum()) for k in base)
    a2 = sum(float(((live[k] - base[k]) ** 2).sum()) for k in base)
    mean = sum(dots) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in dots) / 2)
    assert found.n_tensors == 3 and found.n_down == sum(x < 0 for x in dots)
    assert found.cosine == pytest.approx(sum(dots) / math.sqrt(d2 * a2), rel=1e-5)
    assert found.t == pytest.approx(mean / (sd / math.sqrt(3)), rel=1e-5)


def test_an_update_along_the_learned_change_agrees_and_its_reverse_is_rejected(tmp_path: Path) -> None:
    base, noise = _tensors(0), _tensors(3)
    learned = {k: v + 0.1 * noise[k] for k, v in base.items()}  # what the kept runs wrote
    save_file(base, str(tmp_path / "model.safetensors"))
    onward = {k: 1e-3 * noise[k] for k in base}
    back = {k: -v for k, v in onward.items()}
    good, bad = _check(tmp_path, learned, onward), _check(tmp_path, learned, back)
    assert good.cosine == pytest.approx(1.0, abs=1e-4) and bad.cosine == pytest.approx(-1.0, abs=1e-4)
    assert bad.n_down == 3 and good.n_down == 0
    assert agreement.verdict(good, max_conflict_t=3.0) is None
    why = agreement.verdict(bad, max_conflict_t=1.0)
    assert why is not None and "would undo what the kept runs taught" in why and "3 of 3 tensors" in why


def test_nothing_learned_yet_or_no_base_tensor_means_no_verdict(tmp_path: Path) -> None:
    base = _tensors(0)
    save_file({"a.weight": base["a.weight"]}, str(tmp_path / "model.safetensors"))
    found = _check(tmp_path, base, _tensors(2))  # live == base; b and c are not in the base file
    assert found.n_tensors == 1 and found.cosine == 0.0 and found.t is None
    assert agreement.verdict(found, max_conflict_t=0.0) is None
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        BaseWeights(tmp_path / "nowhere")


def test_verdict_needs_a_negative_cosine_and_a_t_past_the_limit() -> None:
    assert agreement.verdict(Agreement(200, -0.01, -5.0, 150), max_conflict_t=3.0) is not None
    assert agreement.verdict(Agreement(200, -0.01, -2.0, 150), max_conflict_t=3.0) is None  # not far enough
    assert agreement.verdict(Agreement(200, +0.01, -5.0, 150), max_conflict_t=3.0) is None  # overall onward
    assert agreement.verdict(Agreement(1, -1.0, None, 1), max_conflict_t=0.0) is None  # one tensor: no spread
    assert set(Agreement(200, -0.01, -5.0, 150).metrics()) == {
        "agreement_tensors", "agreement_cosine", "agreement_down", "agreement_ms", "agreement_t"}
