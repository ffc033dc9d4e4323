"""loop/worker/checkpoint.py: a checkpoint folder is complete (config, tokenizer, weights, extras) or absent."""

from __future__ import annotations

from pathlib import Path

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
