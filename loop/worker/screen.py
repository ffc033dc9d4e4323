"""The pre-write screen: does each item of a batch push the model further along what it has learned, or pull it back?

What: the kept runs taught the model `v = w_live - w_base` (the base model folder's safetensors, read tensor by
tensor, against the live weights). For every item of a batch the screen measures its pull along v,
`s_i = <grad_w m_i, v>`, with m_i the quantity training raises: for a DPO pair log pi(chosen) - log pi(rejected),
for a KTO example +log pi(completion) when the thumb is up and -log pi(completion) when it is down (sequence
log-probs exactly as loop/worker/objectives.py computes them, ids by loop/worker/tokens.py). At a run's first
step DPO's gradient is -beta/2 * grad m_i and KTO's is a negative multiple of grad m_i too, so m_i itself is the
right quantity and the reference log-probs are not needed. s_i > 0: the item teaches more of what was learned;
s_i < 0: it pulls the model back. Swapping a pair's answers (or flipping a thumb) negates s_i exactly, which is
what makes `loop.stats.label_test_p` over the s_i (a pair's sign a coin, thumbs exchangeable over their answers)
an exact test of "these labels are independent of the learned trait" (its docstring says why): a batch of
flipped labels has mostly negative s_i and a small p.

Anchors: v is young after a few small runs (mostly their noise), and zero before the first. Given `anchors`,
trusted pairs (the scheduler sends the guard's eval set: held-out feedback older than the batch, and pairs kept
runs learned from), the screen also measures every item along g = sum_j grad m_j over them, the direction in which
those preferences grow at the live weights: `anchored`, with ||v|| and ||g|| so the caller can combine the two
(loop/scheduler/screening.py). g depends on the anchors' labels, never on the batch's, so a flipped item still
gives exactly -s_i and the test stays exact. g is held in fp32 on the probed weights (v's choice; before anything
was learned, the trained weights in the model's order that fit the budget), and the budget is split between v and
g by their bytes per element. Only the anchors' sum matters, so their rows share forward and backward passes,
`ANCHOR_BATCH` rows at a time (right-padded), where each item needs its own.

How:
- v is never a second copy of the model: `learned_direction` keeps at most `budget_bytes` of it on the weights'
  device, in the weights' own dtype. When the trained tensors do not all fit it keeps the ones whose change is
  largest per element (root mean square of v; ties by name), a choice that depends on the past only, so the test
  stays exact for that subset; only its power changes. `probed_fraction` is the share of ||v||^2 they carry.
  One pass over the base reads it in row chunks (the extra memory is one chunk in fp32) and keeps v while the
  budget holds; a second pass reads only the chosen tensors it had to let go.
- One forward + backward per distinct sequence (a micro-batch of one row: a pair is two sequences, so its s_i is
  the difference of two exact per-sequence figures and a flipped pair gives exactly -s_i). A
  post-accumulate-grad hook on each probed weight dots its gradient with its v (fp32, in chunks) and drops the
  gradient at once, as loop/worker/lowmem.py drops them; the trained weights that are not probed stop requiring a
  gradient for the duration, so their weight gradients are never computed. Nothing is written to the weights,
  .grad is None afterwards (gradients found before are put back), and the optimizer is not touched: a staged
  update, or a later Train of the same run, is exactly what it would have been without the screen.
- Nothing learned yet (v == 0), no base given, or a base that cannot be read: nothing is measured along v, and
  `note` says why; without anchors the caller then has nothing to judge. One backward per row serves both
  directions (the hook dots each gradient with v and with g).

Run the tests: .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/worker/test_screen.py
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loop.worker import tokens
from loop.worker.objectives import disable_dropout, sequence_logps
from loop.worker.protocol import Example, Pair

log = logging.getLogger("loop.worker")

CHUNK = 1 << 24  # elements of one tensor handled at a time (64 MiB in fp32)
ANCHOR_BATCH = 8  # anchor rows sharing one forward and backward (only their sum's gradient is wanted)


class BaseWeights:
    """Tensors of a model folder's safetensors (one file or an index of shards), read in row slices on demand."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / f for name, f in weight_map.items()}
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
                self.files = {name: folder / "model.safetensors" for name in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        else:
            raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
        self._open: dict[Path, Any] = {}

    def shape(self, name: str) -> tuple[int, ...] | None:
        path = self.files.get(name)
        return None if path is None else tuple(self._file(path).get_slice(name).get_shape())

    @property
    def names(self) -> set[str]:
        return set(self.files)

    def tensor(self, name: str) -> torch.Tensor:
        return self._file(self.files[name]).get_tensor(name)

    def slice(self, name: str, start: int, stop: int) -> torch.Tensor | None:
        """Rows [start, stop) of the tensor (its first dimension), or None if absent."""
        path = self.files.get(name)
        return None if path is None else self._file(path).get_slice(name)[start:stop]

    def part(self, name: str, dim: int, start: int, n: int) -> torch.Tensor:
        """Elements [start, start + n) along `dim`, every other dimension whole: only those bytes are read (a rank
        of a tensor-parallel worker reads its slice of a split tensor, never the whole of it)."""
        return self._file(self.files[name]).get_slice(name)[(slice(None),) * dim + (slice(start, start + n),)]

    def _file(self, path: Path) -> Any:
        if path not in self._open:
            from safetensors import safe_open

            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path]

    def close(self) -> None:
        self._open.clear()


class RankBase:
    """The base as one rank of a tensor-parallel worker sees it (loop/worker/tp.py): a weight split over the ranks
    reads as this rank's slice of the base tensor, so v = w_live - w_base is this rank's slice of the whole v."""

    def __init__(self, base: BaseWeights, tp: Any, params: dict[str, torch.Tensor]) -> None:
        self.base, self.tp = base, tp
        self.cut = {n: tp.shards[id(prm)] for n, prm in params.items() if tp.sharded(prm)}

    def shape(self, name: str) -> tuple[int, ...] | None:
        whole = self.base.shape(name)
        cut = self.cut.get(name)
        if cut is None or whole != cut.full:
            return whole
        out = list(whole)
        out[cut.dim] = cut.ranges[self.tp.rank][1]
        return tuple(out)

    def slice(self, name: str, start: int, stop: int) -> torch.Tensor | None:
        cut = self.cut.get(name)
        if cut is None:
            return self.base.slice(name, start, stop)
        first, n = cut.ranges[self.tp.rank]
        if cut.dim == 0:
            return self.base.slice(name, first + start, first + stop)
        rows = self.base.slice(name, start, stop)
        return None if rows is None else rows.narrow(cut.dim, first, n)

    def close(self) -> None:
        self.base.close()


@dataclass
class Direction:
    """The probed part of v = w_live - w_base: weight -> its v (same shape, dtype and device)."""

    v: dict[torch.Tensor, torch.Tensor] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # of the probed weights, in the model's order
    probed_fraction: float = 0.0  # share of ||v||^2 (over the trained tensors the base has) that is probed
    note: str = ""  # why nothing is probed


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _row_chunks(w: torch.Tensor) -> list[tuple[int, int]]:
    rows = w.shape[0] if w.dim() > 0 else 1
    per_row = max(1, w[0].numel()) if w.dim() > 1 else 1
    step = max(1, CHUNK // per_row)
    return [(s, min(rows, s + step)) for s in range(0, rows, step)]


@torch.no_grad()
def _change(base: BaseWeights | RankBase, name: str, w: torch.Tensor, keep: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(||w - base||^2 as a device scalar, w - base in w's dtype if `keep`)."""
    sq = torch.zeros((), dtype=torch.float64, device=w.device)
    out = torch.empty_like(w) if keep else None
    for start, stop in _row_chunks(w):
        b = base.slice(name, start, stop)
        assert b is not None
        d = w[start:stop].float() - b.to(w.device).float().reshape(w[start:stop].shape)
        sq += torch.linalg.vector_norm(d, dtype=torch.float64) ** 2
        if out is not None:
            out[start:stop] = d.to(w.dtype)
    return sq, out


def learned_direction(base: BaseWeights | RankBase, trained: Sequence[tuple[str, torch.Tensor]], budget_bytes: int,
                      tp: Any = None) -> Direction:
    """v for the largest-change trained tensors that fit in `budget_bytes` (module docstring). With `tp` (a rank of
    a tensor-parallel worker, `base` a RankBase) every rank chooses the same tensors, by their whole change."""
    found: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, weight, ||v||^2 on the device)
    held: dict[str, torch.Tensor] = {}
    held_bytes = 0
    for name, w in trained:
        if base.shape(name) != tuple(w.shape):  # absent from the base, or another shape: not comparable
            continue
        size = w.numel() * w.element_size()
        keep = held_bytes + size <= budget_bytes
        sq, v = _change(base, name, w.detach(), keep)
        found.append((name, w, sq))
        if v is not None:
            held[name], held_bytes = v, held_bytes + size
    if not found:
        return Direction(note="the base folder holds none of the trained tensors: nothing to compare with")
    squares_t = torch.stack([sq.cpu() for _, _, sq in found])  # one host sync for all
    numel = [w.numel() for _, w, _ in found]
    if tp is not None:  # a split tensor's change is the sum of its slices' (every rank lists the same tensors)
        split = [i for i, (_, w, _) in enumerate(found) if tp.sharded(w)]
        if split:
            part = squares_t[split].to(found[0][2].device)
            import torch.distributed as dist

            dist.all_reduce(part, group=tp.group)
            squares_t[split] = part.cpu()
            for i in split:
                numel[i] = _numel(tp.shards[id(found[i][1])].full) // tp.world  # the same on every rank
    squares = squares_t.tolist()
    total = sum(squares)
    if total == 0:
        return Direction(note="nothing learned yet: the live weights equal the base")
    order = sorted(range(len(found)), key=lambda i: (-squares[i] / numel[i], found[i][0]))
    chosen, room = set(), budget_bytes
    for i in order:
        name, w, _ = found[i]
        size = numel[i] * w.element_size()
        if squares[i] > 0 and size <= room:
            chosen.add(i)
            room -= size
    if not chosen:
        return Direction(note=f"the screen budget ({budget_bytes} bytes) holds none of the changed tensors")
    keep_names = {found[i][0] for i in chosen}
    for name in [n for n in held if n not in keep_names]:
        del held[name]  # freed before the missing ones are read: never more than the budget at once
    out = Direction(probed_fraction=sum(squares[i] for i in chosen) / total)
    for i in sorted(chosen):
        name, w, _ = found[i]
        out.v[w] = held.pop(name) if name in held else _change(base, name, w.detach(), True)[1]  # type: ignore[assignment]
        out.names.append(name)
    return out


@dataclass
class ScreenResult:
    contributions: list[float]  # s_i along v per pair, then per example, in the order sent ([]: v not measured)
    n_tensors: int
    probed_fraction: float
    ms: float
    note: str = ""  # why v was not measured
    anchored: list[float] = field(default_factory=list)  # the same along the anchors' gradient g ([]: not measured)
    learned_norm: float = 0.0  # ||v|| and ||g|| over the probed weights
    anchor_norm: float = 0.0
    anchor_note: str = ""  # why g was not measured
    n_anchors: int = 0


def _sequences(tokenizer: Any, pairs: Sequence[Pair], examples: Sequence[Example],
               max_len: int) -> tuple[list[tuple[tuple[int, ...], int]], list[list[tuple[int, float]]]]:
    """Distinct (ids, prompt length) rows, and per item the rows it sums with their signs."""
    rows: dict[tuple[tuple[int, ...], int], int] = {}

    def row(ids: list[int], plen: int) -> int:
        return rows.setdefault((tuple(ids), plen), len(rows))

    items: list[list[tuple[int, float]]] = []
    for pair in pairs:
        enc = tokens.encode_pair(tokenizer, pair, max_len)
        items.append([(row(enc.prompt + enc.answers[0], len(enc.prompt)), 1.0),
                      (row(enc.prompt + enc.answers[1], len(enc.prompt)), -1.0)])
    for ex in examples:
        enc = tokens.encode_example(tokenizer, ex, max_len)
        items.append([(row(enc.prompt + enc.answers[0], len(enc.prompt)), 1.0 if ex.label else -1.0)])
    return list(rows), items


class _RowBackward:
    """One forward + backward per (ids, prompt length) row of log pi(answer | prompt), with `on_grad(weight, grad)`
    called for every probed weight's gradient as it is accumulated (then dropped, as loop/worker/lowmem.py drops
    them). The trained weights that are not probed stop requiring a gradient meanwhile, so their weight gradients
    are never computed; gradients found before are put back afterwards and nothing is written."""

    def __init__(self, model: nn.Module, probed: Collection[torch.Tensor]) -> None:
        self.model, self.probed = model, probed
        self.device = next(model.parameters()).device  # where the worker puts its batches (the weights' device)

    def run(self, rows: Sequence[tuple[Sequence[int], int]], on_grad: Callable[[torch.Tensor, torch.Tensor], None],
            *, before_row: Callable[[int], None] = lambda i: None, scale: Sequence[float] | None = None,
            batch: int = 1) -> None:
        """`before_row(i)` runs before row i's backward; `scale[i]` multiplies row i's log-prob (0: skipped).
        `batch` > 1 (with `scale`): up to that many rows, right-padded, share one forward and backward, so
        `on_grad` sees the gradient of their weighted sum only (no `before_row`)."""
        model = self.model
        trained = [prm for prm in model.parameters() if prm.requires_grad]
        stashed = {prm: prm.grad for prm in model.parameters() if prm.grad is not None}

        def hook(prm: torch.Tensor) -> None:
            on_grad(prm, prm.grad)  # type: ignore[arg-type]
            prm.grad = None

        was_training = model.training
        handles = []
        try:
            for prm in model.parameters():
                prm.grad = None
            for prm in trained:
                if prm in self.probed:
                    handles.append(prm.register_post_accumulate_grad_hook(hook))
                else:
                    prm.requires_grad_(False)
            disable_dropout(model)
            model.train()
            with torch.enable_grad():
                if batch > 1:  # only the weighted sum's gradient is wanted: rows share a backward
                    for start in range(0, len(rows), batch):
                        part = [(r, f) for r, f in zip(rows[start:start + batch], scale[start:start + batch])  # type: ignore[index]
                                if f != 0]
                        if part:
                            self._backward([r for r, _ in part], [f for _, f in part])
                    return
                for i, (ids, plen) in enumerate(rows):
                    before_row(i)
                    factor = 1.0 if scale is None else scale[i]
                    if factor != 0:
                        self._backward([(ids, plen)], [factor])
        finally:
            for h in handles:
                h.remove()
            for prm in trained:
                prm.requires_grad_(True)
                prm.grad = None
            for prm, g in stashed.items():
                prm.grad = g
            model.train(was_training)


    def _backward(self, rows: Sequence[tuple[Sequence[int], int]], factors: Sequence[float]) -> None:
        """Backward of sum_r factors[r] * log pi(row r), the rows right-padded into one batch."""
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
        attention = torch.zeros_like(input_ids)
        loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for r, (ids, plen) in enumerate(rows):
            input_ids[r, :len(ids)] = torch.tensor(list(ids), dtype=torch.long)
            attention[r, :len(ids)] = 1
            loss_mask[r, plen:len(ids)] = True
        logp = sequence_logps(self.model, input_ids, attention, loss_mask)
        if logp.requires_grad:  # answers of no tokens have no log-prob to move
            (logp * torch.tensor(list(factors), dtype=logp.dtype, device=logp.device)).sum().backward()


def _counted_once(probed: Collection[torch.Tensor], tp: Any) -> set[torch.Tensor]:
    """The probed weights this rank leaves out of a sum over the whole model: a weight every rank holds whole is
    counted by rank 0 only."""
    return {prm for prm in probed if tp is not None and tp.rank != 0 and not tp.sharded(prm)}


def _all_ranks(values: torch.Tensor, tp: Any) -> list[float]:
    if tp is not None and values.numel():
        import torch.distributed as dist

        dist.all_reduce(values, group=tp.group)
    return values.cpu().tolist()


def directional_derivatives(model: nn.Module, rows: Sequence[tuple[Sequence[int], int]],
                            direction: Direction | Sequence[dict[torch.Tensor, torch.Tensor]],
                            tp: Any = None) -> list[float] | list[list[float]]:
    """<grad log pi(row), v> for each (ids, prompt length) row: one forward + backward per row. Given several
    directions (weight -> its direction, on the same weights), each row's figure along each, in one backward
    (a list per row). With `tp` every rank runs the same rows; each adds its slices' dot products (a weight every
    rank holds: rank 0 only) and the sums are added over ranks."""
    single = isinstance(direction, Direction)
    dirs = [direction.v] if isinstance(direction, Direction) else list(direction)
    probed = dirs[0]  # the same weights on every rank: the ranks' backward passes stay alike
    skip = _counted_once(probed, tp)
    device = next(model.parameters()).device
    acc: list[torch.Tensor] = []

    def on_grad(prm: torch.Tensor, grad: torch.Tensor) -> None:
        if prm in skip:
            return
        g = grad.reshape(-1)
        for k, d in enumerate(dirs):
            v = d[prm].reshape(-1)
            for s in range(0, g.numel(), CHUNK):
                acc[-1][k] += torch.dot(g[s:s + CHUNK].float(), v[s:s + CHUNK].float()).double()

    def before_row(i: int) -> None:
        acc.append(torch.zeros(len(dirs), dtype=torch.float64, device=device))

    _RowBackward(model, probed).run(rows, on_grad, before_row=before_row)
    if not acc:
        return []
    per_row = _all_ranks(torch.stack(acc), tp)
    return [r[0] for r in per_row] if single else per_row


def anchor_gradient(model: nn.Module, rows: Sequence[tuple[Sequence[int], int]], coefficients: Sequence[float],
                    weights: Sequence[torch.Tensor], tp: Any = None) -> tuple[dict[torch.Tensor, torch.Tensor], float]:
    """g = sum_r coefficients[r] * grad log pi(row r) on `weights` (fp32, same shapes), and ||g|| over the whole
    model (every rank's slices; a weight every rank holds counted once)."""
    g = {prm: torch.zeros(prm.shape, dtype=torch.float32, device=prm.device) for prm in weights}

    def on_grad(prm: torch.Tensor, grad: torch.Tensor) -> None:
        g[prm] += grad.float()

    _RowBackward(model, g).run(rows, on_grad, scale=coefficients, batch=ANCHOR_BATCH)
    return g, _norm(g, tp)


def _norm(d: dict[torch.Tensor, torch.Tensor], tp: Any) -> float:
    """||d|| over the whole model, d being this rank's part of a direction."""
    skip = _counted_once(d, tp)
    device = next(iter(d)).device if d else torch.device("cpu")
    sq = torch.zeros(1, dtype=torch.float64, device=device)
    for prm, x in d.items():
        if prm not in skip:
            sq += torch.linalg.vector_norm(x.float(), dtype=torch.float64) ** 2
    return float(_all_ranks(sq, tp)[0]) ** 0.5


def _by_model_order(trained: Sequence[tuple[str, torch.Tensor]], budget_bytes: int,
                    per_element: int) -> tuple[list[str], list[torch.Tensor]]:
    """The trained weights, in the model's order, while `per_element` bytes each of theirs fit the budget (every
    rank of a tensor-parallel worker lists the same weights, so their choice is alike)."""
    names, weights, room = [], [], budget_bytes
    for name, w in trained:
        if w.numel() * per_element <= room:
            names.append(name)
            weights.append(w)
            room -= w.numel() * per_element
    return names, weights


def screen(model: nn.Module, tokenizer: Any, trained: Sequence[tuple[str, torch.Tensor]], *, base_weights: str,
           pairs: Sequence[Pair] = (), examples: Sequence[Example] = (), max_len: int = tokens.DEFAULT_MAX_LEN,
           budget_bytes: int, tp: Any = None, anchors: Sequence[Pair] = ()) -> ScreenResult:
    """s_i for every pair, then every example (module docstring), along v = w_live - w_base and, given `anchors`
    (trusted pairs), along their gradient g too; empty with a note when neither could be measured.
    `tp`: this rank of a tensor-parallel worker (every rank calls it alike; the figures are the whole model's)."""
    t0 = time.perf_counter()

    def ms() -> float:
        return (time.perf_counter() - t0) * 1000

    direction = Direction(note="no base weights given: nothing to compare with")
    # The anchors' gradient is held in fp32 beside v (in the weights' dtype): the budget is split by those bytes.
    v_budget = budget_bytes
    if anchors:
        size = trained[0][1].element_size() if trained else 2
        v_budget = budget_bytes * size // (size + 4)
    if base_weights:
        try:
            base: BaseWeights | RankBase = BaseWeights(base_weights)
        except (OSError, ValueError, KeyError) as e:
            direction = Direction(note=f"cannot read the base weights {base_weights}: {e}")
        else:
            if tp is not None:
                base = RankBase(base, tp, dict(trained))
            try:
                direction = learned_direction(base, trained, v_budget, tp)
            except (OSError, ValueError) as e:
                direction = Direction(note=f"cannot read the base weights {base_weights}: {e}")
            finally:
                base.close()
    anchor_note = "" if anchors else "no anchor pairs given"
    if direction.note and not anchors:
        return ScreenResult([], 0, 0.0, ms(), direction.note, anchor_note=anchor_note)
    if direction.v:
        weights, names = list(direction.v), direction.names
    else:  # nothing learned (or no base): the anchors alone, on the weights that fit the budget
        names, weights = _by_model_order(trained, budget_bytes, 4)
        if not weights:
            return ScreenResult([], 0, 0.0, ms(), direction.note,
                                anchor_note=f"the screen budget ({budget_bytes} bytes) holds none of the weights")
    dirs: list[dict[torch.Tensor, torch.Tensor]] = []
    learned_norm = anchor_norm = 0.0
    if direction.v:
        dirs.append(direction.v)
        learned_norm = _norm(direction.v, tp)
    g: dict[torch.Tensor, torch.Tensor] = {}
    if anchors:
        arows, aitems = _sequences(tokenizer, anchors, (), max_len)
        coef = [0.0] * len(arows)
        for item in aitems:
            for r, sign in item:
                coef[r] += sign
        g, anchor_norm = anchor_gradient(model, arows, coef, weights, tp)
        if anchor_norm > 0:
            dirs.append(g)
        else:
            anchor_note = "the anchor pairs' gradient is zero"
    if not dirs:
        return ScreenResult([], 0, 0.0, ms(), direction.note, anchor_note=anchor_note)
    rows, items = _sequences(tokenizer, pairs, examples, max_len)
    per_row = directional_derivatives(model, rows, dirs, tp)
    along = [[sum(sign * per_row[r][k] for r, sign in item) for item in items] for k in range(len(dirs))]  # type: ignore[index]
    learned = along.pop(0) if direction.v else []
    anchored = along.pop(0) if anchor_norm > 0 else []
    direction.v.clear()
    g.clear()
    return ScreenResult(learned, len(names), direction.probed_fraction, ms(), direction.note,
                        anchored=anchored, learned_norm=learned_norm, anchor_norm=anchor_norm,
                        anchor_note=anchor_note, n_anchors=len(anchors))
