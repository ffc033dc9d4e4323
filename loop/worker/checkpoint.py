"""Writing a checkpoint folder: the live weights as an HF folder that vLLM and transformers load as they are.

`write_folder(final, source, tensors, extra)` copies the source model's config, tokenizer and chat template, saves
the tensors as `model.safetensors`, or, past SHARD_BYTES, as Hugging Face's sharded layout
(`model-00001-of-0000N.safetensors` + `model.safetensors.index.json`, what vLLM, transformers and
`screen.BaseWeights` read), lets `extra(tmp)` add files (the worker: optimizer state in a subfolder,
`loop.json`), fsyncs every file and the folder, and renames the temporary folder into place, so a checkpoint is
either complete or absent (a failed write removes its temporary folder; a crash half-way leaves only a
`.name.tmp-*` folder, never a partial checkpoint). The worker (loop/worker/main.py)
and `loop bench durable` both call it, so the bench measures what the service does.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

SKIP_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".index.json")
SKIP_NAMES = {"loop.json", "PINNED"}  # PINNED: loop/versions.py marks a checkpoint kept on request
SHARD_BYTES = 5 << 30  # the most bytes of one weight file, as transformers' save_pretrained shards by default
INDEX = "model.safetensors.index.json"


def has_weights(folder: Path) -> bool:
    """A complete checkpoint's weights are there: one file, or the index of its shards."""
    return (folder / "model.safetensors").is_file() or (folder / INDEX).is_file()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_folder(final: Path, source: Path, tensors: dict[str, Any],
                 extra: Callable[[Path], None] | None = None, *, shard_bytes: int | None = None) -> list[str]:
    """Write `tensors` (HF names → tensors) as the checkpoint folder `final`; returns its files (relative)."""
    if final.exists():
        raise FileExistsError(f"checkpoint folder {final} already exists; not overwriting it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    try:
        _fill(tmp, source, tensors, extra, shard_bytes)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write leaves nothing behind, and never a partial final
        raise
    os.rename(tmp, final)  # atomic: the folder is complete or absent
    fsync_path(final.parent)
    return sorted(str(f.relative_to(final)) for f in final.rglob("*") if f.is_file())


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


def _fill(tmp: Path, source: Path, tensors: dict[str, Any], extra: Callable[[Path], None] | None,
          shard_bytes: int | None = None) -> None:
    import json

    from safetensors.torch import save_file

    for f in source.iterdir():  # config, tokenizer, generation config, chat template
        if f.is_file() and not f.name.endswith(SKIP_SUFFIXES) and f.name not in SKIP_NAMES:
            shutil.copy2(f, tmp / f.name)
            os.chmod(tmp / f.name, 0o600)  # private like the weights, whatever the source folder's modes
    # bf16 views are contiguous row slices; .contiguous() copies only the odd one out
    groups = shards(tensors, SHARD_BYTES if shard_bytes is None else shard_bytes)
    names = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    for file, group in zip(names, groups):
        save_file({k: tensors[k].detach().contiguous() for k in group}, str(tmp / file), metadata={"format": "pt"})
    if len(groups) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
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
