"""WorkerControl against a real subprocess over real ZMQ (the fake worker in fake_worker.py does no maths).

Specifies: calls get their own replies; an Error reply, a timeout and a dead worker each raise their own error;
heartbeat loss (SIGSTOP) and a crash (SIGKILL) are detected within seconds and the worker is restarted; in-flight
calls fail at once; the socket is private; restarts are bounded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

from loop.config import Settings
from loop.training.worker import WorkerControl, WorkerFailed, WorkerTimeout, WorkerUnavailable
from loop.worker import protocol as p

FAKE = str(Path(__file__).resolve().parents[1] / "fake_worker.py")


def make_control(tmp_path: Path, **kw) -> WorkerControl:  # noqa: ANN003
    settings = Settings(data_dir=tmp_path, worker_heartbeat_s=0.2, worker_timeout_s=1.5)
    settings.ensure_dirs()
    endpoint = f"ipc://{settings.runtime_dir / 'worker.sock'}"
    return WorkerControl(settings, command=[sys.executable, FAKE, endpoint, "0.2"], **kw)


async def wait_for(pred, timeout: float) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_calls_round_trip_and_socket_is_private(tmp_path: Path) -> None:
    ctl = make_control(tmp_path)
    await ctl.start()
    try:
        hello = await ctl.wait_ready(30)
        assert hello.load_id == "fake-load" and ctl.state == "idle"
        assert stat.S_IMODE(ctl.socket_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(ctl.socket_path.parent.stat().st_mode) == 0o700
        progress: list[p.Progress] = []
        ctl.on_progress.append(progress.append)
        done = await ctl.call(p.Train(run_id=7, pairs=[p.Pair(prompt="q", chosen="a", rejected="b")]), timeout=10)
        assert isinstance(done, p.TrainDone) and done.run_id == 7 and done.update.ok
        applied = await ctl.call(p.Apply(run_id=7), timeout=10)
        assert isinstance(applied, p.Applied) and applied.checksum == "v1"
        assert [pr.run_id for pr in progress] == [7]
        # concurrent calls each get their own reply
        a, b = await asyncio.gather(ctl.call(p.Ping(checksum=True), 10), ctl.call(p.Ping(), 10))
        assert isinstance(a, p.Status) and a.checksum == "v1" and isinstance(b, p.Status)
        with pytest.raises(WorkerFailed, match="cannot do Restore"):
            await ctl.call(p.Restore(path="fail"), timeout=10)
        d = ctl.describe()
        assert d["pid"] == ctl.pid and d["restarts"] == 0 and d["last_heartbeat_age_s"] < 1.5
    finally:
        await ctl.stop()
    assert not ctl.socket_path.exists()
    assert ctl.state == "stopped"


async def test_call_timeout_raises_and_the_worker_stays_usable(tmp_path: Path) -> None:
    ctl = make_control(tmp_path)
    await ctl.start()
    try:
        await ctl.wait_ready(30)
        t0 = time.monotonic()
        with pytest.raises(WorkerTimeout, match="did not answer Checkpoint within 0.5 s"):
            await ctl.call(p.Checkpoint(path="sleep:2"), timeout=0.5)
        assert time.monotonic() - t0 < 1.5
        # heartbeats kept coming from the I/O thread while the main thread slept: not declared dead
        await asyncio.sleep(2.0)
        assert ctl.state == "idle" and ctl.restarts == 0
        assert isinstance(await ctl.call(p.Ping(), 5), p.Status)
    finally:
        await ctl.stop()


async def test_hung_worker_detected_by_heartbeat_loss_and_restarted(tmp_path: Path) -> None:
    ctl = make_control(tmp_path)
    await ctl.start()
    try:
        await ctl.wait_ready(30)
        old = ctl.pid
        assert old is not None
        call = asyncio.create_task(ctl.call(p.Checkpoint(path="x"), timeout=60))
        await asyncio.sleep(0)
        os.kill(old, signal.SIGSTOP)  # hung: alive, silent
        t0 = time.monotonic()
        with pytest.raises(WorkerUnavailable, match="no heartbeat"):
            await call  # fails when the worker is declared dead, long before its 60 s timeout
        assert time.monotonic() - t0 < 5
        assert "no heartbeat" in (ctl.describe()["last_error"] or "")
        await wait_for(lambda: ctl.pid != old and ctl.state == "idle", 30)
        assert ctl.restarts == 1
        assert isinstance(await ctl.call(p.Ping(), 5), p.Status)
        with pytest.raises(ProcessLookupError):
            os.kill(old, 0)  # the hung one was killed, not left behind
    finally:
        await ctl.stop()


async def test_crashed_worker_detected_and_restarted(tmp_path: Path) -> None:
    ctl = make_control(tmp_path)
    await ctl.start()
    try:
        await ctl.wait_ready(30)
        old = ctl.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        await wait_for(lambda: ctl.state == "dead", 5)  # the restart waits a 0.5 s backoff: "dead" is seen
        with pytest.raises(WorkerUnavailable, match="dead: the worker exited"):
            await ctl.call(p.Ping(), 5)
        assert "exited with code -9" in (ctl.last_error or "")
        await wait_for(lambda: ctl.pid != old and ctl.state == "idle", 30)
        assert ctl.restarts == 1
        assert isinstance(await ctl.call(p.Ping(), 5), p.Status)
    finally:
        await ctl.stop()


async def test_restarts_are_bounded(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, worker_heartbeat_s=0.2, worker_timeout_s=1.0)
    settings.ensure_dirs()
    ctl = WorkerControl(settings, command=[sys.executable, "-c", "import sys; sys.exit(5)"], max_restarts=2)
    await ctl.start()
    try:
        await wait_for(lambda: ctl.state == "failed", 30)
        assert ctl.restarts == 2
        assert "exited with code 5" in (ctl.last_error or "") and "gave up after 2 restarts" in (ctl.last_error or "")
        with pytest.raises(WorkerUnavailable, match="failed"):
            await ctl.call(p.Ping(), 5)
    finally:
        await ctl.stop()


async def test_silent_but_busy_is_not_hung_silent_and_idle_or_stopped_is(tmp_path: Path) -> None:
    import subprocess

    settings = Settings(data_dir=tmp_path, worker_heartbeat_s=0.2, worker_timeout_s=1.0)
    ctl = WorkerControl(settings, command=["true"])
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(2.0)  # both past their start-up (which uses CPU)
        seen = {}
        for proc in (busy, idle):
            ctl.pid = proc.pid
            seen[proc.pid] = ctl._cpu()[1]  # type: ignore[index]  # as if a heartbeat arrived now
        time.sleep(2.0)
        for proc, expect in ((busy, None), (idle, "no CPU")):
            ctl.pid, ctl._cpu_at_seen = proc.pid, seen[proc.pid]
            why = ctl._hung(2.0)
            assert (why is None) if expect is None else (expect in (why or "")), (proc.args, why)
        ctl.pid = busy.pid
        assert "still silent while busy" in (ctl._hung(61.0) or "")
        os.kill(busy.pid, signal.SIGSTOP)
        time.sleep(0.2)
        assert "stopped" in (ctl._hung(1.2) or "")
    finally:
        for proc in (busy, idle):
            proc.kill()
            proc.wait()


async def test_a_worker_that_refuses_the_model_is_not_restarted_and_says_why(tmp_path: Path) -> None:
    from loop.worker.config import EXIT_REFUSED, REFUSED_PREFIX

    settings = Settings(data_dir=tmp_path, worker_heartbeat_s=0.2, worker_timeout_s=1.0)
    settings.ensure_dirs()
    why = "1 of 20 weights of Llama4ForCausalLM are not views of vLLM's weights: q_proj.weight: scattered"
    told: list[str] = []
    # an earlier run's refusal and a long log since: the reason is this run's, read from the log's tail
    (settings.log_dir / "worker.log").write_text(f"{REFUSED_PREFIX}an older model\n" + ("x" * 99 + "\n") * 2000)
    script = f"import sys; print({'worker ERROR ' + REFUSED_PREFIX + why!r}, file=sys.stderr); sys.exit({EXIT_REFUSED})"
    ctl = WorkerControl(settings, command=[sys.executable, "-c", script], max_restarts=2, on_refused=told.append)
    await ctl.start()
    try:
        await wait_for(lambda: ctl.state == "refused", 30)
        await asyncio.sleep(1.5)  # a restart would have come by now (backoff 0.5 s)
        assert ctl.state == "refused" and ctl.restarts == 0
        assert told == [REFUSED_PREFIX + why] and ctl.last_error == REFUSED_PREFIX + why
        with pytest.raises(WorkerUnavailable, match="refused: loop cannot train this model in place: 1 of 20"):
            await ctl.call(p.Ping(), 5)
    finally:
        await ctl.stop()
