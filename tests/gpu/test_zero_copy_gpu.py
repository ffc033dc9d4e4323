"""Zero-copy on CUDA: the same checks as tests/e2e/test_zero_copy.py, through CUDA IPC, with CUDA graphs ON.

- `test_cuda_ipc_between_processes` needs only torch with a GPU: a child exports a CUDA module with the plugin's
  export code, this process attaches and both see each other's writes.
- the others start CUDA vLLM (default torch.compile + CUDA graphs, i.e. no --enforce-eager) with the plugin.

    pytest -m gpu tests/gpu/test_zero_copy_gpu.py          (LOOP_TEST_MODEL=DIR to use another model folder)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from loop.worker.handles import attach, read_handles
from loop.worker.views import views_alias
from tests.zero_copy_support import (
    PROMPT, VLLM, attach_model, greedy, hf_prompt_logprobs, perturb_linears, restore, start_vllm, token_ids, vllm_prompt_logprobs,
)  # fmt: skip

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CHILD = r"""
import sys, torch
from plugin.export import export_module
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 6), torch.nn.Linear(4, 10, bias=False)).cuda()
m[2].weight = m[0].weight
export_module(m, sys.argv[1], meta={"model_path": "tiny", "architectures": ["Tiny"]})
print("ready", flush=True)
for line in sys.stdin:
    torch.cuda.synchronize()
    print(repr(m[0].weight.sum().item()) + " " + repr(m[1].weight.sum().item()), flush=True)
"""


def test_cuda_ipc_between_processes(tmp_path: Path) -> None:
    rd = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(rd)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
        hs = read_handles(rd)
        assert hs.meta["device"] == "cuda" and ((rd / "weights-tp0.json").stat().st_mode & 0o777) == 0o600
        ts = attach(hs)
        assert ts["0.weight"].is_cuda and ts["0.weight"].data_ptr() == ts["2.weight"].data_ptr()
        ts["0.weight"].fill_(0.5)
        ts["1.weight"].fill_(2.0)
        torch.cuda.synchronize()
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert tuple(map(float, proc.stdout.readline().split())) == (0.5 * 40, 2.0 * 24)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdin.close()
        proc.stdout.close()
    deadline = time.monotonic() + 20  # the reaper removes the handle file of a dead exporter
    while time.monotonic() < deadline and (rd / "weights-tp0.json").exists():
        time.sleep(0.1)
    assert not (rd / "weights-tp0.json").exists()


def _model() -> str:
    if os.environ.get("LOOP_TEST_MODEL"):
        return os.environ["LOOP_TEST_MODEL"]
    from loop.model_cache import resolve_model

    return str(resolve_model("smollm2", Path(os.path.expanduser("~/.cache/loop"))))


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLM]:
    server = start_vllm(_model(), tmp_path_factory.mktemp("zero-copy-gpu"), "--dtype", "bfloat16",
                        "--max-model-len", "1024", "--gpu-memory-utilization", "0.3",
                        env={"VLLM_USE_FLASHINFER_SAMPLER": "0"}, timeout=900)  # fmt: skip
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def hf(vllm: VLLM):
    return attach_model(vllm)


def test_attach_metadata_and_views(vllm: VLLM, hf) -> None:
    hs, tensors, model = hf
    assert (vllm.runtime_dir.stat().st_mode & 0o777) == 0o700
    assert ((vllm.runtime_dir / "weights-tp0.json").stat().st_mode & 0o777) == 0o600
    assert hs.meta["device"] == "cuda" and hs.meta["dtype"] == "bfloat16" and hs.meta["tp_size"] == 1
    assert all(t.is_cuda for t in tensors.values())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert views_alias(model, tensors)


def test_parity_with_vllm_prompt_logprobs_bf16(vllm: VLLM, hf) -> None:
    _, _, model = hf
    ids = token_ids(vllm.model, PROMPT)
    diffs = [abs(a - b) for a, b in zip(hf_prompt_logprobs(model, ids), vllm_prompt_logprobs(vllm, ids))]
    # bf16 noise: different kernels (vLLM's fused/compiled ones vs HF eager) round differently
    assert sum(diffs) / len(diffs) < 0.05 and max(diffs) < 0.3, diffs


def test_in_place_write_seen_with_cuda_graphs_and_restored_bit_for_bit(vllm: VLLM, hf) -> None:
    _, _, model = hf
    before = greedy(vllm)
    saved = perturb_linears(model)
    torch.cuda.synchronize()
    try:
        assert greedy(vllm) != before, "vLLM did not see in-place writes"
    finally:
        restore(saved)
        torch.cuda.synchronize()
    assert greedy(vllm) == before


def test_handle_file_removed_after_vllm_stops(vllm: VLLM, hf) -> None:
    vllm.stop()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (vllm.runtime_dir / "weights-tp0.json").exists():
        time.sleep(0.2)
    assert not (vllm.runtime_dir / "weights-tp0.json").exists()
