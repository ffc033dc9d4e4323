"""The training benchmark runs end to end on a tiny random model (loop/bench/train.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from loop.bench.train import MODES, format_table, main, synthetic_pairs


def test_synthetic_pairs_share_the_prompt_and_score_the_answer() -> None:
    b = synthetic_pairs(100, n_pairs=2, seq_len=16, answer_len=5)
    assert b.input_ids.shape == (4, 16) and int(b.loss_mask.sum()) == 4 * 5
    assert torch.equal(b.input_ids[:2, :11], b.input_ids[2:, :11])
    with pytest.raises(ValueError, match="answer_len"):
        synthetic_pairs(100, n_pairs=1, seq_len=8, answer_len=8)


def test_bench_runs_every_mode_on_a_random_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True).save_pretrained(tmp_path)
    rows = main(["--model", str(tmp_path), "--random-init", "--device", "cpu", "--pairs", "1", "--seq", "32",
                 "--steps", "1"])
    assert [r.mode for r in rows] == list(MODES)
    assert all(r.tokens_per_s > 0 and math.isfinite(r.tokens_per_s) for r in rows)
    by = {r.mode: r for r in rows}
    assert by["apollo-mini-per-layer"].optimizer_state_bytes * 10 < by["hf-adamw"].optimizer_state_bytes
    out = capsys.readouterr().out
    assert "DPO step on CPU" in out and "x the throughput of hf-adamw" in out
    assert "hf-adamw" in format_table(rows, "test")
