"""Writing a checkpoint folder: the live weights as an HF folder that vLLM and transformers load as they are.

`write_folder(final, source, tensors, extra)` copies the source model's config, tokenizer and chat template, saves
the tensors as `model.safetensors`, or, past SHARD_BYTES, as Hugging Face's sharded layout
(`model-00001-of-0000N.safetensors` + `model.safetensors.index.json`, what vLLM, transformers and
`screen.BaseWeights` read), lets `extra(tmp)` add files (the worker: optimizer state in a subfolder,
`loop.json`), fsyncs every file and the folder, and renames the temporary folder into place, so a checkpoint is
either complete or absent (a failed write removes its temporary folder; a crash half-way leaves only a
`.name.tmp-*` folder, never a partial checkpoint). The worker (loop/worker/main.py)
and `loop bench durable` both call it, so the bench measures what the service does.

The tensors are a dict, or a `Lazy` source: whole shapes and dtypes up front (the shard files are planned from
them) and each shard file's tensors made only when that file is written, then freed. A tensor-parallel worker
writes that way (`lazy_checkpoint`): every rank takes part in the gathers of one shard file at a time and rank 0
writes it, so rank 0 holds about one shard file in host memory, never the whole model. The other ranks run the
same gathers through `drain`; rank 0 drains what is left when its write fails (disk full, the folder exists), so
nobody is left waiting in a collective.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SKIP_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".index.json")
SKIP_NAMES = {"loop.json", "PINNED"}  # PINNED: loop/versions.py marks a checkpoint kept on request
SHARD_BYTES = 5 << 30  # the most bytes of one weight file, as transformers' save_pretrained shards by default
INDEX = "model.safetensors.index.json"

log = logging.getLogger("loop.worker")


@dataclass
class Lazy:
    """Checkpoint tensors made a shard file at a time. `tensors`: every name in checkpoint order with its whole shape
    and dtype (meta tensors: sizes, no data); `load(names)`: those names' tensors. On a tensor-parallel worker every
    rank calls `load` with the same names in the same order (it gathers), and ranks other than 0 may get nothing."""

    tensors: dict[str, Any]
    load: Callable[[list[str]], dict[str, Any]]


def has_weights(folder: Path) -> bool:
    """A complete checkpoint's weights are there: one file, or the index of its shards."""
    return (folder / "model.safetensors").is_file() or (folder / INDEX).is_file()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_folder(final: Path, source: Path, tensors: dict[str, Any] | Lazy,
                 extra: Callable[[Path], None] | None = None, *, shard_bytes: int | None = None) -> list[str]:
    """Write `tensors` (HF names → tensors, or a `Lazy` source of them) as the checkpoint folder `final`; returns its
    files (relative). A write that fails still loads every shard file's tensors it had not loaded yet (`drain`)
    before raising, so the other ranks of a tensor-parallel worker finish their gathers."""
    plan = _Plan(tensors, shard_bytes)
    try:
        if final.exists():
            raise FileExistsError(f"checkpoint folder {final} already exists; not overwriting it")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        try:
            _fill(tmp, source, plan, extra)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed write leaves nothing behind, and never a partial final
            raise
        os.rename(tmp, final)  # atomic: the folder is complete or absent
        fsync_path(final.parent)
    except Exception as exc:
        import traceback

        traceback.clear_frames(exc.__traceback__)  # the failed file's tensors, freed before the rest are loaded
        plan.drain()
        raise
    return sorted(str(f.relative_to(final)) for f in final.rglob("*") if f.is_file())


def drain(tensors: dict[str, Any] | Lazy, shard_bytes: int | None = None) -> None:
    """What `write_folder` loads, shard file by shard file, writing nothing: the ranks of a tensor-parallel worker
    other than 0 take part in rank 0's gathers this way (the same `shard_bytes`, so the same groups)."""
    _Plan(tensors, shard_bytes).drain()


class _Plan:
    """The shard files of a checkpoint and their tensors, loaded one file at a time, in order."""

    def __init__(self, tensors: dict[str, Any] | Lazy, shard_bytes: int | None) -> None:
        self.lazy = tensors if isinstance(tensors, Lazy) else \
            Lazy(tensors, lambda names: {k: tensors[k] for k in names})
        self.groups = shards(self.lazy.tensors, SHARD_BYTES if shard_bytes is None else shard_bytes)
        self.loaded = 0
        self.broken = False  # a load raised: its gathers are half-done, more loads cannot meet the other ranks

    def load(self) -> dict[str, Any]:
        group = self.groups[self.loaded]
        self.loaded += 1
        try:
            return self.lazy.load(group)
        except BaseException:
            self.broken = True
            raise

    def drain(self) -> None:
        while not self.broken and self.loaded < len(self.groups):
            self.load()


def shards(tensors: dict[str, Any], limit: int) -> list[list[str]]:
    """Names in order, cut into groups of at most `limit` bytes (a tensor larger than that is a group alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


def _fill(tmp: Path, source: Path, plan: _Plan, extra: Callable[[Path], None] | None) -> None:
    import json

    from safetensors.torch import save_file

    for f in source.iterdir():  # config, tokenizer, generation config, chat template
        if f.is_file() and not f.name.endswith(SKIP_SUFFIXES) and f.name not in SKIP_NAMES:
            shutil.copy2(f, tmp / f.name)
            os.chmod(tmp / f.name, 0o600)  # private like the weights, whatever the source folder's modes
    groups = plan.groups
    names = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    for file, group in zip(names, groups):
        part = plan.load()
        # bf16 views are contiguous row slices; .contiguous() copies only the odd one out
        save_file({k: part[k].detach().contiguous() for k in group}, str(tmp / file), metadata={"format": "pt"})
        del part  # freed before the next file's tensors are made
    if len(groups) > 1:
        total = sum(t.numel() * t.element_size() for t in plan.lazy.tensors.values())
        weight_map = {k: file for file, group in zip(names, groups) for k in group}
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    if extra is not None:
        extra(tmp)
    for f in tmp.rglob("*"):
        if f.is_file():
            fsync_path(f)
    for d in [*(p for p in tmp.rglob("*") if p.is_dir()), tmp]:
        fsync_path(d)


def checkpoint_tensors(model: Any, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Checkpoint name -> tensor, as `save_pretrained` writes this model: each Parameter once (a tied lm_head is
    left out) and, through transformers' own `revert_weight_conversion`, what transformers keeps fused in memory
    split back into the checkpoint's tensors (a MoE layer's experts, one per expert). `params`: the parameters'
    values to write instead of the model's own (a tensor-parallel rank's slices gathered whole)."""
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(model, params if params is not None else dict(model.named_parameters())))


def lazy_checkpoint(model: Any, whole: dict[str, Any], gather: Callable[[list[str]], dict[str, Any]]) -> Lazy:
    """`checkpoint_tensors` of a model whose parameters are made whole on demand, as a `Lazy` source. `whole`: every
    parameter (name → a meta tensor of its whole shape and dtype, in `named_parameters` order); `gather(names)`: those
    parameters' whole values (a tensor-parallel worker's all-gathers: every rank calls it with the same names; ranks
    that do not write may return nothing).

    A checkpoint tensor the conversion passes through unchanged (the parameter itself) is gathered alone; the others
    (a MoE layer's fused experts, split per expert) are converted from the parameters of their decoder layer that the
    conversion changes, gathered together. A load thus holds its shard file's tensors and at most one layer's
    converted parameters more. Learned from the meta tensors alone, the same on every rank."""
    from loop.layout import layer_of

    meta = checkpoint_tensors(model, whole)  # names in checkpoint order, whole shapes and dtypes
    layers: dict[int | None, list[str]] = {}
    for n in whole:
        layers.setdefault(layer_of(n), []).append(n)
    passed: set[str] = set()  # checkpoint tensors that are their parameter, unchanged
    sources: dict[str, tuple[str, ...]] = {}  # the others -> the parameters they are converted from
    seen: dict[str, tuple[tuple[int, ...], Any]] = {}
    for members in layers.values():
        out = checkpoint_tensors(model, {n: whole[n] for n in members})
        seen.update({k: (tuple(t.shape), t.dtype) for k, t in out.items()})
        kept = {k for k, t in out.items() if t is whole.get(k)}
        changed = tuple(n for n in members if n not in kept)
        if set(checkpoint_tensors(model, {n: whole[n] for n in changed})) != set(out) - kept:
            changed = tuple(members)  # the conversion needs the unchanged ones too: the whole layer
        passed |= kept
        sources.update({k: changed for k in out if k not in kept})
    if seen != {k: (tuple(t.shape), t.dtype) for k, t in meta.items()}:
        log.warning("checkpoint: the conversion of %s mixes parameters of several layers; its checkpoint is made "
                    "from every parameter at once", type(model).__name__)
        passed, sources = set(), {k: tuple(whole) for k in meta}

    def load(names: list[str]) -> dict[str, Any]:
        made = gather([k for k in names if k in passed])
        together: dict[tuple[str, ...], list[str]] = {}
        for k in names:
            if k not in passed:
                together.setdefault(sources[k], []).append(k)
        for params, wanted in together.items():  # one converted layer at a time
            converted = checkpoint_tensors(model, gather(list(params)))
            made.update({k: converted[k] for k in wanted if k in converted})
            del converted
        return {k: made[k] for k in names if k in made}

    return Lazy(meta, load)


def restore_targets(model: Any, names: set[str]) -> dict[str, tuple[Any, Any]]:
    """For checkpoint tensors that are not simply a parameter of the same name and shape: checkpoint name ->
    (parameter, index of the parameter's element each checkpoint element restores, in the tensor's shape).

    Learned exactly, without knowing the conversion: the parameters are given coded values (one distinct float64
    per element), turned into checkpoint tensors by the same `revert_weight_conversion`, and each code read back.
    One decoder layer at a time, so the codes cost at most one layer's elements in float64."""
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    from loop.layout import layer_of

    params = dict(model.named_parameters())
    groups: dict[int | None, list[str]] = {}
    for n in params:
        groups.setdefault(layer_of(n), []).append(n)
    out: dict[str, tuple[Any, Any]] = {}
    for members in groups.values():
        bases, total = {}, 0
        for n in members:
            bases[n], total = total, total + params[n].numel()
        coded = {n: (torch.arange(params[n].numel(), dtype=torch.float64) + bases[n] + 1).reshape(params[n].shape)
                 for n in members}
        starts = torch.tensor([bases[n] for n in members])
        for name, t in revert_weight_conversion(model, coded).items():
            if name not in names:
                continue
            code = t.reshape(-1).to(torch.int64) - 1
            which = torch.unique(torch.searchsorted(starts, code, right=True) - 1)
            if which.numel() != 1:
                raise ValueError(f"checkpoint tensor {name} mixes several parameters; it cannot be restored in place")
            owner = members[int(which)]
            out[name] = (params[owner], (code - bases[owner]).reshape(t.shape))
    return out
