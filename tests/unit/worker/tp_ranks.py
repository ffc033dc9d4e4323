"""The per-rank side of tests/unit/worker/test_tp.py, importable by the spawned rank processes.

Each rank builds the tiny Llama from the same seed, keeps its slices of the split weights (vLLM's tensor-parallel
split: q/k/v/gate/up by output rows, o/down by input columns, the embedding and an untied head by vocabulary rows,
the vocabulary unevenly in one place), puts them in through `parallelize` the way loop/worker/views.py does, and
runs `scenario`: a DPO-like loss, the optimizers' staged updates, the update check and an applied step. The test
runs the same `scenario` on the unsplit model in its own process (`group=None`) and compares; results travel as
torch.save files, so every assertion is made in the test process.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from loop.layout import Placement
from loop.worker.apollo import make_optimizer, trainable_parameters
from loop.worker.tp import TP, exchange_ranges, init_group, parallelize
from loop.worker.update import apply_updates_, check_updates

WORLD = 2
VOCAB = 100
# vocabulary rows per rank: 52/48 where vLLM's padding would split unevenly, 50/50 elsewhere
VOCAB_SPLITS = {(True, "model.embed_tokens.weight"): (52, 48),  # tied: the head is these rows too
                (False, "model.embed_tokens.weight"): (50, 50),
                (False, "lm_head.weight"): (52, 48)}
# run -> (optimizer, its settings, fixed gradients). "dpo" trains on backprop's gradients end to end; the others on
# fixed gradients every rank slices from the same whole tensors, so the optimizer's tensor-parallel path meets the
# very numbers the single device does: AdamW's g / (|g| + eps) would turn the ranks' rounding of a near-zero
# gradient element (another order of partial sums) into a difference of the update's whole size.
RUNS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "dpo": ("apollo-mini", {"lr": 1e-2}, False),
    "apollo-mini": ("apollo-mini", {"lr": 1e-2}, True),
    "adamw-wd": ("adamw", {"lr": 1e-2, "weight_decay": 0.1}, True),
    "apollo-wd": ("apollo", {"lr": 1e-2, "rank": 4, "weight_decay": 0.1}, True),  # channel-wise, projected
}
CAP = 10.0  # update ratio cap that passes every update here
DEADLINE_S = 120  # the ranks take a few seconds; longer means a collective is stuck


def join_ranks(ctx: Any) -> None:
    """Wait for the spawned ranks (torch.multiprocessing's context); past DEADLINE_S kill them and fail."""
    import time

    import pytest

    started = time.monotonic()
    while not ctx.join(timeout=1):  # a rank that raised re-raises here, with its traceback
        if time.monotonic() - started > DEADLINE_S:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the ranks did not finish in {DEADLINE_S} s (a collective waits for a rank that is not there)")


def config(tied: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       initializer_range=0.1,  # logits far from uniform, so a misplaced slice shows
                       tie_word_embeddings=tied, architectures=["LlamaForCausalLM"])


def full_model(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(config(tied)).float().eval()


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


def dpo_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(beta (log p(chosen) - log p(rejected))), sequence 0 chosen, 1 rejected (no reference model)."""
    picks = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)
    return -F.logsigmoid(0.5 * (picks[0] - picks[1]))


def split(name: str, shape: tuple[int, ...], rank: int, tied: bool) -> tuple[int, int, int] | None:
    """(dim, start, length) of this rank's slice of HF tensor `name`, or None for a replicated one."""
    leaf = name.rsplit(".", 2)[-2] if "." in name else name
    if (tied, name) in VOCAB_SPLITS:
        sizes = VOCAB_SPLITS[(tied, name)]
        return 0, sum(sizes[:rank]), sizes[rank]
    if leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        dim = 0
    elif leaf in ("o_proj", "down_proj"):
        dim = 1
    else:
        return None
    n = shape[dim] // WORLD
    return dim, rank * n, n


def rank_model(tied: bool, group: TP) -> tuple[LlamaForCausalLM, TP]:
    """This rank's model: its slices through `parallelize`, the replicated weights loaded as views.py loads them.
    Each model gets its own TP over the group: the slices are known by id(parameter), which a freed model's
    parameters would hand on to the next model's."""
    from accelerate import init_empty_weights

    tp = TP(group.rank, group.world, group.group)

    whole = full_model(tied).state_dict()
    if tied:  # one tensor: the embedding's rows, also the head's
        whole.pop("lm_head.weight")
    sharded: dict[str, torch.Tensor] = {}
    placed: dict[str, Placement] = {}
    for name, t in whole.items():
        cut = split(name, tuple(t.shape), tp.rank, tied)
        if cut is None:
            continue
        dim, start, n = cut
        piece = t.narrow(dim, start, n).clone()
        sharded[name] = piece
        placed[name] = Placement("shard", param=name, shape=tuple(piece.shape), stride=piece.stride(), dim=dim,
                                 start=start, full=tuple(t.shape))
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(config(tied)).float()
    parallelize(model, sharded, placed, tp, tied)
    rest = {n: t.clone() for n, t in whole.items() if n not in sharded}
    model.load_state_dict(rest, strict=False, assign=True)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    assert not left, f"parameters never set: {left}"
    return model.eval(), tp


def scenario(tied: bool, group: TP | None) -> dict[str, Any]:
    """Everything the test compares, by HF parameter name: rank `group.rank`'s view, or with `group=None` the
    unsplit model's, from the same code."""
    def make() -> tuple[torch.nn.Module, TP | None]:
        return rank_model(tied, group) if group is not None else (full_model(tied), None)

    model, tp = make()
    out: dict[str, Any] = {"names": [n for n, _ in model.named_parameters()]}
    if tp is not None:
        by_id = {id(p): n for n, p in model.named_parameters()}
        out["shards"] = {by_id[k]: (s.dim, s.ranges[tp.rank][0], s.ranges[tp.rank][1]) for k, s in tp.shards.items()}
        out["full"] = {n: tp.full(p, p.detach()) for n, p in model.named_parameters()}  # the checkpoint's gather
    for key, (opt_name, kw, fixed) in RUNS.items():
        out[key] = train(*make(), opt_name, kw, fixed)
    out["screen"] = screen_pulls(*make(), tied)
    return out


def screen_pulls(model: torch.nn.Module, tp: TP | None, tied: bool) -> dict[int, Any]:
    """The screen's learned direction and per-row pulls after the weights moved from the base by a fixed change,
    for a budget that holds every tensor and one that holds only some (every rank must choose the same ones)."""
    import tempfile

    from loop.worker.screen import BaseWeights, RankBase, directional_derivatives, learned_direction

    from safetensors.torch import save_file

    base = Path(tempfile.mkdtemp())  # save_pretrained writes on rank 0 only once a group exists: the file itself
    save_file({n: p.detach().contiguous() for n, p in full_model(tied).named_parameters()},
              str(base / "model.safetensors"))
    params = trainable_parameters(model)
    with torch.no_grad():
        for name, p in params:
            p.add_(fixed_grad(name, p, 7, tp))
    rows = [(tuple(r), 3) for r in batch().tolist()]
    out = {}
    for budget in (1 << 30, 24_000):
        weights = BaseWeights(base)
        direction = learned_direction(RankBase(weights, tp, dict(params)) if tp is not None else weights, params,
                                      budget, tp)
        out[budget] = (sorted(direction.names), direction.probed_fraction,
                       directional_derivatives(model, rows, direction, tp))
    return out


def fixed_grad(name: str, p: torch.Tensor, step: int, tp: TP | None) -> torch.Tensor:
    """This rank's slice of a gradient drawn for the whole tensor from (name, step)."""
    shape = tp.shards[id(p)].full if tp is not None and tp.sharded(p) else p.shape
    whole = torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()) + step)) * 0.01
    return tp.local(p, whole) if tp is not None else whole


def train(model: torch.nn.Module, tp: TP | None, opt_name: str, kw: dict[str, Any], fixed: bool) -> dict[str, Any]:
    """Two steps of `opt_name` (the first checked and applied): logits, grads, deltas, the checks' verdicts."""
    ids = batch()
    params = trainable_parameters(model, train_embeddings=True)
    names = {p: n for n, p in params}
    opt = make_optimizer(opt_name, [p for _, p in params], **kw)
    opt.tp = tp
    res: dict[str, Any] = {"order": [n for n, _ in params], "logits": [], "grads": [], "deltas": []}
    for step in range(2):
        model.zero_grad(set_to_none=True)
        logits = model(ids).logits
        res["logits"].append(logits.detach().clone())
        dpo_loss(logits, ids).backward()
        if fixed:
            for n, p in params:
                p.grad = fixed_grad(n, p, step, tp)
        res["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        deltas = opt.compute_updates()
        res["deltas"].append({names[p]: d.clone() for p, d in deltas.items()})
        if step:
            break
        c = check_updates(deltas, CAP, names=names, tp=tp)
        res["check"] = (c.ok, c.reason, c.global_ratio, c.max_tensor_ratio, c.worst_tensor)
        # a cap below the largest ratio: the first tensor over it is refused, the same one on every rank
        c = check_updates(deltas, c.max_tensor_ratio * 0.5, names=names, tp=tp)
        res["capped"] = (c.ok, c.reason, c.worst_tensor)
        if tp is not None:
            res["nan"] = {}
            for where in ("model.norm.weight", "model.layers.1.self_attn.o_proj.weight"):  # replicated, sharded
                broken = {p: d.clone() for p, d in deltas.items()}
                if tp.rank == 1:
                    next(d for p, d in broken.items() if names[p] == where).view(-1)[0] = float("nan")
                c = check_updates(broken, CAP, names=names, tp=tp)
                res["nan"][where] = (c.ok, c.reason)
        apply_updates_(deltas)
        opt.commit()
    return res


def main(rank: int, world: int, folder: str) -> None:
    """One rank (torch.multiprocessing.start_processes): both head layouts, then the group checks; results to a file."""
    torch.set_num_threads(1)
    tp = init_group(rank, world, Path(folder) / "rdv", "cpu")
    results: dict[str, Any] = {}
    for tied in (True, False):
        results["tied" if tied else "untied"] = scenario(tied, tp)
    results["refused"] = refusals(tp)
    results["sent"] = [tp.send(b"\x00loop\xff" if rank == 0 else None), tp.send(None)]
    # long after the join, torch still needs the rendezvous store: a new communicator (NCCL's first collective on
    # a group, or a new group as here) meets through it
    late = torch.distributed.new_group(backend="gloo")
    total = torch.tensor([rank + 1.0])
    torch.distributed.all_reduce(total, group=late)
    results["late group"] = float(total)
    torch.save(results, Path(folder) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def refusals(tp: TP) -> dict[str, str]:
    """exchange_ranges on layouts it must refuse: the message each raised ("" if none)."""
    k = "model.layers.0.self_attn.k_proj.weight"
    cases = {
        # one kv head's rows on both ranks (vLLM replicates kv heads when there are fewer than ranks)
        "same half": {k: Placement("shard", param=k, shape=(8, 32), stride=(32, 1), dim=0, start=0, full=(16, 32))},
        "whole on each": {k: Placement("shard", param=k, shape=(16, 32), stride=(32, 1), dim=0, start=0,
                                       full=(16, 32))},
        # the ranks split different weights
        "different names": {k: Placement("shard", param=k, shape=(8, 32), stride=(32, 1), dim=0, start=8 * tp.rank,
                                         full=(16, 32))} if tp.rank == 0 else {},
    }
    out = {}
    for case, placed in cases.items():
        try:
            exchange_ranges(tp, placed)
            out[case] = ""
        except ValueError as e:
            out[case] = str(e) or "ValueError"
    return out
