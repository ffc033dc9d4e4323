"""The update a remote replica stages (loop/worker/remotes.py `UpdatePlan`): every vLLM tensor it touches, made
before the pause, equals what the apply then leaves in replica 0, fused tensors and row-ordered copies included;
the tensors it does not touch are not sent."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from loop.layout import Placement
from loop.worker.apollo import trainable_parameters
from loop.worker.remotes import Remotes, UpdatePlan
from loop.worker.views import build_model, write_back
from tests.unit.worker.test_views import CONFIGS
from tests.vllm_like import vllm_layout

MB_S = 20.0  # any rate: nothing is sent here


def _model(tmp_path: Path, name: str, rows: bool = False) -> tuple[object, dict[str, torch.Tensor]]:
    config = CONFIGS[name]()
    config.save_pretrained(tmp_path)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config).eval()
    fused, layout = vllm_layout(ref)
    if rows:  # Llama 4's case: q's rows kept by vLLM in another order, trained as a copy and written back
        q, qkv = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.qkv_proj.weight"
        perm = torch.randperm(32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            fused[qkv][:32] = ref.get_parameter(q)[perm]
        layout.tensors[q] = Placement("rows", param=qkv, offset=0, shape=(32, 32),
                                      rows=tuple(torch.argsort(perm).tolist()), reason="another order")
    return build_model(str(tmp_path), fused, layout=layout), fused


def _check(model: object, fused: dict[str, torch.Tensor], only: int | None = None) -> None:
    trainable = trainable_parameters(model)
    chosen = trainable if only is None else trainable[:only]
    g = torch.Generator().manual_seed(2)
    values = {prm: (prm.detach() + 0.01 * torch.randn(prm.shape, generator=g)).to(prm.dtype) for _, prm in chosen}
    before = {n: t.clone() for n, t in fused.items()}
    plan = UpdatePlan(model, fused, values)
    ticks: list[int] = []
    staged = dict(plan.tensors(tick=lambda: ticks.append(1)))
    assert list(staged) == plan.names and len(ticks) == len(plan.names)
    for n, t in fused.items():  # making the plan wrote nothing
        assert torch.equal(t, before[n]), n
    with torch.no_grad():  # what Apply does
        for prm, v in values.items():
            prm.copy_(v)
    write_back(model)
    changed = {n for n, t in fused.items() if not torch.equal(t, before[n])}
    assert changed <= set(staged)  # everything the apply changed was staged ...
    for n, t in staged.items():  # ... with exactly the apply's bytes
        assert torch.equal(t, fused[n]), n


def test_the_staged_tensors_are_what_the_apply_writes_for_each_family(tmp_path: Path) -> None:
    for name in sorted(CONFIGS):
        model, fused = _model(tmp_path / name, name)
        _check(model, fused)


def test_row_ordered_copies_are_staged_in_vllms_order(tmp_path: Path) -> None:
    model, fused = _model(tmp_path, "llama-tied", rows=True)
    assert model.loop_rows
    _check(model, fused)


def test_a_partial_update_stages_only_the_tensors_it_touches(tmp_path: Path) -> None:
    model, fused = _model(tmp_path, "qwen2-bias")
    _check(model, fused, only=1)
    first = trainable_parameters(model)[0][1]
    plan = UpdatePlan(model, fused, {first: first.detach().clone()})
    assert len(plan.names) == 1 and plan.names[0] in fused


def test_remote_indices_follow_the_local_replicas() -> None:
    r = Remotes(["http://a:1", "http://b:2/"], "t" * 16, first=3, min_mb_s=MB_S)
    assert [r.owns(k) for k in range(6)] == [False, False, False, True, True, False]
    assert r.url(4) == "http://b:2"
    assert r.checksums() == ["", ""]  # none synced: nothing to ask


class _Ranks:
    """Two tensor-parallel ranks' lists as the group's all-gather would return them (this rank is 0)."""

    def __init__(self, other: list[int]) -> None:
        self.other = other

    def every_ints(self, mine: list[int]) -> list[list[int]]:
        return [list(mine), [int(k in self.other) for k in range(len(mine))]]


def test_a_replica_one_rank_lost_is_lost_on_every_rank() -> None:
    """Each rank moves its own shards to a remote replica; one that missed rank 1's part holds torn weights, so
    rank 0 forgets it too and reports it (it leaves routing and is synced whole before it serves)."""
    from types import SimpleNamespace

    from loop.worker.main import Worker

    remotes = Remotes(["http://a:1", "http://b:2"], "t" * 16, first=2, min_mb_s=MB_S, rank=0, world=2)
    remotes.synced, remotes.staged = {2: "load-a", 3: "load-b"}, {2: 7, 3: 7}
    me = SimpleNamespace(tp=_Ranks(other=[3]), remotes=remotes, mirrors=SimpleNamespace(dirs=["replica-1"]))
    assert Worker.agreed_lost(me, [1]) == [1, 3]  # 1: a local replica left out of the pause on every rank
    assert remotes.synced == {2: "load-a"} and remotes.staged == {2: 7}
    assert Worker.agreed_lost(SimpleNamespace(tp=None, remotes=remotes, mirrors=me.mirrors), [2]) == [2]
