"""Who may serve among K replicas, and the sync before a (re)started one does (loop/training/replicas.py): fake
supervisors, worker and replica clients; the real thing runs in tests/e2e/test_replicas_e2e.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from loop.training.recompute import Counters
from loop.training.replicas import Replicas
from loop.worker import protocol as p


@dataclass
class Sup:
    name: str
    state: str = "ready"
    restarts: int = 0
    unhealthy: str | None = None


@dataclass
class OneClient:
    calls: list[str] = field(default_factory=list)

    async def pause(self, mode: str = "wait") -> None:
        self.calls.append(f"pause:{mode}")

    async def resume(self) -> None:
        self.calls.append("resume")

    async def reset_prefix_cache(self) -> None:
        self.calls.append("reset")


class Clients:
    def __init__(self, n: int) -> None:
        self.routable = [False] * n
        self.why: list[str | None] = [None] * n
        self.written = [False] * n
        self.clients = [OneClient() for _ in range(n)]

    def mark(self, k: int, ok: bool, why: str | None = None, *, written: bool = False) -> None:
        self.routable[k], self.why[k], self.written[k] = ok, why, written and not ok

    def client(self, k: int) -> OneClient:
        return self.clients[k]

    def describe(self) -> list[dict[str, Any]]:
        return [{"index": k, "routable": r, "why": w, "paused_for_writes": r or self.written[k]}
                for k, (r, w) in enumerate(zip(self.routable, self.why))]


class Worker:
    def __init__(self) -> None:
        self.alive, self.hello = True, p.Hello(pid=1, load_id="L0")
        self.on_hello: list[Any] = []
        self.synced: list[int] = []
        self.fail: str | None = None

    async def call(self, msg: p.Msg, timeout: float) -> p.Msg:
        assert isinstance(msg, p.Sync)
        assert lock.locked()  # no weight change can land while a replica is copied
        if self.fail:
            return p.Error(message=self.fail)
        self.synced.append(msg.replica)
        return p.Synced(replica=msg.replica, load_id=f"load-{msg.replica}-{len(self.synced)}", ms=1.0)


lock = asyncio.Lock()


def setup(n: int = 3, worker: bool = True) -> tuple[Replicas, list[Sup], Clients, Worker]:
    global lock
    lock = asyncio.Lock()
    sups = [Sup(f"replica {k}") for k in range(n)]
    clients, w = Clients(n), Worker()
    state = SimpleNamespace(vllm=clients, worker=w if worker else None, weights_lock=lock, weight_version=3,
                            settings=SimpleNamespace(pause_mode="keep"))
    return Replicas(state, sups), sups, clients, w  # type: ignore[arg-type]


async def test_a_replica_serves_only_after_the_worker_copied_the_live_weights_into_it_paused() -> None:
    reps, sups, clients, worker = setup()
    worker.alive = False
    await reps.tick()
    assert clients.routable == [True, False, False]  # replica 0's weights are the live ones
    assert "waiting for the trainer" in (clients.why[1] or "")
    worker.alive = True
    await reps.tick()
    assert clients.routable == [True, True, True] and worker.synced == [1, 2]
    assert clients.clients[1].calls == ["pause:keep", "reset", "resume"]
    assert clients.clients[0].calls == []  # replica 0 is never paused for a sync
    await reps.tick()
    assert worker.synced == [1, 2]  # nothing changed: no second copy
    assert [r["synced_load"] for r in reps.describe()] == [None, "load-1-1", "load-2-2"]


async def test_a_replica_slow_to_pause_for_its_sync_does_not_hold_the_weights_lock() -> None:
    reps, sups, clients, worker = setup(2)
    answer = asyncio.Event()
    one = clients.clients[1]

    async def slow_pause(mode: str = "wait") -> None:
        one.calls.append(f"pause:{mode}")
        await answer.wait()

    one.pause = slow_pause  # type: ignore[method-assign]
    tick = asyncio.create_task(reps.tick())
    while one.calls != ["pause:keep"]:
        await asyncio.sleep(0.01)
    assert not lock.locked()  # an update may land meanwhile: replica 1 is not routable, nothing writes into it
    answer.set()
    await tick
    assert clients.routable == [True, True] and worker.synced == [1] and one.calls[-1] == "resume"


def hold_pause(one: OneClient) -> asyncio.Event:
    """Replica `one` answers its next pauses only once the returned event is set."""
    answer = asyncio.Event()

    async def slow_pause(mode: str = "wait") -> None:
        one.calls.append(f"pause:{mode}")
        await answer.wait()

    one.pause = slow_pause  # type: ignore[method-assign]
    return answer


async def test_a_sync_that_waits_does_not_hold_up_another_replicas_routing() -> None:
    reps, sups, clients, worker = setup(3)
    await reps.tick()
    answer = hold_pause(clients.clients[1])
    sups[1].restarts += 1  # restarted: synced again, and its pause hangs
    await asyncio.wait_for(reps.watch(), 1.0)
    assert clients.routable == [True, False, True] and clients.why[1] == "copying the live weights into it"
    sups[2].unhealthy = "no answer to GET /health in 3 s"
    await asyncio.wait_for(reps.watch(), 1.0)  # decided at once, the sync of replica 1 still waiting
    assert clients.routable == [True, False, False]
    answer.set()
    sups[2].unhealthy = None
    await reps.tick()
    assert clients.routable == [True, True, True] and worker.synced == [1, 2, 1]


@pytest.mark.parametrize("change", ["restart", "new worker"])
async def test_a_copy_into_a_replica_that_changed_meanwhile_does_not_count(change: str) -> None:
    """A restart of the replica (the copy went into a vLLM that is gone) or a new worker (the live weights it
    copied may not be the live ones now) while a sync runs: it is synced again before it serves."""
    reps, sups, clients, worker = setup(2)
    answer = hold_pause(clients.clients[1])
    await asyncio.wait_for(reps.watch(), 1.0)
    while clients.clients[1].calls != ["pause:keep"]:
        await asyncio.sleep(0.01)
    if change == "restart":
        sups[1].restarts += 1
    else:
        reps.worker_hello(p.Hello(pid=2, load_id="L1"))
    answer.set()
    while reps._syncs:
        await asyncio.sleep(0.01)
    assert worker.synced == [1] and clients.routable == [True, False] and 1 not in reps.synced
    await reps.tick()
    assert worker.synced == [1, 1] and clients.routable == [True, True]


async def test_a_failed_sync_keeps_the_replica_out_and_is_retried() -> None:
    reps, sups, clients, worker = setup(2)
    worker.fail = "replica 1 does not hold the same model"
    await reps.tick()
    assert clients.routable == [True, False] and "same model" in (clients.why[1] or "")
    assert clients.clients[1].calls[-1] == "resume"  # never left paused
    assert "same model" in reps.describe()[1]["last_error"]
    worker.fail = None
    await reps.tick()
    assert clients.routable == [True, True] and reps.describe()[1]["last_error"] is None


async def test_a_restarted_replica_is_out_while_down_and_synced_again_when_back() -> None:
    reps, sups, clients, worker = setup(2)
    await reps.tick()
    sups[1].state = "restarting"
    await reps.tick()
    assert clients.routable == [True, False] and "restarting" in (clients.why[1] or "")
    sups[1].state, sups[1].restarts = "ready", 1
    await reps.tick()
    assert clients.routable == [True, True] and worker.synced == [1, 1]
    sups[1].restarts = 2  # a restart the watch did not see go down: the restart count tells
    await reps.tick()
    assert worker.synced == [1, 1, 1]


async def test_a_new_worker_resyncs_every_replica_and_replica_0_down_is_out() -> None:
    reps, sups, clients, worker = setup(3)
    await reps.start()
    try:
        await asyncio.sleep(0.05)
        assert worker.synced == [1, 2]
        worker.on_hello[0](p.Hello(pid=2, load_id="L1"))  # a worker process that knows no replica's memory
        for _ in range(50):
            await asyncio.sleep(0.02)
            if len(worker.synced) == 4:
                break
        assert worker.synced == [1, 2, 1, 2]
        sups[0].state = "restarting"
        await reps.tick()
        assert clients.routable == [False, True, True]
    finally:
        await reps.stop()


async def test_without_a_worker_every_ready_replica_serves() -> None:
    reps, sups, clients, _ = setup(2, worker=False)
    sups[1].state = "starting"
    await reps.tick()
    assert clients.routable == [True, False]
    sups[1].state = "ready"
    await reps.tick()
    assert clients.routable == [True, True]


async def test_a_synced_ready_replica_marked_down_by_a_failed_request_serves_again() -> None:
    reps, sups, clients, worker = setup(2)
    await reps.tick()
    clients.mark(1, False, "down: connection refused")  # the router saw one refused connection
    await reps.tick()
    assert clients.routable == [True, True] and worker.synced == [1]  # its supervisor says ready: no new copy


async def test_a_replica_failing_its_health_probe_leaves_routing_at_once_and_returns_without_a_new_copy() -> None:
    reps, sups, clients, worker = setup(3)
    await reps.tick()
    assert clients.routable == [True, True, True] and worker.synced == [1, 2]
    sups[2].unhealthy = "no answer to GET /health in 3 s"
    await reps.tick()
    assert clients.routable == [True, True, False] and clients.written == [False] * 3
    assert "failed a health probe: no answer to GET /health in 3 s" in (clients.why[2] or "")
    assert reps.synced.keys() == {1, 2}  # its weights did not move
    sups[2].unhealthy = None
    await reps.tick()
    assert clients.routable == [True, True, True] and worker.synced == [1, 2]


async def test_replica_0_unhealthy_leaves_routing_only_while_another_serves_and_writes_still_pause_it() -> None:
    reps, sups, clients, worker = setup(3)
    await reps.tick()
    sups[0].unhealthy = "vLLM answered 503 to GET /health"
    await reps.tick()
    assert clients.routable == [False, True, True] and clients.written == [True, False, False]
    sups[1].unhealthy = sups[2].unhealthy = "no answer to GET /health in 3 s"
    await reps.tick()  # none of the others serves now: replica 0 is better than no one
    assert clients.routable == [True, False, False] and clients.written == [False] * 3
    sups[0].unhealthy = sups[1].unhealthy = sups[2].unhealthy = None
    await reps.tick()
    assert clients.routable == [True, True, True] and worker.synced == [1, 2]


async def test_a_replica_unhealthy_across_a_write_is_synced_again_before_it_serves() -> None:
    """Out of routing, the unhealthy replica is not paused by a write, so the write skips it and forgets its sync:
    once its probe passes it gets the live weights, under its own pause, before it serves."""
    from tests.unit.vllm.test_replicas import column, replicas

    async with replicas(3, routable=False) as (client, fakes):
        reps, w, weights = await live_weights(client)
        reps.supervisors[1].unhealthy = "vLLM answered 503 to GET /health"
        await reps.tick()
        assert column(client, "routable") == [True, False, True]
        seen: dict[str, Any] = {}

        async def work(t: dict[str, float]) -> bool:
            seen.update(unpaused=list(weights.unpaused), paused=[f.paused for f in fakes])
            return True

        await weights.change(work, atomic=True, spare=True)
        assert seen == {"unpaused": [1], "paused": [True, False, True]}
        await reps.tick()
        assert w.synced == [1, 2] and column(client, "routable") == [True, False, True]  # still unhealthy: no sync
        reps.supervisors[1].unhealthy = None
        await reps.tick()
        assert w.synced == [1, 2, 1] and column(client, "routable") == [True, True, True]


async def test_a_write_pauses_and_writes_an_unhealthy_replica_0_out_of_routing_and_fails_when_it_hangs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Replica 0's weights are the ones the trainer writes in place: out of routing it must still be paused around
    a write, and resumed; a hung one fails the write at its pause, with every other replica resumed."""
    from loop.vllm import client as client_mod
    from loop.vllm import replicas as replicas_mod
    from tests.unit.vllm.test_replicas import answered_by, column, replicas

    async with replicas(3, routable=False) as (client, fakes):
        reps, w, weights = await live_weights(client)
        reps.supervisors[0].unhealthy = "vLLM answered 503 to GET /health"
        await reps.tick()
        assert column(client, "routable") == [False, True, True]
        assert column(client, "paused_for_writes") == [True, True, True]
        assert {await answered_by(client) for _ in range(4)} == {1, 2}
        seen: dict[str, Any] = {}

        async def work(t: dict[str, float]) -> bool:
            seen.update(unpaused=list(weights.unpaused), paused=[f.paused for f in fakes])
            return True

        await weights.change(work, atomic=True, spare=True)
        assert seen == {"unpaused": [], "paused": [True, True, True]}
        assert [f.paused for f in fakes] == [False, False, False]
        assert fakes[0].seen[-3:] == ["POST /pause", "POST /reset_prefix_cache", "POST /resume"]
        monkeypatch.setattr(client_mod, "FREEZE_TIMEOUT_S", 0.3)
        monkeypatch.setattr(replicas_mod, "FREEZE_TIMEOUT_S", 0.3)
        fakes[0].gate.clear()  # now it hangs
        seen.clear()
        with pytest.raises(Exception, match="pause|time"):
            await weights.change(work, atomic=True, spare=True)
        assert seen == {} and [f.paused for f in fakes[1:]] == [False, False]
        fakes[0].gate.set()


async def test_without_a_worker_an_unhealthy_replica_is_out_until_its_probe_passes() -> None:
    reps, sups, clients, _ = setup(2, worker=False)
    sups[1].unhealthy = "vLLM answered 503 to GET /health"
    await reps.tick()
    assert clients.routable == [True, False]
    sups[1].unhealthy = None
    await reps.tick()
    assert clients.routable == [True, True]


async def live_weights(client: Any) -> tuple[Replicas, Worker, Any]:
    """`Replicas` and `LiveWeights` over a real ReplicaClient of three replicas, all synced once."""
    global lock
    from loop.training.weights import LiveWeights

    lock = asyncio.Lock()
    w = Worker()
    state = SimpleNamespace(vllm=client, worker=w, weights_lock=lock, weight_version=3, changing_from=None,
                            changes_done=0, supervisor=None,
                            settings=SimpleNamespace(pause_mode="keep", keep_recompute_share=1.0))
    reps = Replicas(state, [Sup(f"replica {k}") for k in range(3)])  # type: ignore[arg-type]
    state.replicas_lost, state.replicas = reps.lost, reps
    await reps.tick()
    return reps, w, LiveWeights(state)  # type: ignore[arg-type]


async def test_a_replica_that_cannot_pause_for_a_write_is_left_behind_then_synced_before_it_serves(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's write (`LiveWeights.change(spare=True)`) over real replica clients: replica 2's host hangs, so its
    pause is never answered. The write goes ahead on the others within the grace, names replica 2 to the work
    (the worker must not write into it), takes it out of routing, and the next round syncs it before it serves."""
    from loop.vllm import replicas as replicas_mod
    from tests.unit.vllm.test_replicas import column, replicas

    monkeypatch.setattr(replicas_mod, "SPARE_GRACE_S", 0.3)
    async with replicas(3, routable=False) as (client, fakes):
        reps, w, weights = await live_weights(client)
        assert w.synced == [1, 2] and column(client, "routable") == [True, True, True]
        fakes[2].gate.clear()
        seen: dict[str, Any] = {}

        async def work(t: dict[str, float]) -> bool:
            seen["left"], seen["paused"] = list(weights.left_behind), [f.paused for f in fakes]
            return True

        await weights.change(work, atomic=True, spare=True)
        assert seen == {"left": [2], "paused": [True, True, False]}
        assert [f.paused for f in fakes[:2]] == [False, False]  # resumed after the write
        assert column(client, "routable") == [True, True, False] and 2 not in reps.synced
        assert "did not pause within" in reps.last_error[2]
        fakes[2].gate.set()
        await reps.tick()
        assert w.synced == [1, 2, 2] and column(client, "routable") == [True, True, True]


async def test_a_write_skips_every_replica_it_did_not_pause_and_each_is_synced_again() -> None:
    """A replica still mirrored but out of routing (here: marked down after a failed connection) is not paused by
    a write, so the write must not touch it (`unpaused`, the worker's `skip`): requests may still run there. It is
    synced again, under its own pause, before it serves."""
    from tests.unit.vllm.test_replicas import column, replicas

    async with replicas(3, routable=False) as (client, fakes):
        reps, w, weights = await live_weights(client)
        assert w.synced == [1, 2]
        client.mark(1, False, "cannot be connected to")
        seen: dict[str, Any] = {}

        async def work(t: dict[str, float]) -> bool:
            seen.update(unpaused=list(weights.unpaused), left=list(weights.left_behind),
                        paused=[f.paused for f in fakes])
            return True

        await weights.change(work, atomic=True, spare=True)
        assert seen == {"unpaused": [1], "left": [], "paused": [True, False, True]}
        assert 1 not in reps.synced and 2 in reps.synced
        await reps.tick()
        assert w.synced == [1, 2, 1] and column(client, "routable") == [True, True, True]
        assert fakes[1].seen[-3:] == ["POST /pause", "POST /reset_prefix_cache", "POST /resume"]


async def test_the_keep_guard_reads_the_counters_of_routable_replicas_only() -> None:
    """A hung replica out of routing is not paused by a write, so its answers are not preempted: its counters are
    not needed, and reading them would cost every write the metrics timeout."""
    from tests.unit.vllm.test_replicas import replicas

    async with replicas(3, routable=False) as (client, fakes):
        reps, _, weights = await live_weights(client)
        assert await weights.counters() == Counters(running=6, generated=60)
        fakes[2].gate.clear()  # a hung host
        reps.supervisors[2].unhealthy = "no answer to GET /health in 3 s"
        await reps.tick()
        got = await asyncio.wait_for(weights.counters(), 1.0)
        assert got == Counters(running=4, generated=30)
        fakes[2].gate.set()


async def test_a_frozen_remote_agent_leaves_routing_without_slowing_the_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A remote replica's agent (a stand-in answering GET /loop/replica over real HTTP) stops answering: it is out
    of routing once its status call has waited STATUS_SLOW_S, while each routing round goes on deciding within its
    short wait; answering again, it serves on the weights it was synced with."""
    import json

    from loop.training import replicas as replicas_mod
    from loop.training.replicas import RemoteReplica
    from tests.unit.api.test_proxy_upstream import whole

    monkeypatch.setattr(replicas_mod, "STATUS_SLOW_S", 0.2)
    gate = asyncio.Event()
    gate.set()

    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await gate.wait()
                writer.write(whole(json.dumps({"ready": True, "state": "ready", "load_id": "A1"}).encode()))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(agent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reps, sups, clients, worker = setup(2)
    remote = RemoteReplica(1, f"http://127.0.0.1:{port}", None)
    reps.supervisors[1] = remote
    try:
        await reps.tick()
        assert clients.routable == [True, True] and worker.synced == [1] and remote.state == "ready"
        gate.clear()  # the agent's host freezes
        t0 = asyncio.get_running_loop().time()
        await reps.watch(status_wait_s=0.05)
        assert asyncio.get_running_loop().time() - t0 < 1.0 and clients.routable == [True, True]
        async with asyncio.timeout(5):
            while remote.unhealthy is None:
                await asyncio.sleep(0.02)
        await reps.watch(status_wait_s=0.05)
        assert clients.routable == [True, False]
        assert "has not answered GET /loop/replica in 0.2 s" in (clients.why[1] or "")
        gate.set()
        await reps.tick()
        assert clients.routable == [True, True] and worker.synced == [1] and remote.unhealthy is None
    finally:
        gate.set()
        await reps.stop()
        server.close()
        await server.wait_closed()
