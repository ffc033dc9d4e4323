"""Plain helpers shared by tests (free ports, waiting for a URL); import as `from support import ...`."""

from __future__ import annotations

import socket
import time

import httpx


def free_port() -> int:
    """A TCP port nobody listens on right now (bind port 0 and read what the kernel gave)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float, *, ok_statuses: tuple[int, ...] = (200,), proc=None) -> httpx.Response:  # noqa: ANN001
    """Poll GET `url` until its status is in `ok_statuses`; raise TimeoutError with the last answer."""
    deadline = time.monotonic() + timeout
    last: object = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process serving {url} exited with code {proc.returncode}")
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code in ok_statuses:
                return r
            last = f"{r.status_code} {r.text[:500]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s: {last}")
