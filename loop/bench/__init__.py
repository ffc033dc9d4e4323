"""Benchmarks that print figures: `loop bench proxy|ingest|reads|update|durable|memory|learning|direction|serving`
(one module each, registered in loop/cli/bench.py) and `python -m loop.bench.train` (training memory / throughput table)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a child started with start_new_session=True and everything it started: SIGTERM, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def started_api(factory: str, data_dir: Path, probe: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """Run the loop API alone (no vLLM, no worker) under uvicorn from the app factory `factory`
    ("module:function") on a free port; yields (url, pid) once GET `probe` answers 200."""
    import httpx

    from loop.bench.proxy import free_port

    port = free_port()
    child_env = {**os.environ, "LOOP_DATA_DIR": str(data_dir), "LOOP_LOG_LEVEL": "warning",
                 "LOOP_WORKER_ENABLED": "false", **(env or {})}
    child_env.pop("LOOP_DATABASE_URL", None)
    cmd = [sys.executable, "-m", "uvicorn", "--factory", factory, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--no-access-log", "--loop", "uvloop", "--http", "httptools"]
    proc = subprocess.Popen(cmd, env=child_env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the loop API exited with code {proc.returncode} before it was ready")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}{probe}", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the loop API on {url} did not answer within 120 s")
            time.sleep(0.3)
        yield url, proc.pid
    finally:
        stop_group(proc)
