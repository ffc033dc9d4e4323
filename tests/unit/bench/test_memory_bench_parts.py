"""Pure parts of `loop bench memory` (loop/bench/memory.py): mode parsing, the pause protocol's order and its
resume-on-error, the copy route's floor and the row text."""

from __future__ import annotations

import httpx
import pytest

from loop.bench.memory import ModeRow, Pauser, _copy_floor, _format_row, parse_modes


def test_parse_modes_keeps_order_and_refuses_unknown_or_repeated() -> None:
    assert parse_modes("staged,lowmem") == ["staged", "lowmem"]
    assert parse_modes(" adamw ") == ["adamw"]
    with pytest.raises(SystemExit, match="unknown: sgd"):
        parse_modes("staged,sgd")
    with pytest.raises(SystemExit, match="each once"):
        parse_modes("staged,staged")
    with pytest.raises(SystemExit, match="lowmem,staged,adamw"):
        parse_modes(",")


def _recording_client(calls: list[str]) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path + (f"?{request.url.query.decode()}" if request.url.query else ""))
        return httpx.Response(200, json={})

    return httpx.Client(base_url="http://vllm", transport=httpx.MockTransport(handler))


def test_pauser_writes_between_pause_and_reset_then_resumes() -> None:
    calls: list[str] = []
    ms = Pauser(_recording_client(calls)).run(lambda: calls.append("write"))
    # paused, the reset runs beside the write: both before the resume, in either order
    assert calls[0] == "/pause?mode=wait" and calls[-1] == "/resume"
    assert sorted(calls[1:3]) == ["/reset_prefix_cache", "write"]
    assert ms >= 0


def test_pauser_resumes_vllm_when_the_write_fails() -> None:
    calls: list[str] = []

    def boom() -> None:
        raise MemoryError("out of memory in the apply")

    with pytest.raises(MemoryError):
        Pauser(_recording_client(calls)).run(boom)
    assert calls == ["/pause?mode=wait", "/reset_prefix_cache", "/resume"]


def test_copy_floor_adds_the_second_copy_to_each_measured_optimizer_state() -> None:
    rows = [{"mode": "lowmem", "fits": True, "optimizer_state_bytes": 10},
            {"mode": "staged", "fits": True, "optimizer_state_bytes": 10},
            {"mode": "adamw", "fits": True, "optimizer_state_bytes": 400}]
    text = _copy_floor(rows, weight_bytes=100)
    assert ">= 1.00x" in text and "apollo-mini 1.10x" in text and "adamw 5.00x" in text
    assert "adamw" not in _copy_floor([{**rows[2], "fits": False}], weight_bytes=100)


def test_row_text_says_oom_or_the_ratio_and_whether_weights_changed() -> None:
    oom = ModeRow("adamw", fits=False, error="OOM: CUDA out of memory", served=3)
    assert "OOM" in _format_row(oom) and "served 3" in _format_row(oom)
    ok = ModeRow("staged", peak_extra_bytes=2**30, ratio=0.25, step_s=2.0, tokens_per_s=64, paused_ms=5.0,
                 min_free_bytes=2**31, served=4, applied=1, checksum_before="a", checksum_after="b")
    text = _format_row(ok)
    assert "0.250x the weights" in text and "served 4, failed 0" in text and "weights changed" in text
    assert "UNCHANGED" in _format_row(ModeRow("staged", checksum_before="a", checksum_after="a"))
