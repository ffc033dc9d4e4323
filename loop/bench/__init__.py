"""Benchmarks that print figures: `loop bench proxy|ingest|reads|update|durable|memory|learning|direction` (one
module each, registered in loop/cli/bench.py) and `python -m loop.bench.train` (training memory / throughput table)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


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
