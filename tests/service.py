"""The real service for end-to-end and browser tests: ONE `loop serve` with ONE real vLLM per pytest session.

tests/conftest.py imports these fixtures, so tests/e2e and tests/browser share the one service.

`loop_service` starts `python -m loop.cli serve` on a free port with a temporary data dir, the default model
(SmolLM2-135M-Instruct) and a 1 GiB KV cache (vLLM on its private Unix socket: `Service.vllm_address`, reach it
with `Service.vllm()`), waits until /health says ready, and tears the whole thing down
(process groups: loop's, then vLLM's, found through its pid file) at the end of the session. Every e2e test in
the repo uses it; `loop_factory` starts extra, vLLM-less `loop serve` instances (e.g. pointed at a closed port
or with a tiny timeout) that attach with --vllm-url (`--vllm-url`, `service.vllm_address` shares the session's
vLLM).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from tests.support import free_port, vllm_client, wait_for

START_TIMEOUT_S = float(os.environ.get("LOOP_TEST_START_TIMEOUT_S", "300"))


@dataclass
class Service:
    url: str
    admin_token: str
    data_dir: Path
    db_url: str
    model: str
    vllm_address: str  # /health's vllm.address: unix:/…/run/vllm.sock for the managed vLLM
    log_path: Path  # loop serve's own output (vLLM's is data_dir/logs/vllm.log)
    proc: subprocess.Popen = field(repr=False)

    @property
    def vllm_log_path(self) -> Path:
        return self.data_dir / "logs" / "vllm.log"

    def vllm(self, timeout: float = 300.0) -> httpx.Client:
        """A client for vLLM itself (over its Unix socket), bypassing loop."""
        return vllm_client(self.vllm_address, timeout=timeout)

    @property
    def vllm_pid_path(self) -> Path:
        return self.data_dir / "run" / "vllm.pid"

    def log_tail(self, n: int = 40) -> str:
        out = []
        for p in (self.log_path, self.vllm_log_path):
            if p.exists():
                out.append(f"--- {p} ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(out)


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _stop(proc: subprocess.Popen, vllm_pid_path: Path | None) -> None:
    _kill_group(proc.pid, signal.SIGTERM)  # loop serve stops vLLM itself on SIGTERM
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    if vllm_pid_path is not None and vllm_pid_path.exists():  # loop died hard: vLLM's group is left over
        with contextlib.suppress(ValueError, OSError):
            _kill_group(int(vllm_pid_path.read_text().strip()), signal.SIGKILL)


def start_loop(data_dir: Path, *args: str, env: dict[str, str] | None = None,
               timeout: float = START_TIMEOUT_S, wait: bool = True) -> Service:
    """Start `loop serve` with `args`; wait until /health answers 200 (or any answer, if wait=False)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = data_dir / "serve.log"
    cmd = [sys.executable, "-m", "loop.cli", "serve", "--port", str(port), "--data-dir", str(data_dir), *args]
    # fp32 unless a test asks otherwise: a CPU without native bf16 (AVX2 only) trains bf16 about 25x slower, and the
    # suite's time must not depend on which CPU the CI host has (the bf16 paths have tests of their own)
    child_env = {**os.environ, "LOOP_CPU_KV_CACHE_GIB": "1", "LOOP_LOG_LEVEL": "info", "LOOP_DTYPE": "float32",
                 **(env or {})}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_for(f"{url}/health", timeout, ok_statuses=(200,) if wait else (200, 503), proc=proc).json()
    except BaseException as exc:
        _stop(proc, data_dir / "run" / "vllm.pid")
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        vlog = data_dir / "logs" / "vllm.log"
        if vlog.exists():
            tail += "\n--- vllm.log ---\n" + "\n".join(vlog.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"loop serve did not become healthy: {exc}\n{tail}") from exc
    token = (data_dir / "admin_token").read_text().strip()
    # the admin token: accepted where the loop requires tokens, ignored by /v1 where it does not
    models = openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0).models.list() if wait else None
    model = models.data[0].id if models else ""
    return Service(url=url, admin_token=token, data_dir=data_dir, db_url=f"sqlite:///{data_dir / 'loop.db'}",
                   model=model, vllm_address=health["vllm"]["address"], log_path=log_path, proc=proc)


@pytest.fixture(scope="session")
def loop_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    data_dir = tmp_path_factory.mktemp("loop-e2e")
    # The scheduler never trains on its own here (other tests' feedback stays theirs); tests/e2e/test_loop_e2e.py
    # lowers the thresholds at runtime through POST /api/scheduler/config and puts them back.
    never = {"LOOP_SCHEDULER_MIN_PAIRS": "1000000", "LOOP_SCHEDULER_INTERVAL_S": "1e9", "LOOP_SCHEDULER_MAX_WAIT_S": "1e9"}
    service = start_loop(data_dir, env=never)
    try:
        yield service
    finally:
        _stop(service.proc, service.vllm_pid_path)


@pytest.fixture
def loop_factory(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Start extra `loop serve` instances (no vLLM of their own: pass --vllm-url); stopped after the test."""
    started: list[Service] = []

    def make(*args: str, env: dict[str, str] | None = None, wait: bool = True) -> Service:
        service = start_loop(tmp_path / f"extra{len(started)}", *args, env=env, timeout=120, wait=wait)
        started.append(service)
        return service

    yield make
    for service in started:
        _stop(service.proc, None)


@pytest.fixture
def openai_client(loop_service: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{loop_service.url}/v1", api_key="not-needed", max_retries=0, timeout=300)
