"""loop/worker/checkpoint.py: a checkpoint folder is complete (config, tokenizer, weights, extras) or absent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from loop.worker.checkpoint import write_folder


def source(tmp_path: Path) -> Path:
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "tokenizer.json").write_text("{}")
    (src / "model.safetensors").write_text("old weights: never copied")
    return src


def test_writes_weights_and_the_source_files_but_not_its_weights(tmp_path: Path) -> None:
    tensors = {"a.weight": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "b": torch.ones(4)[::2]}
    files = write_folder(tmp_path / "ckpt" / "v000001", source(tmp_path), tensors,
                         lambda tmp: (tmp / "loop.json").write_text("{}"))
    assert files == ["config.json", "loop.json", "model.safetensors", "tokenizer.json"]
    back = load_file(str(tmp_path / "ckpt" / "v000001" / "model.safetensors"))
    assert torch.equal(back["a.weight"], tensors["a.weight"]) and torch.equal(back["b"], torch.ones(2))
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["v000001"]  # no temporary folder left


def test_copied_source_files_are_private_whatever_their_modes(tmp_path: Path) -> None:
    src = source(tmp_path)
    for f in src.iterdir():
        f.chmod(0o644)
    write_folder(tmp_path / "ckpt", src, {"a": torch.ones(2)})
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in (tmp_path / "ckpt").iterdir()}
    assert modes == {"config.json": "0o600", "tokenizer.json": "0o600", "model.safetensors": "0o600"}


def test_a_failed_write_leaves_nothing_and_an_existing_folder_is_never_overwritten(tmp_path: Path) -> None:
    src = source(tmp_path)

    def fail(tmp: Path) -> None:
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_folder(tmp_path / "ckpt" / "v000002", src, {"w": torch.zeros(2)}, fail)
    assert list((tmp_path / "ckpt").iterdir()) == []
    write_folder(tmp_path / "ckpt" / "v000002", src, {"w": torch.zeros(2)})
    with pytest.raises(FileExistsError, match="not overwriting"):
        write_folder(tmp_path / "ckpt" / "v000002", src, {"w": torch.ones(2)})
    assert torch.equal(load_file(str(tmp_path / "ckpt" / "v000002" / "model.safetensors"))["w"], torch.zeros(2))


def weights() -> dict[str, torch.Tensor]:
    """Eight tensors of 64 bytes..4 KiB, bf16 and fp32: with shard_bytes=1000 several files, one tensor alone."""
    g = torch.Generator().manual_seed(0)
    out = {f"layers.{i}.w": torch.randn(4 * (i + 1), 8, generator=g).to(torch.bfloat16 if i % 2 else torch.float32)
           for i in range(7)}
    out["big"] = torch.randn(32, 32, generator=g)
    return out


class Counting:
    """A `Lazy` source over `tensors` that records each load's names and the bytes of earlier loads' tensors still
    alive when it is called (freed tensors are noticed through weak references)."""

    def __init__(self, tensors: dict[str, torch.Tensor], fail_at: int | None = None) -> None:
        self.tensors, self.fail_at = tensors, fail_at
        self.calls: list[list[str]] = []
        self.held: list[int] = []
        self.alive = 0

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        import weakref

        self.held.append(self.alive)
        self.calls.append(list(names))
        if self.fail_at == len(self.calls):
            raise RuntimeError("the gather broke")
        out = {k: self.tensors[k].clone() for k in names}  # a fresh tensor, as a gather makes
        for t in out.values():
            n = t.numel() * t.element_size()
            self.alive += n
            weakref.finalize(t, self._freed, n)
        return out

    def _freed(self, n: int) -> None:
        self.alive -= n

    def lazy(self) -> Any:
        from loop.worker.checkpoint import Lazy

        return Lazy({k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in self.tensors.items()},
                    self.load)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_a_lazy_source_writes_the_dicts_files_one_shard_file_in_memory_at_a_time(tmp_path: Path) -> None:
    from loop.worker.checkpoint import INDEX, shards

    src, tensors = source(tmp_path), weights()
    write_folder(tmp_path / "dict", src, tensors, shard_bytes=1000)
    counting = Counting(tensors)
    write_folder(tmp_path / "lazy", src, counting.lazy(), shard_bytes=1000)
    want = files_of(tmp_path / "dict")
    assert INDEX in want and len([f for f in want if f.startswith("model-")]) >= 3
    assert files_of(tmp_path / "lazy") == want  # byte for byte, index included
    groups = shards(tensors, 1000)
    assert counting.calls == groups  # each file's tensors loaded once, in file order
    assert counting.held == [0] * len(groups)  # the previous file's tensors were freed before the next load
    assert counting.alive == 0


@pytest.mark.parametrize("how", ["disk full on the second file", "the folder exists"])
def test_a_failed_lazy_write_still_loads_every_file_so_other_ranks_finish_their_gathers(tmp_path: Path, how) -> None:
    from unittest import mock

    from loop.worker.checkpoint import drain, shards

    src, tensors = source(tmp_path), weights()
    final = tmp_path / "ckpt" / "v000003"
    groups = shards(tensors, 1000)
    counting = Counting(tensors)
    if how == "the folder exists":
        final.mkdir(parents=True)
        with pytest.raises(FileExistsError):
            write_folder(final, src, counting.lazy(), shard_bytes=1000)
        assert list(final.iterdir()) == []
    else:
        import safetensors.torch

        real, written = safetensors.torch.save_file, []

        def save(*args: Any, **kw: Any) -> None:
            written.append(args[1])
            if len(written) == 2:
                raise OSError(28, "No space left on device")
            real(*args, **kw)

        with mock.patch.object(safetensors.torch, "save_file", save), pytest.raises(OSError, match="No space"):
            write_folder(final, src, counting.lazy(), shard_bytes=1000)
        assert len(written) == 2 and list(final.parent.iterdir()) == []  # no final folder, no temporary one
    assert counting.calls == groups  # what another rank's drain gathers, in the same order
    assert counting.held == [0] * len(groups)  # the failed file's tensors freed before the rest were loaded
    other = Counting(tensors)
    drain(other.lazy(), shard_bytes=1000)
    assert other.calls == groups


def test_a_broken_load_is_not_retried(tmp_path: Path) -> None:
    """A load that raised left its gathers half-done: loading more would not meet the other ranks."""
    counting = Counting(weights(), fail_at=2)
    with pytest.raises(RuntimeError, match="gather broke"):
        write_folder(tmp_path / "ckpt", source(tmp_path), counting.lazy(), shard_bytes=1000)
    assert len(counting.calls) == 2 and list((tmp_path).iterdir()) == [tmp_path / "model"]


def test_lazy_checkpoint_converts_fused_experts_one_layer_at_a_time(tmp_path: Path) -> None:
    """A MoE model whose experts transformers keeps fused: the lazy checkpoint is the dict one byte for byte, each
    pass-through tensor is gathered alone and a fused layer's experts from that layer's parameters only."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from loop.layout import layer_of
    from loop.worker.checkpoint import checkpoint_tensors, lazy_checkpoint

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8))
    params = dict(model.named_parameters())
    whole = {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in params.items()}
    gathered: list[list[str]] = []

    def gather(names: list[str]) -> dict[str, torch.Tensor]:
        gathered.append(list(names))
        return {n: params[n].detach().clone() for n in names}

    src = source(tmp_path)
    state = checkpoint_tensors(model)
    assert any(".experts.0.gate_proj" in k for k in state)  # the conversion splits the experts
    write_folder(tmp_path / "dict", src, state, shard_bytes=4000)
    lazy = lazy_checkpoint(model, whole, gather)
    assert list(lazy.tensors) == list(state)
    write_folder(tmp_path / "lazy", src, lazy, shard_bytes=4000)
    want = files_of(tmp_path / "dict")
    assert len([f for f in want if f.startswith("model-")]) >= 3
    assert files_of(tmp_path / "lazy") == want
    fused = [g for g in gathered if any(n not in state for n in g)]
    assert fused and all(len({layer_of(n) for n in g}) == 1 and all("experts" in n for n in g) for g in fused)
    assert sorted(n for g in gathered if g not in fused for n in g) == sorted(k for k in state if k in params)
