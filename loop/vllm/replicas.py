"""One client over K identical vLLM replicas (same model, same weights, kept on one version by loop's worker).

Why: one vLLM per GPU serves more than one vLLM over several, and loop's callers (the proxy, the trainer's pause
around a weight change, health, the guard) should not learn about replicas. `ReplicaClient` offers the interface
of `VLLMClient` that they use, so `state.vllm` can be either.

- Serving calls (`post`, `stream`, `get`, `models`) go to one *routable* replica: the one with the fewest requests
  in flight through this client (a stream counts until its context exits), ties taken round-robin so that idle
  replicas share the load. A replica that cannot be connected to is marked down and the call goes once more to
  another: nothing was sent, so nothing runs twice. A stream that has begun is never retried.
- Control calls (`pause`, `resume`, `reset_prefix_cache`) fan out to every routable replica at once (and to one
  marked `written`: out of routing, but its weights are the ones a write changes in place), and each one is
  finished even when another fails; the first error is raised after. A pause is all or nothing: when one
  replica cannot be paused, the others are resumed before the error is raised — except for the replicas the
  caller names spare (a write's mirrors): one of those that fails or hangs leaves routing and the rest stays
  paused. Replicas not routable serve nothing, so they are left alone.
- Every replica starts not routable: loop marks one routable (`mark`) once its weights are on the served
  version, and takes it out of routing when it falls behind or goes away. `client(k)` is the one replica's own
  `VLLMClient`, for calls that must reach that one.

Tests: tests/unit/vllm/test_replicas.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx

from loop.vllm.client import FREEZE_TIMEOUT_S, UpstreamResponse, VLLMClient, VLLMUnreachable

T = TypeVar("T")

SPARE_GRACE_S = 2.0  # a spare replica's keep or abort pause, counted from when the others have all paused

NOT_SYNCED = "not marked routable yet (its weights are not known to be on the served version)"


def _not_connected(exc: VLLMUnreachable) -> bool:
    """True when no connection was made, so vLLM saw none of the request; a connection closed mid-answer may
    have run it."""
    return isinstance(exc.__cause__, httpx.ConnectError)


class ReplicaClient:
    """K `VLLMClient`s behind the interface of one."""

    def __init__(self, clients: Sequence[VLLMClient]) -> None:
        if not clients:
            raise ValueError("a ReplicaClient needs at least one vLLM client")
        self._clients = list(clients)
        n = len(self._clients)
        self._routable = [False] * n
        self._written = [False] * n  # out of routing, yet paused, resumed and reset around every write
        self._why: list[str | None] = [NOT_SYNCED] * n
        self._in_flight = [0] * n
        self._served = [0] * n
        self._next = 0  # where the round-robin among equally busy replicas starts
        self._pending: set[asyncio.Task[Any]] = set()  # calls sent and not waited for (see `_later`)

    @classmethod
    def open(cls, addresses: Sequence[str], timeout: float, *, api_key: str | None = None) -> ReplicaClient:
        return cls([VLLMClient(a, timeout, api_key=api_key) for a in addresses])

    def __len__(self) -> int:
        return len(self._clients)

    def client(self, k: int) -> VLLMClient:
        """Replica k's own client, for a call that must reach that replica."""
        return self._clients[k]

    # Where replica 0 is, for status pages and tools that name one address.
    @property
    def address(self) -> str:
        return self._clients[0].address

    @property
    def socket_path(self) -> str | None:
        return self._clients[0].socket_path

    @property
    def base_url(self) -> str:
        return self._clients[0].base_url

    @property
    def timeout(self) -> float:
        return self._clients[0].timeout

    # --- routing state ---
    def mark(self, k: int, ok: bool, why: str | None = None, *, written: bool = False) -> None:
        """Route to replica k (`ok`) or not; `why` says why not (shown by `describe` and in errors). `written`: out
        of routing but still paused (all or nothing, like a routable one), resumed and reset around every write,
        for the replica a write changes in place whether or not it serves (replica 0)."""
        if not 0 <= k < len(self._clients):
            raise IndexError(f"no replica {k}: there are {len(self._clients)} (0 to {len(self._clients) - 1})")
        self._routable[k] = ok
        self._written[k] = written and not ok
        self._why[k] = why if why is not None or ok else "marked not routable"

    def describe(self) -> list[dict[str, Any]]:
        return [{"index": k, "address": c.address, "routable": self._routable[k],
                 "paused_for_writes": self._routable[k] or self._written[k], "why": self._why[k],
                 "in_flight": self._in_flight[k], "served": self._served[k]} for k, c in enumerate(self._clients)]

    def _states(self) -> str:
        return "; ".join(f"replica {k} ({c.address}): {'routable' if self._routable[k] else self._why[k]}"
                         for k, c in enumerate(self._clients))

    def _routable_indices(self) -> list[int]:
        return [k for k in range(len(self._clients)) if self._routable[k]]

    def _written_indices(self) -> list[int]:
        """What a write pauses, resumes and resets: the routable replicas and those marked `written`."""
        return [k for k in range(len(self._clients)) if self._routable[k] or self._written[k]]

    def _pick(self) -> int:
        candidates = self._routable_indices()
        if not candidates:
            raise VLLMUnreachable(f"no vLLM replica is routable: {self._states()}")
        least = min(self._in_flight[k] for k in candidates)
        n = len(self._clients)
        k = min((k for k in candidates if self._in_flight[k] == least), key=lambda k: (k - self._next) % n)
        self._next = (k + 1) % n
        return k

    def _down(self, k: int, exc: VLLMUnreachable) -> None:
        self.mark(k, False, f"down: {exc}")

    # --- serving (the proxy, the guard) ---
    async def _routed(self, call: Callable[[VLLMClient], Awaitable[T]]) -> T:
        try:
            return await self._on_one(call)
        except VLLMUnreachable as exc:
            if not _not_connected(exc):
                raise
        return await self._on_one(call)  # once more, on another replica: the first never saw the request

    async def _on_one(self, call: Callable[[VLLMClient], Awaitable[T]]) -> T:
        k = self._pick()
        self._in_flight[k] += 1
        try:
            result = await call(self._clients[k])
        except VLLMUnreachable as exc:
            if _not_connected(exc):
                self._down(k, exc)
            raise
        finally:
            self._in_flight[k] -= 1
        self._served[k] += 1
        return result

    async def post(self, path: str, content: bytes, *, timeout: float | None = None) -> UpstreamResponse:
        return await self._routed(lambda c: c.post(path, content, timeout=timeout))

    async def get(self, path: str, *, timeout: float | None = None) -> httpx.Response:
        return await self._routed(lambda c: c.get(path, timeout=timeout))

    async def models(self) -> dict[str, Any]:
        return await self._routed(lambda c: c.models())

    @asynccontextmanager
    async def stream(self, path: str, content: bytes) -> AsyncIterator[UpstreamResponse]:
        """`VLLMClient.stream` on the least busy routable replica, counted in flight until the context exits."""
        for attempt in range(2):
            k = self._pick()
            self._in_flight[k] += 1
            began = False
            try:
                async with self._clients[k].stream(path, content) as reply:
                    began = True
                    self._served[k] += 1
                    yield reply
                return
            except VLLMUnreachable as exc:
                if began or not _not_connected(exc):
                    raise
                self._down(k, exc)
                if attempt:
                    raise
            finally:
                self._in_flight[k] -= 1

    # --- control (the trainer, health) ---
    async def _each(self, call: Callable[[VLLMClient], Awaitable[T]], indices: Sequence[int] | None = None
                    ) -> list[T]:
        """`call` on every routable replica (or those of `indices`) at once; all finish before the first error is
        raised."""
        chosen = self._routable_indices() if indices is None else indices
        results = await asyncio.gather(*(call(self._clients[k]) for k in chosen), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    async def pause(self, mode: str = "wait", *, spare: Collection[int] = ()) -> list[int]:
        """Pause every routable replica, or none: when one cannot be paused (it failed, or did not answer in time),
        all are resumed (one that did not answer may pause late) before its error is raised, so a failed pause
        leaves serving as it was and the caller writes nothing.

        `spare`: replicas the caller can leave behind (not the one it writes in place): one of them that fails its
        pause leaves routing instead, and the others stay paused. In a keep or abort pause, which answers within an
        engine step, a spare replica still silent SPARE_GRACE_S after the others have paused is left behind too, so
        one hung host holds the others paused for that long, not for the whole freeze limit. Returns the replicas
        left behind; the caller must not write into them (their requests may still run) and brings them onto the
        weights again before they serve."""
        indices = self._written_indices()
        tasks = {k: asyncio.ensure_future(self._clients[k].pause(mode=mode)) for k in indices}
        needed = [tasks[k] for k in indices if k not in spare]
        if needed:
            await asyncio.wait(needed)
        waiting = [t for t in tasks.values() if not t.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=None if mode == "wait" else SPARE_GRACE_S)
        errors: dict[int, BaseException] = {}
        silent: list[int] = []
        for k, task in tasks.items():
            if not task.done():
                task.cancel()
                silent.append(k)
                errors[k] = VLLMUnreachable(f"replica {k} ({self._clients[k].address}) did not pause within "
                                            f"{SPARE_GRACE_S:g} s of the others")
            elif task.exception() is not None:
                errors[k] = task.exception()  # type: ignore[assignment]
        failed_needed = [k for k in indices if k in errors and k not in spare]
        if failed_needed or (errors and len(errors) == len(indices)):
            # Every replica that answered is resumed before the error is raised. One still silent (a hung spare)
            # is sent its resume without waiting for it, which would hold the error (and the caller's lock) for
            # the freeze limit; its health probe takes it out of routing meanwhile.
            for k in silent:
                self._later(self._clients[k].resume(timeout=FREEZE_TIMEOUT_S))
            await asyncio.gather(*(self._clients[k].resume(timeout=FREEZE_TIMEOUT_S) for k in indices
                                   if k not in silent), return_exceptions=True)
            raise errors[(failed_needed or sorted(errors))[0]]
        for k, err in sorted(errors.items()):
            self.mark(k, False, f"left behind by a pause: {err}")
        return sorted(errors)

    def _later(self, call: Awaitable[Any]) -> None:
        """Run `call` without waiting for it; its outcome is not needed (kept here until done, closed with us)."""
        async def quietly() -> None:
            try:
                await call
            except Exception:  # noqa: BLE001 - nobody waits for it: a failure changes nothing
                pass

        task = asyncio.ensure_future(quietly())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def resume(self) -> None:
        await self._each(lambda c: c.resume(), self._written_indices())

    async def reset_prefix_cache(self) -> None:
        await self._each(lambda c: c.reset_prefix_cache(), self._written_indices())

    async def is_paused(self, timeout: float = 10.0) -> bool:
        """True when any routable replica is paused: requests routed there wait."""
        return any(await self._each(lambda c: c.is_paused(timeout=timeout)))

    async def health(self, timeout: float = 5.0) -> bool:
        return await self.health_problem(timeout) is None

    async def health_problem(self, timeout: float = 5.0) -> str | None:
        """None when at least one replica is routable and every routable one answers GET /health with 200."""
        indices = self._routable_indices()
        if not indices:
            return f"no vLLM replica is routable: {self._states()}"
        problems = await asyncio.gather(*(self._clients[k].health_problem(timeout) for k in indices))
        found = [f"replica {k}: {p}" for k, p in zip(indices, problems) if p is not None]
        return "; ".join(found) or None

    async def aclose(self) -> None:
        for task in list(self._pending):
            task.cancel()
        results = await asyncio.gather(*(c.aclose() for c in self._clients), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
