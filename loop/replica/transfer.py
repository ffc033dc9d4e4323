"""Moving weights between hosts: a two-process torch.distributed group per transfer, the trainer's worker sending.

What: a remote replica's agent (loop/replica/agent.py) hosts a `TCPStore` on its transfer port. For each transfer
the worker picks a random nonce, asks the agent over its authenticated HTTP API to receive (kind, names), and
both join a group of two under that nonce (`open_group`: rank 0 the worker, rank 1 the agent); the worker then
broadcasts each tensor in the agreed order, to every agent of the transfer at once, one group each
(`send_to_all`); the agent receives each into its buffer (`receive`). The group is torn down after the transfer:
a replica that dies mid-transfer breaks only its own part of it.

Why torch.distributed: it is the transport made for tensors between hosts (gloo over TCP for host memory; NCCL,
with GPUDirect where the fabric has it, between CUDA devices on different hosts), and it is what vLLM's own
weight-sync for RL uses. gloo also carries CUDA tensors (through host memory), so two processes on one card can
still use it; NCCL refuses two ranks on one device. `backend_for(device)` picks.
Bytes, not dtypes: every tensor is sent as its raw bytes (a uint8 view), so any dtype travels unchanged.

Security: torch.distributed has no authentication. The store and gloo's pairs listen on the transfer address, which
must be a private network (as for any NCCL/gloo training cluster); the nonce is sent only over the agent's HTTP API
with its token. `loop serve`'s replica checksums (GET /api/train/status?checksum=true) compare what each replica
holds. Tests: tests/unit/replica/test_agent.py (a real gloo group over loopback).
"""

from __future__ import annotations

import datetime
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

DEFAULT_TIMEOUT_S = 600.0  # one operation of a transfer (a tensor's bytes)
JOIN_S = 60.0  # how long one side waits for the other to join


def backend_for(device: str) -> str:
    """"nccl" between CUDA devices, else "gloo"; `LOOP_REPLICA_BACKEND=gloo` forces gloo (one card, or no NCCL)."""
    import os

    forced = os.environ.get("LOOP_REPLICA_BACKEND")
    if forced:
        if forced not in ("gloo", "nccl"):
            raise ValueError(f"LOOP_REPLICA_BACKEND must be gloo or nccl, got {forced!r}")
        return forced
    return "nccl" if device.startswith("cuda") else "gloo"


def serve_store(host: str, port: int) -> Any:
    """The agent's store server: one for its whole life, each transfer under its own nonce prefix."""
    import torch.distributed as dist

    return dist.TCPStore(host, port, None, True, datetime.timedelta(seconds=DEFAULT_TIMEOUT_S),
                         wait_for_workers=False)


def local_address_towards(host: str, port: int) -> str:
    """The address of this host that `host:port` would see us from (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((socket.gethostbyname(host), port))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def open_group(store_host: str, store_port: int, nonce: str, rank: int, *, bind: str, backend: str = "gloo",
               timeout_s: float = DEFAULT_TIMEOUT_S, store: Any = None, join_s: float = JOIN_S) -> Any:
    """Join the two-rank group of transfer `nonce`; `bind`: this side's address the other can reach. `store`: the
    agent passes its own server; the worker connects to the agent's. TimeoutError when the other side has not
    come within `join_s`: each side says it is here and the group is built only once both are (torch aborts
    the whole process when a group's rendezvous times out)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(store_host, store_port, None, False, datetime.timedelta(seconds=join_s))
    prefixed = dist.PrefixStore(f"loop-transfer/{nonce}/", store)
    prefixed.set(f"here-{rank}", "1")
    deadline = time.monotonic() + join_s
    while not prefixed.check([f"here-{1 - rank}"]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other side of transfer {nonce[:8]}… did not join within {join_s:.0f} s")
        time.sleep(0.02)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, 2, opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=bind)]
    # gloo's connect can outlive every timeout it was given (a peer that accepted and then stopped reading:
    # pytorch/gloo#520): the caller gets a TimeoutError instead of a transfer that never ends
    return within(lambda: dist.ProcessGroupGloo(prefixed, rank, 2, opts), join_s + timeout_s,
                  f"connecting transfer {nonce[:8]}…")


def within(fn: Callable[[], Any], limit_s: float, what: str) -> Any:
    """`fn()`, run on a thread of its own and waited for `limit_s`; TimeoutError after that. A call that never
    returns (stuck in native code, which nothing can interrupt) is left behind on its daemon thread: what it
    holds is lost, the caller goes on."""
    done = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, name=f"loop-transfer-{what[:24]}", daemon=True).start()
    if not done.wait(limit_s):
        raise TimeoutError(f"{what} did not end within {limit_s:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)  # contiguous: the same memory, seen as bytes


def _start_broadcast(group: Any, t: torch.Tensor) -> Any:
    """Rank 0's bytes of `t` into rank 1's; returns the pending work."""
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    return group.broadcast([_bytes(t)], opts)


def _broadcast(group: Any, t: torch.Tensor) -> None:
    _start_broadcast(group, t).wait()


def send_to_all(groups: list[Any], tensors: Iterable[torch.Tensor]) -> tuple[int, dict[int, BaseException]]:
    """Rank 0 of every group: each tensor's bytes to every group's rank 1, in order. `tensors` is read once and
    each tensor goes to all groups at once (one asynchronous broadcast per group, then all waited on), so K
    receivers cost about one receiver's time, and a tensor made for the transfer is made once. A group whose
    broadcast fails gets nothing more; the others go on. Returns the bytes of the stream (per group) and the
    failed groups (index -> error)."""
    n, failed = 0, {}
    for t in tensors:
        src = t if t.is_contiguous() else t.contiguous()
        if src.numel():
            works = []
            for i, group in enumerate(groups):
                if i in failed:
                    continue
                try:
                    works.append((i, _start_broadcast(group, src)))
                except Exception as e:  # noqa: BLE001 - this group is broken; the others are not
                    failed[i] = e
            for i, work in works:
                try:
                    work.wait()
                except Exception as e:  # noqa: BLE001
                    failed[i] = e
            if src.is_cuda:
                # NCCL's wait only orders the streams: without this the sender would run ahead, and every tensor
                # made for the transfer would stay allocated until the whole stream is sent
                torch.cuda.synchronize(src.device)
        n += src.numel() * src.element_size()
        if len(failed) == len(groups):
            break
    return n, failed


def receive(group: Any, buffers: list[torch.Tensor]) -> int:
    """Rank 1: each buffer filled from rank 0, in order (a non-contiguous one through a contiguous copy); waits
    until every CUDA buffer is written. Returns the bytes received."""
    n = 0
    for buf in buffers:
        if not buf.numel():
            continue
        if buf.is_contiguous():
            _broadcast(group, buf)
        else:
            tmp = buf.contiguous()
            _broadcast(group, tmp)
            buf.copy_(tmp)
        n += buf.numel() * buf.element_size()
    for dev in {b.device for b in buffers if b.is_cuda}:
        torch.cuda.synchronize(dev)
    return n


def close(group: Any, limit_s: float = 10.0) -> None:
    """Tear a transfer's group down (its sockets); errors are ignored, the group is done either way (a teardown
    that hangs is left behind after `limit_s`)."""
    try:
        within(group.shutdown, limit_s, "closing a transfer")
    except Exception:  # noqa: BLE001 - older torch has no shutdown; gloo closes with the object
        pass
