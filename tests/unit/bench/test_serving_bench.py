"""Pure parts of `loop bench serving` (loop/bench/serving.py), no vLLM: configuration parsing with its errors,
percentiles, the tokens counted in the measured window, the per-configuration figures and ratios, the pause
protocol in each mode, the pacer kept off inside the pause, and the non-finite probe run under an MPS cap."""

from __future__ import annotations

import math
import time

import httpx

import pytest

from loop.bench.memory import Pauser
from loop.bench.serving import (
    Request,
    ServeConfig,
    _PacedPauser,
    _table,
    niced,
    parse_configs,
    percentile,
    ratio,
    summarise,
    window_tokens,
)
from loop.worker.pacing import Pacer


def test_configs_parse_with_their_write_pause_and_share() -> None:
    assert parse_configs("alone, staged-keep,lowmem-wait@0.25,hogwild@0.5") == [
        ServeConfig("alone", "alone", None, 1.0), ServeConfig("staged-keep", "staged", "keep", 1.0),
        ServeConfig("lowmem-wait@0.25", "lowmem", "wait", 0.25), ServeConfig("hogwild@0.5", "hogwild", None, 0.5)]
    assert parse_configs("staged-keep,staged-keep@0.5")[1].share == 0.5  # paced and not: two configurations
    guarded = parse_configs("staged-keep,staged-keep~0.2,lowmem-keep@0.5~0.5")
    assert [(c.share, c.recompute) for c in guarded] == [(1.0, 1.0), (1.0, 0.2), (0.5, 0.5)]


@pytest.mark.parametrize("text, message", [
    ("", "give a comma-separated list of alone, hogwild, staged-keep"),
    ("staged", "unknown configuration 'staged'"),
    ("staged-abort", "unknown configuration 'staged-abort'"),
    ("alone@0.5", "alone has no trainer to pace"),
    ("staged-keep@x", r"must be a number in \(0, 1\]"),
    ("staged-keep@0", r"must be in \(0, 1\], got 0"),
    ("staged-keep@1.5", r"must be in \(0, 1\], got 1.5"),
    ("alone,alone", "each configuration once"),
    ("staged-keep@0.5,staged-keep@0.50", "each configuration once"),
    ("staged-wait~0.2", "guards keep-mode writes only"),
    ("staged-keep~0", r"after ~ must be in \(0, 1\], got 0"),
    ("staged-keep~x", "after ~ must be a number"),
])
def test_bad_configs_exit_saying_what_to_write(text: str, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        parse_configs(text)


def test_percentiles_interpolate_between_ranks() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile(list(range(101)), 99) == 99.0
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_ratio_is_nan_without_a_baseline() -> None:
    assert ratio(50.0, 100.0) == 0.5
    assert math.isnan(ratio(50.0, float("nan"))) and math.isnan(ratio(50.0, 0.0)) and math.isnan(ratio(float("nan"), 1.0))


def test_window_counts_the_tokens_generated_inside_it_only() -> None:
    reqs = [Request(0.0, 1.0, 11.0, 100),  # half of its generation inside [6, 16]
            Request(6.0, 7.0, 9.0, 20),  # all inside
            Request(15.0, 15.5, 25.5, 50),  # a twentieth inside
            Request(6.0, float("nan"), 8.0, 0, "HTTP 500: boom")]  # failed: nothing
    assert window_tokens(reqs, 6.0, 16.0) == pytest.approx(50 + 20 + 2.5)


def test_an_answer_cut_after_the_window_counts_its_tokens_and_is_reported_not_done() -> None:
    reqs = [Request(0.0, 1.0, 21.0, 20, "unfinished 60 s after the window (20 of 1024 tokens)", cut=True),
            Request(0.0, 1.0, 3.0, 10)]
    row = summarise("staged-keep", reqs, 0.0, 10.0)
    assert row.cut == 1 and row.failed == 0 and row.requests == 1
    assert row.tokens_per_s == pytest.approx((20 * 9 / 20 + 10) / 10)


def test_summary_of_one_configuration() -> None:
    reqs = [Request(10.0 + i, 10.2 + i, 11.0 + i, 10) for i in range(10)]  # one a second, 1 s each
    reqs.append(Request(3.0, 3.1, 4.0, 10))  # in the warm-up: counts for failures only
    reqs.append(Request(12.5, float("nan"), 12.6, 0, "ReadError: reset"))
    row = summarise("staged-keep", reqs, 10.0, 20.0)
    assert row.failed == 1 and row.last_error == "ReadError: reset"
    assert row.requests == 10  # started inside [10, 20] and finished
    assert row.p50_s == pytest.approx(1.0) and row.p99_s == pytest.approx(1.0)
    assert row.ttft_p50_s == pytest.approx(0.2)
    assert row.tokens_per_s == pytest.approx(100 / 10)  # the warm-up request's tokens are outside the window
    empty = summarise("alone", [], 10.0, 20.0)
    assert empty.tokens_per_s == 0 and empty.requests == 0 and math.isnan(empty.p50_s)


def test_table_fills_the_ratio_and_dashes_what_was_not_measured() -> None:
    from dataclasses import asdict

    rows = [asdict(summarise("alone", [Request(0.0, 0.1, 1.0, 10)], 0.0, 1.0)),
            {**asdict(summarise("hogwild", [], 0.0, 1.0)), "steps": 3, "refused": ["nan"], "ratio": 0.5}]
    text = _table(rows, {"keep": 12.0, "wait": 30.5})
    lines = text.splitlines()
    assert lines[0].startswith("| config | tok/s | vs alone") and len(lines) == 5
    assert "| hogwild |" in lines[3] and "| 0.50 |" in lines[3] and "3 (1 refused)" in lines[3] and "| – |" in lines[3]
    assert lines[-1] == "idle pause round trip (median of 10): keep 12.0 ms, wait 30.5 ms"


def _recording_client(calls: list[str], reset_answer: dict | None = None) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path + (f"?{request.url.query.decode()}" if request.url.query else ""))
        if request.url.path == "/reset_prefix_cache":
            return httpx.Response(200, json=reset_answer or {"success": True})
        return httpx.Response(200, json={})

    return httpx.Client(base_url="http://vllm", transport=httpx.MockTransport(handler))


def test_keep_pause_freezes_then_resets_running_requests() -> None:
    calls: list[str] = []
    reset = "/reset_prefix_cache?reset_running_requests=true"

    def write() -> None:  # the reset runs beside the write: it arrives while the write is still going on
        deadline = time.monotonic() + 10
        while reset not in calls and time.monotonic() < deadline:
            time.sleep(0.01)
        calls.append("write")

    Pauser(_recording_client(calls), "keep").run(write)
    assert calls == ["/pause?mode=keep&clear_cache=false", reset, "write", "/resume"]
    calls.clear()
    Pauser(_recording_client(calls), "wait").run(lambda: calls.append("write"))
    assert calls[0] == "/pause?mode=wait" and sorted(calls[1:3]) == ["/reset_prefix_cache", "write"]
    assert calls[-1] == "/resume"
    with pytest.raises(ValueError, match="'wait' or 'keep'"):
        Pauser(_recording_client(calls), "abort")


def test_keep_pause_that_cannot_reset_fails_and_still_resumes() -> None:
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="could not reset its prefix cache"):
        Pauser(_recording_client(calls, {"success": False}), "keep").run(lambda: None)
    assert calls[-1] == "/resume"


def test_the_pause_window_is_never_paced() -> None:
    seen: list[bool] = []
    pacer = Pacer(0.5, lambda: True)
    pacer._on = True  # noqa: SLF001 - as inside active()
    _PacedPauser(Pauser(_recording_client([]), "keep"), pacer).run(lambda: seen.append(pacer._on))  # noqa: SLF001
    assert seen == [False] and pacer._on is True  # noqa: SLF001


def test_nonfinite_probe_names_the_first_module_and_the_refused_tensors() -> None:
    import argparse

    import torch

    from loop.bench.serving import nonfinite_probe
    from loop.bench.train import synthetic_pairs
    from tests.unit.worker_support import tiny_llama, tiny_tokenizer

    model = tiny_llama(tiny_tokenizer(["What is two plus two? Four. Five."]))
    args = argparse.Namespace(lr=1e-4, beta=0.1, max_update_ratio=1.0)
    batch = synthetic_pairs(int(model.get_input_embeddings().weight.shape[0]), 1, 16, 6)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    clean = nonfinite_probe(model, batch, args)
    assert clean["update_ok"] and clean["first_nonfinite_forward"] == "" and not clean["nonfinite_grads"]
    assert not clean["nonfinite_updates"] and clean["refusal"] == ""
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())  # the probe writes nothing
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    poisoned = nonfinite_probe(model, batch, args)
    assert poisoned["first_nonfinite_forward"].startswith("model.layers.1.mlp.down_proj (")
    assert not poisoned["update_ok"] and "non-finite" in poisoned["refusal"]
    assert poisoned["nonfinite_grads"] and poisoned["nonfinite_updates"]
    assert all(not m._forward_hooks for m in model.modules())  # noqa: SLF001 - its hooks are gone


def test_the_trainer_runs_niced_on_a_thread_of_its_own_and_the_starter_of_load_children_stays_as_it_was() -> None:
    import os
    import threading

    def nice_here() -> tuple[int, int]:
        return threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    tid, nice = niced(nice_here, 19)
    assert tid != threading.get_native_id() and nice == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
    assert niced(nice_here, 0) == (threading.get_native_id(), before)  # 0: run here, untouched

    def fails() -> None:
        raise ValueError("a step failed")

    with pytest.raises(ValueError, match="a step failed"):
        niced(fails, 19)
