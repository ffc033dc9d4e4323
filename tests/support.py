"""Plain helpers shared by tests (free ports, waiting for a URL, a client for vLLM's socket, a fake vLLM);
import as `from support import ...`."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx

from loop.vllm.client import sync_client


def free_port() -> int:
    """A TCP port nobody listens on right now (bind port 0 and read what the kernel gave)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


T = TypeVar("T")


class Ahead(Generic[T]):
    """Starts what the next test will need while this one runs. A vLLM start on the CPU is ~100 s, nearly all of it
    one core importing vLLM in three processes in turn; on CI's two cores the next test's start rides beside this
    test's checks instead of after them. `order`: the keys in the order tests will `take` them (the selected tests,
    so a `-k` run starts nothing it will not use). `launch(key)` runs in the caller's thread and returns what runs in
    the background: work that is not thread-safe (building a model with transformers, which patches torch globally
    while it loads one) belongs before the return. `close` stops whatever no test took (a test that failed first)."""

    def __init__(self, order: Sequence[Hashable], launch: Callable[[Any], Callable[[], T]],
                 stop: Callable[[T], None]) -> None:
        self._order, self._launch, self._stop = list(order), launch, stop
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ahead")
        self._started: dict[Hashable, Future[T]] = {}

    def _start(self, key: Hashable) -> None:
        if key in self._started:
            return
        try:
            start = self._launch(key)
        except Exception as exc:  # noqa: BLE001 - the test that takes `key` reports it, not the one running now
            failed: Future[T] = Future()
            failed.set_exception(exc)
            self._started[key] = failed
            return
        self._started[key] = self._pool.submit(start)

    def take(self, key: Hashable) -> T:
        """`key`'s launch (started now if it was not yet), after starting the one that follows it in `order`."""
        self._start(key)
        if key in self._order and (i := self._order.index(key)) + 1 < len(self._order):
            self._start(self._order[i + 1])
        return self._started.pop(key).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for future in self._started.values():
            if not future.cancelled() and future.exception() is None:
                self._stop(future.result())
        self._started.clear()


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


def vllm_client(address: str, timeout: float = 300.0) -> httpx.Client:
    """A client for vLLM itself, bypassing loop: `address` is /health's `vllm.address` (`unix:/…/vllm.sock` for
    the managed vLLM, which has no TCP port), e.g. `vllm_client(service.vllm_address).post("/v1/completions")`."""
    return sync_client(address, timeout=timeout)


# argv: socket path, start delay, mode (serve | crash). While serving, GET /health answers 503 when the file
# "<socket>.sick" exists (an engine core that died under a living API process), GET /is_paused reports whether
# "<socket>.paused" exists.
FAKE_VLLM = """
import http.server, os, socketserver, sys, time
path, delay, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
print("fake vllm loading", flush=True)
if os.environ.get("FAKE_VLLM_SHM"):  # a segment mapped for life and never unlinked, as vLLM's engine queues
    import mmap
    fd = os.open(f"/dev/shm/{os.environ['FAKE_VLLM_SHM']}-{os.getpid()}", os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 4096)
    segment = mmap.mmap(fd, 4096)
time.sleep(delay)
if mode == "crash":
    print("RuntimeError: CUDA out of memory (fake)", flush=True)
    sys.exit(3)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/is_paused":
            body = b'{"is_paused": %s}' % (b"true" if os.path.exists(path + ".paused") else b"false")
            self.send_response(200)
        elif os.path.exists(path + ".sick"):
            body = b'{"error": {"message": "EngineCore died (fake)"}}'
            self.send_response(503)
        else:
            body = b"{}"
            self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def address_string(self): return "unix"
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
S(path, H).serve_forever()
"""


def wait_for_socket(path: Path, timeout: float) -> None:
    """Wait until a server accepts connections on the Unix socket `path`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def fake_vllm_command(folder: Path, socket_path: Path, *, delay: float = 0.0, mode: str = "serve") -> list[str]:
    """The command of a stand-in vLLM on the Unix socket `socket_path` (its script is written into `folder`)."""
    script = folder / "fake_vllm.py"
    script.write_text(FAKE_VLLM)
    return [sys.executable, str(script), str(socket_path), str(delay), mode]


class ServedApp:
    """An ASGI app served by uvicorn on a free local port in a thread (real HTTP for route and CLI tests)."""

    def __init__(self, app: Any) -> None:
        import threading

        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServedApp":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)

