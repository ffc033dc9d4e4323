"""The recompute guard (loop/training/recompute.py): a run's keep-mode write waits until the answers the last one
preempted have decoded again, and until their recompute is at most `keep_recompute_share` of the time since; a
rollback never waits. vLLM's counters come from a stand-in `/metrics`.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import httpx
import pytest

from loop.training.recompute import Counters, RecomputeGuard, read_counters
from tests.unit.training_support import make, stop

METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="m"}} {running}
vllm:num_requests_running{{engine="1",model_name="m"}} 1.0
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{{engine="0",model_name="m"}} {generated}
vllm:generation_tokens_created{{engine="0",model_name="m"}} 1.7e9
"""


def test_counters_are_summed_over_engines_and_other_series_ignored() -> None:
    c = read_counters(METRICS.format(running=3.0, generated=120.0))
    assert (c.running, c.generated) == (4.0, 120.0)
    with pytest.raises(ValueError, match="generation_tokens_total"):
        read_counters("vllm:num_requests_running 2.0\n")


def test_nothing_running_at_a_write_holds_nothing_back() -> None:
    g = RecomputeGuard(0.2)
    g.wrote(10.0, Counters(running=0, generated=50))
    assert not g.recovering and g.wait_s(10.0) == 0
    g.wrote(10.0, None)  # counters unreadable: no hold either
    assert g.wait_s(10.0) == 0


def test_the_next_write_waits_for_the_recovery_then_for_the_share() -> None:
    g = RecomputeGuard(0.2)
    g.wrote(10.0, Counters(running=4, generated=1000))
    assert g.recovering and math.isinf(g.wait_s(10.5))
    g.observe(11.0, Counters(running=4, generated=1003))  # three of the four decoded again: not yet
    assert g.recovering
    g.observe(12.0, Counters(running=4, generated=1004))
    assert not g.recovering and g.last_recompute_s == pytest.approx(2.0)
    # recompute 2 s may be a fifth of the time: 8 s more of decoding before the next write
    assert g.wait_s(12.0) == pytest.approx(8.0) and g.wait_s(20.0) == 0


def test_tokens_decoded_between_the_read_and_the_freeze_are_not_the_recovery() -> None:
    g = RecomputeGuard(0.2)
    g.wrote(10.0, Counters(running=4, generated=1000))  # read before the pause, while vLLM still decoded
    g.resumed(Counters(running=0, generated=1008))  # two more steps of the four answers before the freeze
    g.observe(10.5, Counters(running=4, generated=1008))
    assert g.recovering  # not one preempted answer has decoded again yet
    g.observe(11.0, Counters(running=4, generated=1012))
    assert not g.recovering and g.last_recompute_s == pytest.approx(1.0)
    g.resumed(Counters(running=4, generated=2000))  # after the recovery: nothing to rebase
    assert not g.recovering and g.wait_s(11.0) == pytest.approx(4.0)


def test_a_restarted_vllm_or_a_recovery_never_seen_stops_holding_back() -> None:
    g = RecomputeGuard(0.5, give_up_s=30)
    g.wrote(0.0, Counters(running=2, generated=500))
    g.observe(1.0, Counters(running=0, generated=3))  # counters began again
    assert not g.recovering and g.wait_s(1.0) == pytest.approx(1.0)
    g.wrote(10.0, Counters(running=2, generated=500))
    assert math.isinf(g.wait_s(39.0))
    assert g.wait_s(40.0) == 0 and not g.recovering


def test_share_one_is_no_guard() -> None:
    g = RecomputeGuard(1.0)
    g.wrote(0.0, Counters(running=8, generated=0))
    assert g.wait_s(0.0) == 0
    with pytest.raises(ValueError):
        RecomputeGuard(0)


class _Metrics:
    """A /metrics with 4 answers running whose generated-token counter moves `per_s` tokens a second, except for
    0.4 s after each resume (the preempted answers' recompute)."""

    def __init__(self) -> None:
        self.generated, self.at, self.per_s = 1000.0, time.monotonic(), 100.0

    def _advance(self) -> None:
        now = time.monotonic()
        self.generated += (now - self.at) * self.per_s
        self.at = now

    def text(self) -> str:
        self._advance()
        return METRICS.format(running=3.0, generated=self.generated)

    def resumed(self) -> None:
        self._advance()
        self.per_s = 0.0

        async def decoding_again() -> None:
            await asyncio.sleep(0.4)
            self._advance()
            self.per_s = 100.0

        asyncio.get_running_loop().create_task(decoding_again())


async def test_a_runs_second_keep_write_waits_and_a_rollback_does_not(tmp_path: Path) -> None:
    from loop.training.weights import LiveWeights

    _trainer, state, vllm = await make(tmp_path, keep_recompute_share=0.5)
    metrics = _Metrics()
    resume = vllm.resume

    async def get(path: str, *, timeout: float | None = None) -> httpx.Response:
        assert path == "/metrics"
        vllm.calls.append("metrics")
        return httpx.Response(200, text=metrics.text())

    async def resumed() -> None:
        await resume()
        metrics.resumed()

    async def freeze(**kw: object) -> None:
        metrics.generated += 12  # the steps vLLM decoded between the counters' read and the freeze
        await pause(**kw)

    pause = vllm.pause
    vllm.get = get  # type: ignore[attr-defined]
    vllm.resume = resumed  # type: ignore[method-assign]
    vllm.pause = freeze  # type: ignore[method-assign]
    try:
        live = LiveWeights(state)

        async def work(t: dict[str, float]) -> bool:
            return True

        assert await live.yield_to_serving(atomic=True) < 0.05  # nothing preempted yet
        await live.change(work, atomic=True, yields=True)
        t0 = time.monotonic()
        rollback = await live.change(work, atomic=True)  # a rollback, a restore: never held back
        assert time.monotonic() - t0 < 0.3 and "last_recompute_ms" not in rollback
        waited = await live.yield_to_serving(atomic=True)
        second = await live.change(work, atomic=True, yields=True)
        # the run's write's answers decode again ~0.4 s after it (the rollback's resume froze them once more, so
        # a little later); at a share of 0.5, as long again of decoding before the next write
        assert second["last_recompute_ms"] >= 350, second
        assert waited >= 0.65, waited
        assert await live.yield_to_serving(atomic=False) == 0  # hogwild: nothing is preempted
        assert vllm.calls.count("reset") == 3
        # the run's write reads vLLM's counters before its pause: a read inside it would lengthen the pause
        paused = [i for i, c in enumerate(vllm.calls) if c.startswith("pause")]
        resumed_at = [i for i, c in enumerate(vllm.calls) if c.startswith("resume")]
        assert paused and len(paused) == len(resumed_at), vllm.calls
        # (the rollback's pause may see the first write's recovery watch read: a task beside it, not in its path)
        runs = [(paused[0], resumed_at[0]), (paused[-1], resumed_at[-1])]
        assert all("metrics" not in vllm.calls[p:r] for p, r in runs), vllm.calls
        assert vllm.calls[paused[-1] - 1] == "metrics", vllm.calls
        await live.close()
    finally:
        await stop(state)


async def test_the_reset_runs_beside_the_write_and_both_end_before_the_resume(tmp_path: Path) -> None:
    from loop.training.weights import LiveWeights

    _trainer, state, vllm = await make(tmp_path)
    try:
        live = LiveWeights(state)

        async def work(t: dict[str, float]) -> bool:  # still writing when the reset arrives
            for _ in range(500):
                if "reset" in vllm.calls:
                    break
                await asyncio.sleep(0.01)
            vllm.calls.append("write")
            return True

        t = await live.change(work, atomic=True)
        assert vllm.calls[:3] == ["pause:keep", "reset", "write"] and vllm.calls[3].startswith("resume"), vllm.calls
        assert len(vllm.calls) == 4 and "reset_ms" in t
        await live.close()
    finally:
        await stop(state)
