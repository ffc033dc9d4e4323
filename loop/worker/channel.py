"""The worker's end of the control channel: a ZMQ DEALER owned by one I/O thread.

Why a thread: a long forward/backward holds the main thread for seconds, and the API declares a worker dead when
its heartbeats stop (`settings.worker_timeout_s`). The I/O thread sends `Heartbeat` every `heartbeat_s` whatever
the main thread does (torch releases the GIL in its kernels), answers plain `Ping`s itself, and hands every
other request to the main thread through a queue. The main thread's replies reach the I/O thread through an
inproc PAIR socket, which also wakes its poll at once (no reply waits for a poll tick: Apply runs while vLLM is
paused, every millisecond counts). ZMQ sockets are not thread-safe, so each socket has exactly one user thread.

The DEALER's identity is `w<pid>`: the API (`loop/training/worker.py`) ignores frames from any process but the one it
spawned last. The thread also exits the process when its parent (the API) is gone, so a crashed `loop serve`
leaves no orphan holding vLLM's weights.

No torch here: the unit tests drive this module from a tiny fake worker.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator

import msgspec
import zmq

from loop.worker import protocol as p

log = logging.getLogger("loop.worker")


class Channel:
    def __init__(self, endpoint: str, heartbeat_s: float) -> None:
        self.endpoint = endpoint
        self.heartbeat_s = heartbeat_s
        self.identity = f"w{os.getpid()}".encode()
        # Reported in every heartbeat; the main thread updates them (plain attribute writes are atomic in CPython).
        self.state = "waiting"
        self.run_id: int | None = None
        self.step = 0
        self.load_id = ""
        self._inbox: queue.Queue[p.Msg | None] = queue.Queue()
        self._ctx = zmq.Context.instance()
        self._wake_addr = f"inproc://loop-worker-out-{id(self)}"
        self._out = self._ctx.socket(zmq.PAIR)
        self._out.bind(self._wake_addr)
        self._out_lock = threading.Lock()
        self._stop = threading.Event()
        self._ppid = os.getppid()
        self._thread = threading.Thread(target=self._io, name="loop-worker-io", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def send(self, msg: p.Msg) -> None:
        """Queue a message for the API (thread-safe)."""
        with self._out_lock:
            self._out.send(p.encode(msg))

    def messages(self) -> Iterator[p.Msg]:
        """Requests for the main thread, in arrival order; ends when the channel closes."""
        while True:
            msg = self._inbox.get()
            if msg is None:
                return
            yield msg

    def close(self, linger_s: float = 1.0) -> None:
        self._stop.set()
        self._thread.join(timeout=linger_s + 1)
        self._inbox.put(None)

    # ------------------------------------------------------------ the I/O thread

    def _io(self) -> None:
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, self.identity)
        dealer.setsockopt(zmq.LINGER, 1000)
        dealer.connect(self.endpoint)
        wake = self._ctx.socket(zmq.PAIR)
        wake.connect(self._wake_addr)
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        next_beat = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    if os.getppid() != self._ppid:  # the API is gone: nobody will ever talk to us again
                        log.error("parent process %d is gone; exiting", self._ppid)
                        os._exit(3)
                    dealer.send(p.encode(self._heartbeat()))
                    next_beat = now + self.heartbeat_s
                events = dict(poller.poll(timeout=max(1, int((next_beat - now) * 1000))))
                if wake in events:
                    while True:
                        try:
                            dealer.send(wake.recv(zmq.NOBLOCK))
                        except zmq.Again:
                            break
                if dealer in events:
                    while True:
                        try:
                            data = dealer.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._dispatch(dealer, data)
        finally:
            while True:  # flush replies queued just before close (e.g. Bye)
                try:
                    dealer.send(wake.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
            wake.close(linger=0)
            dealer.close()

    def _heartbeat(self) -> p.Heartbeat:
        return p.Heartbeat(pid=os.getpid(), state=self.state, run_id=self.run_id, step=self.step,
                           load_id=self.load_id)

    def _dispatch(self, dealer: zmq.Socket, data: bytes) -> None:
        try:
            msg = p.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            # Never guess at bytes we cannot decode; say so and go on.
            dealer.send(p.encode(p.Error(message=f"undecodable message: {e}")))
            return
        if isinstance(msg, p.Ping) and not msg.checksum:
            # Answered here so status works while the main thread trains.
            dealer.send(p.encode(p.Status(req=msg.req, pid=os.getpid(), state=self.state, load_id=self.load_id)))
            return
        self._inbox.put(msg)
