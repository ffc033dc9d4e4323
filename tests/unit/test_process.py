"""The supervisor's life cycle with a stand-in "vLLM" (a tiny real HTTP server process): ready callbacks,
restart after a crash, giving up after the limit, killing the whole process group, and the child's env."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from loop.config import Settings
from loop.vllm.process import VLLMSupervisor, last_meaningful_line, tail
from support import free_port

FAKE = """
import http.server, sys, time
port, delay, mode = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
print("fake vllm loading", flush=True)
time.sleep(delay)
if mode == "crash":
    print("RuntimeError: CUDA out of memory (fake)", flush=True)
    sys.exit(3)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


class FakeSupervisor(VLLMSupervisor):
    mode = "serve"

    def command(self) -> list[str]:
        script = self.settings.data_dir / "fake_vllm.py"
        script.write_text(FAKE)
        return [sys.executable, str(script), str(self.settings.vllm_port), "0.3", self.mode]


def make(tmp_path: Path, **kw) -> FakeSupervisor:  # noqa: ANN003
    settings = Settings(data_dir=tmp_path, vllm_port=free_port(), vllm_start_timeout_s=30, **kw)
    settings.ensure_dirs()
    sup = FakeSupervisor(settings)
    sup.model_path, sup.device = "fake-model", "cpu"
    return sup


async def test_start_ready_callback_crash_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("loop.vllm.process.MAX_BACKOFF_S", 0.1)
    sup = make(tmp_path, vllm_restart_limit=2)
    calls: list[str] = []

    async def on_ready() -> None:
        calls.append(sup.state)

    sup.add_ready_callback(on_ready)
    await sup.start()
    assert sup.state == "starting" and "starting" in sup.describe()
    await sup.wait_ready(20)
    assert calls == ["ready"] and sup.pid is not None and sup.pid_path.read_text().strip() == str(sup.pid)
    first = sup.pid
    os.killpg(first, signal.SIGKILL)
    for _ in range(100):
        if sup.state == "restarting":
            break
        await asyncio.sleep(0.05)
    assert sup.state == "restarting" and "crashed" in sup.describe() and "attempt 1/2" in sup.describe()
    await sup.wait_ready(20)
    assert sup.restarts == 1 and sup.pid != first and calls == ["ready", "ready"]
    pid = sup.pid
    await sup.stop()
    assert sup.state == "stopped" and not sup.pid_path.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole group is gone


async def test_gives_up_after_the_restart_limit_with_the_log_reason(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("loop.vllm.process.MAX_BACKOFF_S", 0.1)
    sup = make(tmp_path, vllm_restart_limit=1)
    sup.mode = "crash"
    await sup.start()
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        await sup.wait_ready(20)
    assert sup.state == "failed" and sup.restarts == 1
    assert "fake vllm loading" in tail(sup.log_path)
    await sup.stop()


def test_command_and_child_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    settings = Settings(data_dir=tmp_path, vllm_port=9123, cpu_kv_cache_gib=1.5, vllm_args=["--seed", "1"],
                        served_model_name="smol")
    sup = VLLMSupervisor(settings)
    sup.model_path, sup.device = "/m", "cpu"
    cmd = sup.command()
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--model") + 1] == "/m" and cmd[cmd.index("--served-model-name") + 1] == "smol"
    assert cmd[cmd.index("--port") + 1] == "9123" and "--enforce-eager" in cmd and cmd[-2:] == ["--seed", "1"]
    assert "--gpu-memory-utilization" not in cmd
    env = sup.child_env()
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "1.5"
    assert env["LOOP_RUNTIME_DIR"] == str(settings.runtime_dir) and "PYTORCH_CUDA_ALLOC_CONF" not in env
    sup.device = "cuda"
    assert "--enforce-eager" not in sup.command() and "--gpu-memory-utilization" in sup.command()
    assert "VLLM_CPU_KVCACHE_SPACE" not in sup.child_env() or os.environ.get("VLLM_CPU_KVCACHE_SPACE")


def test_last_meaningful_line_prefers_errors() -> None:
    assert last_meaningful_line("a\nValueError: bad\nshutting down\n") == "ValueError: bad"
    assert last_meaningful_line("a\nb\n") == "b" and last_meaningful_line("") == "no output"
