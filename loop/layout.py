"""Where every Hugging Face parameter lives inside vLLM's parameters, learned by running vLLM's own loader on probes.

What: `derive(model, hf_shapes, to_checkpoint)` gives every parameter of the Hugging Face model class (the one the
worker builds) a probe tensor whose every element is a distinct code, turns that state dict into checkpoint tensors
with transformers' own conversion (`hf_probe_inputs`: what `save_pretrained` writes, e.g. a MoE layer's fused
experts back to one tensor per expert), feeds them to vLLM's `model.load_weights` (the model's real loading code,
with its stacking, splitting, padding, transposing and sharding) and reads where each code landed. Each HF parameter
then gets one treatment (`Placement.kind`):
- "view": it lands whole, once, as a strided box of one vLLM parameter; the placement is that box (parameter
  name, element offset from the parameter's first element, shape, strides), which the worker turns into a view
  with `torch.as_strided` (loop/worker/views.py);
- "rows": every element lands once, each row of it whole and in order, but the rows in another order (Llama 4's q/k
  rows, which vLLM regroups for its rotary layout): `rows` names, per HF row, the row of the vLLM parameter's
  region (from `offset`, rows as long as the HF row) that holds it. No view expresses it; the worker trains a copy
  and writes its rows back into vLLM's memory inside every pause (loop/worker/views.py `write_back`);
- "scattered": every element lands once, but no strided box or row order holds them;
- "shard": a tensor-parallel rank's slice: the elements that land on this rank are one contiguous range along one
  dimension (`dim`, from `start`, of the HF tensor's full shape `full`), and they land as a strided box of one vLLM
  parameter; the placement's shape is the slice's. The worker of that rank trains it in place as a view, its
  tensor-parallel modules doing what the other ranks' slices need (loop/worker/tp.py);
- "partial": only some of its elements land, in no shape a "shard" describes (parts vLLM drops);
- "replicated": some element lands more than once (a copy kept in two places must be written in both);
- "transformed": its codes do not come out whole (vLLM scales, casts or combines the values while loading);
- "absent": nothing of it lands (vLLM's loader skips the name).
"view" is trained in place, "rows" through a copy written back; every other kind is reported with its reason, and
the worker refuses the model, naming each.

How: codes are 1 + the tensor's base + the element's flat index, in float64 (exact up to 2**53, far above any
model's element count); an element left at 0 received nothing. Probing swaps each vLLM parameter's `.data` for a
float64 scratch of its shape, a group at a time (the parameters of one decoder layer, then those of no layer), and
every parameter outside the group for one element seen under every index, so at most one layer's scratch exists at
once and a write that lands outside the group fails (a ValueError naming the group) instead of reaching a live weight. The original `.data` of every parameter is put back
afterwards, exception or not: vLLM's live weights are the same tensors before and after, values untouched.
What `load_weights` does later in `process_weights_after_loading` (quantisation, CPU prepacking) is not seen here;
the worker's parity checks against vLLM's own log-probs are what prove the views on the live model.

Run the tests: .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/vllm/test_layout.py
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

FORMAT_VERSION = 1
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_CHUNK = 1 << 26  # elements per slice when decoding: bounds the temporaries on a large embedding


@dataclass
class Placement:
    kind: str  # view | rows | scattered | partial | replicated | transformed | absent
    param: str = ""  # the vLLM parameter (view/rows: the one holding it; others: where most of it landed, if anywhere)
    offset: int = 0  # elements from the parameter's first element (view, rows)
    shape: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    reason: str = ""
    rows: tuple[int, ...] = ()  # rows: per HF row, the row of the region from `offset` that holds it
    dim: int = 0  # shard: the dimension of the HF tensor that is split across ranks
    start: int = 0  # shard: where this rank's slice starts along `dim`
    full: tuple[int, ...] = ()  # shard: the HF tensor's whole shape

    def to_json(self) -> dict[str, Any]:
        if self.kind == "view":
            return {"kind": "view", "param": self.param, "offset": self.offset, "shape": list(self.shape),
                    "stride": list(self.stride)}
        if self.kind == "shard":
            return {"kind": "shard", "param": self.param, "offset": self.offset, "shape": list(self.shape),
                    "stride": list(self.stride), "dim": self.dim, "start": self.start, "full": list(self.full),
                    "reason": self.reason}
        if self.kind == "rows":
            return {"kind": "rows", "param": self.param, "offset": self.offset, "shape": list(self.shape),
                    "rows": list(self.rows), "reason": self.reason}
        return {"kind": self.kind, "param": self.param, "shape": list(self.shape), "reason": self.reason}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Placement:
        return cls(kind=str(d["kind"]), param=str(d.get("param", "")), offset=int(d.get("offset", 0)),
                   shape=tuple(int(x) for x in d.get("shape", ())), stride=tuple(int(x) for x in d.get("stride", ())),
                   reason=str(d.get("reason", "")), rows=tuple(int(x) for x in d.get("rows", ())),
                   dim=int(d.get("dim", 0)), start=int(d.get("start", 0)),
                   full=tuple(int(x) for x in d.get("full", ())))


@dataclass
class Layout:
    tensors: dict[str, Placement] = field(default_factory=dict)  # HF checkpoint name -> placement
    ms: float = 0.0

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for p in self.tensors.values():
            out[p.kind] += 1
        return dict(out)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "ms": round(self.ms, 1),
                "tensors": {name: p.to_json() for name, p in self.tensors.items()}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Layout:
        if d.get("format") != FORMAT_VERSION:
            raise ValueError(f"layout format {d.get('format')!r}; this loop reads format {FORMAT_VERSION}")
        return cls({name: Placement.from_json(p) for name, p in d["tensors"].items()}, float(d.get("ms", 0.0)))


ToCheckpoint = Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]]


def hf_from_config(config: Any, **kwargs: Any) -> torch.nn.Module:
    """The Hugging Face model of the class the checkpoint names (`architectures`), so that its parameter names and
    weight conversions are the checkpoint's own: a released multimodal checkpoint (Qwen3.5's
    `...ForConditionalGeneration`) keeps its language model under `model.language_model` beside the image encoder,
    where the text-only class would name another layout. A class transformers does not have: its causal LM."""
    import transformers

    arch = (getattr(config, "architectures", None) or [""])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls._from_config(config, **kwargs)
    return transformers.AutoModelForCausalLM.from_config(config, **kwargs)


def hf_config(model_path: str) -> Any:
    """The config of `model_path` as transformers' own class for its architecture reads it. Not AutoConfig's: inside
    vLLM's process AutoConfig maps some model types to vLLM's own config classes (vLLM 0.26 registers its
    `Qwen3_5Config`, whose vision config lacks transformers' `num_attention_heads` alias), which transformers'
    modelling code cannot build from."""
    import transformers
    from transformers import AutoConfig, PretrainedConfig

    config = AutoConfig.from_pretrained(model_path)
    arch = (getattr(config, "architectures", None) or [""])[0]
    cls = getattr(getattr(transformers, arch, None), "config_class", None) if arch else None
    if isinstance(cls, type) and issubclass(cls, PretrainedConfig) and not isinstance(config, cls):
        return cls.from_pretrained(model_path)
    return config


def hf_meta_model(model_path: str) -> torch.nn.Module:
    """The Hugging Face model class of `model_path`, built on the meta device from its config (nothing read or
    allocated): its parameters are what the worker gives views to."""
    config = hf_config(model_path)
    with torch.device("meta"):
        return hf_from_config(config)


def hf_probe_inputs(model_path: str) -> tuple[dict[str, tuple[int, ...]], ToCheckpoint]:
    """Every parameter of the HF model class (name -> shape; a tied output head is the embedding and is not listed),
    and transformers' own conversion of a state dict of them into checkpoint tensors, the names and layout vLLM's
    loader reads (transformers 5 keeps, e.g., a MoE layer's experts fused in one tensor that checkpoints store one
    per expert; `save_pretrained` writes them back the same way)."""
    from transformers.core_model_loading import revert_weight_conversion

    model = hf_meta_model(model_path)
    return ({n: tuple(p.shape) for n, p in model.named_parameters()},
            lambda state: revert_weight_conversion(model, state))


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def derive(model: torch.nn.Module, hf_shapes: Mapping[str, tuple[int, ...]],
           to_checkpoint: ToCheckpoint | None = None) -> Layout:
    """The placement of every HF parameter `hf_shapes` names, through `model.load_weights`; `to_checkpoint` turns a
    state dict of them into the checkpoint tensors the loader reads (default: they are the same)."""
    t0 = time.perf_counter()
    params = dict(model.named_parameters(remove_duplicate=False))
    by_group: dict[int | None, list[str]] = defaultdict(list)
    for name in hf_shapes:
        by_group[layer_of(name)].append(name)
    original = {id(p): (p, p.data) for p in params.values()}  # tied parameters appear once
    device = next(iter(params.values())).device if params else torch.device("cpu")
    if device.type == "meta":  # a meta parameter cannot take a real scratch as its .data
        raise ValueError("the model's parameters are on the meta device; build it on the CPU (torch.empty: its "
                         "pages are never touched, the probe writes only into scratch tensors of its own)")
    out = Layout()
    try:
        for group, names in sorted(by_group.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            members = {n for n in params if layer_of(n) == group}
            group_shapes = {n: tuple(hf_shapes[n]) for n in names}
            try:
                out.tensors.update(_probe_group(model, params, members, group_shapes, device, to_checkpoint))
            except torch.OutOfMemoryError:  # the device is full: the same probe in host memory, slower
                device = torch.device("cpu")
                out.tensors.update(_probe_group(model, params, members, group_shapes, device, to_checkpoint))
    finally:
        for p, data in original.values():
            p.data = data
        if device.type == "cuda":
            torch.cuda.empty_cache()  # hand the scratch back before vLLM measures what its weights use
    out.ms = (time.perf_counter() - t0) * 1000
    return out


def _probe_group(model: torch.nn.Module, params: dict[str, torch.Tensor], members: set[str],
                 shapes: dict[str, tuple[int, ...]], device: torch.device,
                 to_checkpoint: ToCheckpoint | None = None) -> dict[str, Placement]:
    scratch: dict[str, torch.Tensor] = {}
    seen: dict[int, torch.Tensor] = {}
    zero: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
    for name, p in params.items():
        if id(p) in seen:  # a tied parameter: the same scratch under both names
            if name in members:
                scratch[name] = seen[id(p)]
            continue
        if name in members:
            seen[id(p)] = scratch[name] = p.data = torch.zeros(p.shape, dtype=torch.float64, device=device)
        else:  # one element seen under every index: a write into it fails instead of reaching the live weights
            key = (p.dtype, p.device)
            if key not in zero:
                zero[key] = torch.zeros((), dtype=p.dtype, device=p.device)
            seen[id(p)] = p.data = zero[key].expand(p.shape)
    bases: dict[str, int] = {}
    total = 0
    for name, shape in shapes.items():
        bases[name] = total
        total += _numel(shape)
    if total >= 2**53:
        raise ValueError(f"{total} elements in one probe group: float64 codes cannot tell them apart")

    coded = {name: (torch.arange(_numel(shape), dtype=torch.float64, device=device) + (bases[name] + 1)).reshape(shape)
             for name, shape in shapes.items()}
    probes = to_checkpoint(coded) if to_checkpoint is not None else coded
    try:
        model.load_weights(iter(probes.items()))
    except RuntimeError as e:
        if "single memory location" not in str(e):
            raise
        raise ValueError(f"vLLM's load_weights wrote a tensor of {sorted(shapes)[:3]}... outside the parameters "
                         f"of its own layer; the probe cannot place it: {e}") from e
    del coded, probes  # the codes are in the scratch now: free them before decoding (an embedding is GBs in fp64)
    fast = _decode_views(scratch, shapes, bases)
    rest = {n: shp for n, shp in shapes.items() if n not in fast}
    slow = _decode(scratch, shapes, bases, total) if rest else {}  # every code decoded; only the rest's kept
    return {**fast, **{n: slow[n] for n in rest}}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _decode_views(scratch: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                  bases: dict[str, int]) -> dict[str, Placement]:
    """The tensors that landed as views, found cheaply: where each tensor's first element and its one-step
    neighbours along every dimension landed (one search of each parameter for those few codes) gives the only view
    it can be; the view is then checked element for element, and each parameter must hold nothing beyond the views
    found in it (else an element landed twice, or a value changed). What fails any check is left to `_decode`."""
    anchors: dict[int, tuple[str, int]] = {}  # code -> (tensor, -1 for its first element or the dimension stepped)
    for name, shape in shapes.items():
        if _numel(shape) == 0:
            continue
        anchors[bases[name] + 1] = (name, -1)
        for j, d in enumerate(shape):
            if d > 1:
                anchors[bases[name] + 1 + _numel(shape[j + 1:])] = (name, j)
    if not anchors or not scratch:
        return {}
    keys = torch.tensor(sorted(anchors), dtype=torch.float64, device=next(iter(scratch.values())).device)
    found: dict[tuple[str, int], list[tuple[str, int]]] = defaultdict(list)
    held: dict[str, int] = {}  # param -> elements that received anything
    by_ptr: dict[int, str] = {}
    for pname, s in scratch.items():
        if s.data_ptr() in by_ptr:
            continue
        by_ptr[s.data_ptr()] = pname
        flat = s.reshape(-1)
        held[pname] = int(torch.count_nonzero(flat))
        for start in range(0, flat.numel(), _CHUNK):  # in slices: the temporaries of a whole embedding are GBs
            part = flat[start:start + _CHUNK]
            at = torch.searchsorted(keys, part).clamp_(max=len(keys) - 1)
            hit = torch.nonzero(keys[at] == part).reshape(-1)
            for pos, val in zip(hit.tolist(), part[hit].tolist()):
                found[anchors[int(val)]].append((pname, start + pos))
    out: dict[str, Placement] = {}
    used: dict[str, int] = defaultdict(int)
    for name, shape in shapes.items():
        spots = [found.get((name, j), []) for j in [-1, *range(len(shape))] if j < 0 or shape[j] > 1]
        if not spots or any(len(x) != 1 for x in spots) or len({x[0][0] for x in spots}) != 1:
            continue
        pname, origin = spots[0][0]
        steps = iter(x[0][1] - origin for x in spots[1:])
        stride = tuple(0 if d == 1 else next(steps) for d in shape)
        s = scratch[pname]
        if any(x < 0 for x in stride) or origin + sum((d - 1) * x for d, x in zip(shape, stride)) >= s.numel():
            continue
        view = torch.as_strided(s, shape, stride, s.storage_offset() + origin)
        if _holds_codes(view, bases[name] + 1):
            out[name] = Placement("view", param=pname, offset=origin, shape=shape, stride=stride)
            used[pname] += _numel(shape)
    crowded = {p for p, n in used.items() if n != held[p]}  # something beyond the views: let `_decode` say what
    return {n: p for n, p in out.items() if p.param not in crowded}


def _holds_codes(view: torch.Tensor, first: int) -> bool:
    """`view` holds first, first + 1, ... in row-major order; checked in slices of whole rows."""
    if view.dim() == 0:
        return bool(view == first)
    per_row = _numel(tuple(view.shape[1:]))
    step = max(1, _CHUNK // max(1, per_row))
    for r0 in range(0, view.shape[0], step):
        part = view[r0:r0 + step]
        expect = torch.arange(part.numel(), dtype=torch.float64, device=view.device).add_(first + r0 * per_row)
        if not torch.equal(part.reshape(-1), expect):
            return False
    return True


def _decode(scratch: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], bases: dict[str, int],
            total: int) -> dict[str, Placement]:
    names = list(shapes)
    starts = torch.tensor([bases[n] for n in names], dtype=torch.int64)
    landed: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = defaultdict(list)  # name -> (param, idx, pos)
    odd: dict[str, int] = {}  # param -> elements holding something that is not a whole code
    unique: dict[int, str] = {}
    for pname, s in scratch.items():
        if s.data_ptr() in unique:  # tied: decode the shared scratch once, under its first name
            continue
        unique[s.data_ptr()] = pname
        flat = s.reshape(-1).cpu()  # the rare path: decoded in host memory whatever the device
        pos = torch.nonzero(flat).reshape(-1)
        if pos.numel() == 0:
            continue
        val = flat[pos]
        whole = (val == torch.round(val)) & (val >= 1) & (val <= total)
        if not bool(whole.all()):
            odd[pname] = int((~whole).sum())
            pos, val = pos[whole], val[whole]
        code = val.to(torch.int64) - 1
        which = torch.searchsorted(starts, code, right=True) - 1
        for i in torch.unique(which).tolist():
            sel = which == i
            landed[names[i]].append((pname, code[sel] - starts[i], pos[sel]))
    return {name: _place(name, shapes[name], landed.get(name, []), odd) for name in names}


def _place(name: str, shape: tuple[int, ...], parts: list[tuple[str, torch.Tensor, torch.Tensor]],
           odd: dict[str, int]) -> Placement:
    numel = _numel(shape)
    if not parts:
        if odd:
            where = ", ".join(f"{p} ({n} elements)" for p, n in sorted(odd.items()))
            return Placement("transformed", shape=shape, reason=f"no element landed as loaded; values changed in {where}")
        return Placement("absent", shape=shape, reason="vLLM's load_weights put none of it in any parameter")
    changed = sorted({p for p, _, _ in parts} & set(odd))
    if changed:
        return Placement("transformed", param=changed[0], shape=shape,
                         reason=f"values come out changed in {changed} (scaled, cast or combined while loading)")
    count = torch.zeros(numel, dtype=torch.int64)
    for _, idx, _ in parts:
        count.index_add_(0, idx, torch.ones_like(idx))
    main = max(parts, key=lambda x: x[1].numel())[0]
    if bool((count > 1).any()):
        where = sorted({p for p, _, _ in parts})
        return Placement("replicated", param=main, shape=shape,
                         reason=f"{int((count > 1).sum())} elements land more than once (in {where})")
    if bool((count == 0).any()):
        if len(parts) == 1 and not odd:
            sharded = _shard(parts[0], shape)
            if sharded is not None:
                return sharded
        why = f"{int((count == 0).sum())} of {numel} elements land nowhere"
        if odd:
            why += f"; values changed in {sorted(odd)}"
        return Placement("partial", param=main, shape=shape, reason=why)
    if len({p for p, _, _ in parts}) > 1:
        return Placement("scattered", param=main, shape=shape,
                         reason=f"split over {sorted({p for p, _, _ in parts})}")
    _, idx, pos = parts[0]
    where = torch.empty(numel, dtype=torch.int64)
    where[idx] = pos
    stride = _strides(where, shape)
    if stride is None:
        rows = _rows(where, shape)
        if rows is not None:
            offset, order = rows
            return Placement("rows", param=main, offset=offset, shape=shape, rows=order,
                             reason="its rows land whole but in another order: trained as a copy, written back")
        return Placement("scattered", param=main, shape=shape,
                         reason="every element lands once, but in an order no strided view expresses")
    return Placement("view", param=main, offset=int(where[0]) if numel else 0, shape=shape, stride=stride)


def _shard(part: tuple[str, torch.Tensor, torch.Tensor], shape: tuple[int, ...]) -> Placement | None:
    """A "shard" placement when the landed elements are one range along one dimension (every other dimension
    whole) and land as a strided box of one parameter; else None."""
    pname, idx, pos = part
    if not shape or idx.numel() == 0:
        return None
    coords = torch.stack(torch.unravel_index(idx, shape))  # ndim x landed
    lo, hi = coords.min(dim=1).values, coords.max(dim=1).values
    box = tuple(int(h - low) + 1 for low, h in zip(lo.tolist(), hi.tolist()))
    split = [j for j, (b, d) in enumerate(zip(box, shape)) if b != d]
    if len(split) != 1 or _numel(box) != idx.numel():
        return None
    local = torch.zeros_like(idx)
    for j, b in enumerate(box):
        local = local * b + (coords[j] - lo[j])
    where = torch.empty(idx.numel(), dtype=torch.int64)
    where[local] = pos
    stride = _strides(where, box)
    if stride is None:
        return None
    d = split[0]
    return Placement("shard", param=pname, offset=int(where[0]), shape=box, stride=stride, dim=d,
                     start=int(lo[d]), full=tuple(shape),
                     reason=f"rows {int(lo[d])}..{int(hi[d])} of dimension {d}: this rank's tensor-parallel slice")


def _rows(where: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]] | None:
    """(offset, the region row holding each HF row) when every HF row lands whole and in order as one row of a
    region of rows that long starting at `offset`; else None."""
    if len(shape) < 2 or where.numel() == 0:
        return None
    width = where.numel() // shape[0]
    grid = where.reshape(shape[0], width)
    starts = grid[:, 0]
    if not torch.equal(grid - starts[:, None], torch.arange(width, dtype=grid.dtype).expand_as(grid)):
        return None
    offset = int(starts.min())
    if bool(((starts - offset) % width != 0).any()):
        return None
    return offset, tuple(((starts - offset) // width).tolist())


def _strides(where: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The strides s with where[flat(i)] == where[0] + sum(i_j * s_j) for every index i, or None."""
    if where.numel() == 0:
        return tuple(0 for _ in shape)
    grid = where.reshape(shape) if shape else where.reshape(())
    origin = int(where[0])
    strides = []
    for j, d in enumerate(shape):
        if d == 1:
            strides.append(0)
            continue
        unit = [0] * len(shape)
        unit[j] = 1
        strides.append(int(grid[tuple(unit)]) - origin)
    if any(s < 0 for s in strides):  # a reversed order: as_strided takes no negative stride
        return None
    expect = torch.full(shape, origin, dtype=torch.int64)
    for j, (d, s) in enumerate(zip(shape, strides)):
        view = [1] * len(shape)
        view[j] = d
        expect += (torch.arange(d, dtype=torch.int64) * s).reshape(view)
    return tuple(strides) if torch.equal(expect, grid) else None
