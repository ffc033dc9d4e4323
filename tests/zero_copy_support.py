"""Helpers shared by the CPU (tests/e2e) and CUDA (tests/gpu) zero-copy tests: start a real vLLM with the loop
plugin and LOOP_RUNTIME_DIR, read its prompt log-probs and greedy output, and compute HF log-probs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from loop.vllm.process import kernel_args
from tests.support import free_port, wait_for

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


def start_vllm(model: str, tmp: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> VLLM:
    """`python -m vllm.entrypoints.openai.api_server` with the plugin exporting into tmp/run; waits for /health."""
    runtime_dir = tmp / "run"  # created by the plugin, 0700
    port = free_port()
    child_env = {**os.environ, "LOOP_RUNTIME_DIR": str(runtime_dir), "VLLM_SERVER_DEV_MODE": "1", **(env or {})}
    child_env.pop("LOOP_PLUGIN_DISABLE", None)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
           "--seed", "0", *kernel_args(model, "cuda" if torch.cuda.is_available() else "cpu"), *args]  # fmt: skip
    log_path = tmp / "vllm.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True)
    server = VLLM(url=f"http://127.0.0.1:{port}", model=model, runtime_dir=runtime_dir, proc=proc, log_path=log_path)
    try:
        wait_for(f"{server.url}/health", timeout, proc=proc)
    except BaseException as exc:
        server.stop()
        lines = log_path.read_text(errors="replace").splitlines()
        # the root cause is often far above the last lines (an engine core's traceback, then the API server's)
        causes = [ln for ln in lines[:-40] if "Error:" in ln and "WARNING" not in ln][-5:]
        tail = "\n".join([*causes, "...", *lines[-40:]] if causes else lines[-40:])
        raise RuntimeError(f"vLLM did not start: {exc}\n{tail}") from exc
    return server


def attach_model(vllm: VLLM):  # noqa: ANN201 - (HandleSet, tensors, HF model)
    """vLLM's handle file read, its tensors attached (no copy) and the HF model built on views of them."""
    from loop.worker.handles import attach, read_handles
    from loop.worker.views import build_model, layout_of

    hs = read_handles(vllm.runtime_dir, wait_s=30)
    tensors = attach(hs)
    model = build_model(hs.meta["model_path"], tensors, layout=layout_of(hs.meta))
    return hs, tensors, model


def token_ids(model_path: str, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)(text)["input_ids"]


def vllm_prompt_logprobs(vllm: VLLM, ids: list[int]) -> list[float]:
    r = httpx.post(f"{vllm.url}/v1/completions", timeout=300, json={
        "model": vllm.model, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0})  # fmt: skip
    r.raise_for_status()
    pl = r.json()["choices"][0]["prompt_logprobs"]
    return [pl[i][str(ids[i])]["logprob"] for i in range(1, len(ids))]


def hf_prompt_logprobs(model: torch.nn.Module, ids: list[int]) -> list[float]:
    device = next(model.parameters()).device
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids], device=device)).logits[0].float(), dim=-1)
    return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]


def greedy(vllm: VLLM) -> tuple[str, list[float]]:
    """Greedy chat answer and its token log-probs, after resetting the prefix cache (KV of old weights is stale)."""
    httpx.post(f"{vllm.url}/reset_prefix_cache", timeout=60).raise_for_status()
    r = httpx.post(f"{vllm.url}/v1/chat/completions", timeout=300, json={
        "model": vllm.model, "messages": [{"role": "user", "content": CHAT}], "max_tokens": 24, "temperature": 0,
        "logprobs": True})  # fmt: skip
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return choice["message"]["content"], [t["logprob"] for t in choice["logprobs"]["content"]]


def perturb_linears(model: torch.nn.Module, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Add large noise to a few Linear weights through the HF views; returns (param, saved copy) to undo it."""
    targets = [model.model.layers[i].self_attn.o_proj.weight for i in range(4)] + [model.model.layers[0].mlp.up_proj.weight]
    saved = [(w, w.detach().clone()) for w in targets]
    gen = torch.Generator(device=targets[0].device).manual_seed(seed)
    with torch.no_grad():
        for w in targets:
            w.add_(torch.randn(w.shape, generator=gen, device=w.device, dtype=w.dtype) * w.float().std().to(w.dtype) * 3)
    return saved


def restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for w, old in saved:
            w.copy_(old)
