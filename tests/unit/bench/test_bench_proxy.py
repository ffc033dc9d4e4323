"""`loop bench proxy`'s parts that need no server: the requests it sends (chat, or token-id completions for a
model without a tokenizer), its JSON figures, and the flags it refuses.
Run: .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/bench/test_bench_proxy.py
"""

from __future__ import annotations

import argparse

import pytest

from loop.bench.proxy import Stats, as_json, main, register, request_body


def test_completions_requests_are_token_ids_of_the_asked_length_and_differ_per_request() -> None:
    a, b = (request_body("completions", "m", i, 16, 32) for i in (1, 2))
    assert len(a["prompt"]) == 32 and all(isinstance(t, int) for t in a["prompt"])
    assert a["prompt"][:-1] == b["prompt"][:-1] and a["prompt"][-1] != b["prompt"][-1]
    assert (a["max_tokens"], a["temperature"], a["ignore_eos"]) == (16, 0, True) and "messages" not in a


def test_chat_requests_are_messages() -> None:
    body = request_body("chat", "m", 3, 8, 32)
    assert body["messages"][0]["role"] == "user" and "(3)" in body["messages"][0]["content"]


def test_json_figures_are_milliseconds_with_the_added_share() -> None:
    stats = {"vllm": Stats(0.1, 0.2, 0.1), "loop": Stats(0.102, 0.2, 0.103), "diff": Stats(0.002, 0.003, 0.002),
             "vllm_ttft": Stats(0.05, 0.06, 0.05), "loop_ttft": Stats(0.0515, 0.06, 0.052),
             "ttft_diff": Stats(0.001, 0.002, 0.001)}
    out = as_json(stats, 10, 16, "completions")
    assert out["added_p50_ms"] == pytest.approx(2.0) and out["added_p50_pct"] == pytest.approx(2.0)
    assert out["added_ttft_p50_ms"] == pytest.approx(1.5) and out["added_ttft_p50_pct"] == pytest.approx(3.0)
    assert out["paired_ttft_ms"] == pytest.approx(1.0) and out["ms"]["vllm"]["p50"] == pytest.approx(100.0)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["proxy", *argv])


@pytest.mark.parametrize("argv, words", [
    (["--dummy", "--vllm-url", "unix:/x"], "leave out --vllm-url"),
    (["--dummy", "--endpoint", "chat"], "use --endpoint completions"),
    (["-n", "0"], "-n must be at least 1"),
])
def test_flags_that_cannot_work_are_refused_before_anything_starts(argv, words, capsys) -> None:  # noqa: ANN001
    assert main(_args(*argv)) == 2
    assert words in capsys.readouterr().err
