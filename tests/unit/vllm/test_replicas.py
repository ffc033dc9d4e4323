"""`ReplicaClient`: real `VLLMClient`s against stand-in vLLMs on real Unix sockets. Routing to the least busy
routable replica (round-robin among equals, a stream counted until it closes), a replica that cannot be reached
marked down and the call sent to another, a begun stream never retried, control calls fanned out to every
routable replica (a failed resume still reaching the others), and a clear error when nothing is routable.

Run: .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/vllm/test_replicas.py
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
import pytest

from loop.vllm.client import VLLMError, VLLMUnreachable
from loop.vllm.replicas import ReplicaClient
from tests.unit.api.test_proxy_upstream import SSE_HEAD, chunk, whole


class Replica:
    """A stand-in vLLM that answers by route: completions name the replica and wait while `gate` is clear (a slow
    request), chat streams one event then wait on `gate` before ending, /pause, /resume and /metrics wait on it too; /pause, /resume, /is_paused, /health and
    /reset_prefix_cache act like vLLM's; a route in `fail` answers 500."""

    def __init__(self, index: int, path: str) -> None:
        self.index, self.path = index, path
        self.gate = asyncio.Event()
        self.gate.set()
        self.seen: list[str] = []
        self.paused = False
        self.sick = False
        self.fail: set[str] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, target = head.split(b" ")[:2]
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                route = target.decode().split("?")[0]
                self.seen.append(f"{method.decode()} {route}")
                writer.write(await self.answer(route, writer))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def answer(self, route: str, writer: asyncio.StreamWriter) -> bytes:
        if route in self.fail:
            return whole(b'{"error": {"message": "fake failure"}}', b"500 Internal Server Error")
        if route == "/v1/completions":
            await self.gate.wait()
            return whole(json.dumps({"replica": self.index}).encode())
        if route == "/v1/chat/completions":
            writer.write(SSE_HEAD + chunk(b'data: {"replica": %d}\n\n' % self.index))
            await writer.drain()
            await self.gate.wait()
            return chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        if route in ("/pause", "/resume"):
            await self.gate.wait()
            self.paused = route == "/pause"
            return whole(b"{}")
        if route == "/is_paused":
            return whole(json.dumps({"is_paused": self.paused}).encode())
        if route == "/reset_prefix_cache":
            return whole(b'{"success": true}')
        if route == "/metrics":  # vLLM's two counters loop reads (loop/training/recompute.py), 2 running, 10*(k+1) made
            await self.gate.wait()
            return whole(b"vllm:num_requests_running 2\nvllm:generation_tokens_total %d\n" % (10 * (self.index + 1)))
        if route == "/health":
            return whole(b'{"error": "EngineCore died (fake)"}', b"503 Service Unavailable") if self.sick else whole(b"")
        return whole(b'{"error": "no such route"}', b"404 Not Found")


@asynccontextmanager
async def replicas(n: int, *, absent: tuple[int, ...] = (), routable: bool = True
                   ) -> AsyncIterator[tuple[ReplicaClient, list[Replica]]]:
    """n stand-ins (those in `absent` have no server: nothing listens on their socket) behind one client."""
    where = tempfile.mkdtemp(prefix="lrc-", dir="/tmp")  # a Unix socket path must stay short
    fakes = [Replica(k, f"{where}/v{k}.sock") for k in range(n)]
    try:
        async with AsyncExitStack() as stack:
            for fake in fakes:
                if fake.index not in absent:
                    await stack.enter_async_context(await asyncio.start_unix_server(fake.serve, fake.path))
            client = ReplicaClient.open([f"unix:{f.path}" for f in fakes], 5.0)
            stack.push_async_callback(client.aclose)  # runs first: the servers wait for its connections
            for k in range(n) if routable else ():
                client.mark(k, True)
            yield client, fakes
    finally:
        shutil.rmtree(where, ignore_errors=True)


async def answered_by(client: ReplicaClient) -> int:
    """Which replica answered a completion (a held one fails the test after 5 s instead of hanging it)."""
    return (await client.post("/v1/completions", b"{}", timeout=5.0)).json()["replica"]


async def until(predicate, timeout: float = 5.0) -> None:  # noqa: ANN001
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


def column(client: ReplicaClient, key: str) -> list:
    return [r[key] for r in client.describe()]


async def test_equally_idle_replicas_take_turns_and_unroutable_ones_are_skipped() -> None:
    async with replicas(3) as (client, _):
        assert [await answered_by(client) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
        client.mark(1, False, "behind: syncing")
        assert [await answered_by(client) for _ in range(4)] == [0, 2, 0, 2]
        assert column(client, "served") == [4, 2, 4]


async def test_the_replica_with_the_fewest_requests_in_flight_is_chosen() -> None:
    async with replicas(2) as (client, fakes):
        fakes[0].gate.clear()  # replica 0 answers slowly
        slow = [asyncio.create_task(answered_by(client)) for _ in range(2)]  # one each: both were idle
        await until(lambda: len(fakes[0].seen) == 1 and len(fakes[1].seen) == 1)
        assert await slow[1] == 1
        assert column(client, "in_flight") == [1, 0]
        assert [await answered_by(client) for _ in range(3)] == [1, 1, 1]  # round-robin alone would alternate
        fakes[0].gate.set()
        assert await slow[0] == 0
        assert column(client, "in_flight") == [0, 0] and column(client, "served") == [1, 4]


async def test_a_stream_counts_in_flight_until_its_context_exits() -> None:
    async with replicas(2) as (client, fakes):
        fakes[0].gate.clear()
        async with client.stream("/v1/chat/completions", b"{}") as reply:
            lines = reply.aiter_lines()
            assert await anext(lines) == 'data: {"replica": 0}'
            assert column(client, "in_flight") == [1, 0]
            assert [await answered_by(client) for _ in range(2)] == [1, 1]
            fakes[0].gate.set()
            assert [line async for line in lines if line] == ["data: [DONE]"]
            assert column(client, "in_flight") == [1, 0]  # read to its end, but still open
        assert column(client, "in_flight") == [0, 0]
        assert [await answered_by(client) for _ in range(2)] == [0, 1]


async def test_a_replica_that_cannot_be_reached_is_marked_down_and_the_call_goes_to_another() -> None:
    async with replicas(3, absent=(0,)) as (client, fakes):
        assert await answered_by(client) == 1
        down = client.describe()[0]
        assert down["routable"] is False and down["why"].startswith("down: cannot reach vLLM at unix:")
        assert (await client.get("/health")).status_code == 200
        assert [f.seen for f in fakes[1:]] == [["POST /v1/completions"], ["GET /health"]]
        async with client.stream("/v1/chat/completions", b"{}") as reply:  # 0 is not tried again
            assert await anext(reply.aiter_lines()) == 'data: {"replica": 1}'
        assert column(client, "in_flight") == [0, 0, 0]


async def test_a_call_is_retried_once_only() -> None:
    async with replicas(3, absent=(0, 1)) as (client, fakes):
        with pytest.raises(VLLMUnreachable, match="cannot reach vLLM"):
            await client.post("/v1/completions", b"{}")
        assert column(client, "routable") == [False, False, True]  # both marked; the second failure is raised
        assert fakes[2].seen == [] and column(client, "in_flight") == [0, 0, 0]


async def test_a_stream_that_cannot_connect_is_sent_to_another_but_a_begun_one_is_never_retried() -> None:
    async with replicas(2, absent=(0,)) as (client, fakes):
        async with client.stream("/v1/chat/completions", b"{}") as reply:
            assert await anext(reply.aiter_lines()) == 'data: {"replica": 1}'
        assert column(client, "routable") == [False, True] and column(client, "in_flight") == [0, 0]
    async with replicas(2) as (client, fakes):
        with pytest.raises(VLLMUnreachable, match="lost mid-stream"):
            async with client.stream("/v1/chat/completions", b"{}") as reply:
                raise VLLMUnreachable("lost mid-stream") from httpx.ConnectError("as if nothing had been sent")
        assert [len(f.seen) for f in fakes] == [1, 0]  # not sent again to replica 1
        assert column(client, "routable") == [True, True] and column(client, "in_flight") == [0, 0]


async def test_nothing_routable_is_a_clear_error_naming_each_replica() -> None:
    async with replicas(2, routable=False) as (client, fakes):
        assert column(client, "routable") == [False, False]
        client.mark(1, False, "down: gone")
        with pytest.raises(VLLMUnreachable) as caught:
            await client.post("/v1/completions", b"{}")
        message = str(caught.value)
        assert message.startswith("no vLLM replica is routable: replica 0 (unix:")
        assert "not marked routable yet" in message and f"replica 1 (unix:{fakes[1].path}): down: gone" in message
        with pytest.raises(VLLMUnreachable, match="no vLLM replica is routable"):
            async with client.stream("/v1/chat/completions", b"{}"):
                pass
        assert await client.health() is False
        assert (await client.health_problem()).startswith("no vLLM replica is routable")
        assert await client.is_paused() is False
        await client.pause()  # nothing serves, so nothing to pause
        assert [f.seen for f in fakes] == [[], []]


async def test_pause_and_resume_reach_every_routable_replica_and_a_failed_resume_does_not_stop_the_others() -> None:
    async with replicas(3) as (client, fakes):
        client.mark(2, False, "behind")
        await client.pause(mode="keep")
        assert [f.paused for f in fakes] == [True, True, False]
        assert await client.is_paused() is True
        await client.reset_prefix_cache()
        assert [f.seen.count("POST /reset_prefix_cache") for f in fakes] == [1, 1, 0]
        fakes[0].fail.add("/resume")
        fakes[1].gate.clear()  # replica 1 answers after replica 0 has failed
        resuming = asyncio.create_task(client.resume())
        await until(lambda: "POST /resume" in fakes[0].seen and "POST /resume" in fakes[1].seen)
        await asyncio.sleep(0.05)
        assert not resuming.done()  # replica 0's error waits for replica 1
        fakes[1].gate.set()
        with pytest.raises(VLLMError, match="fake failure"):
            await resuming
        assert [f.paused for f in fakes] == [True, False, False]  # replica 1 resumed all the same
        assert await client.is_paused() is True  # replica 0 still is
        fakes[0].fail.clear()
        await client.resume()
        assert await client.is_paused() is False
        assert fakes[2].seen == []


async def test_a_pause_one_replica_refuses_resumes_the_others_before_it_fails() -> None:
    async with replicas(3) as (client, fakes):
        fakes[1].fail.add("/pause")
        with pytest.raises(VLLMError, match="fake failure"):
            await client.pause(mode="keep")
        assert [f.paused for f in fakes] == [False, False, False]  # none left paused by nobody
        assert [f.seen.count("POST /resume") for f in fakes] == [1, 1, 1]
        fakes[1].fail.clear()
        await client.pause(mode="keep")
        assert [f.paused for f in fakes] == [True, True, True]


async def test_a_replica_that_does_not_answer_a_keep_pause_is_given_up_within_the_freeze_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from loop.vllm import client as client_mod, replicas as replicas_mod

    monkeypatch.setattr(client_mod, "FREEZE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(replicas_mod, "FREEZE_TIMEOUT_S", 0.5)
    async with replicas(3) as (client, fakes):
        fakes[2].gate.clear()  # a hung host: neither its pause nor its resume is answered
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(VLLMUnreachable, match="did not answer POST /pause"):
            await client.pause(mode="keep")
        assert asyncio.get_running_loop().time() - t0 < 0.5 + 0.5 + 1.0  # the pause's limit, then the resume's
        assert [f.paused for f in fakes[:2]] == [False, False]  # the others serve again
        fakes[2].gate.set()


async def test_a_spare_replica_that_refuses_its_pause_is_left_behind_and_the_others_stay_paused() -> None:
    async with replicas(3) as (client, fakes):
        fakes[2].fail.add("/pause")
        assert await client.pause(mode="keep", spare=[1, 2]) == [2]
        assert [f.paused for f in fakes] == [True, True, False]  # the write goes ahead on 0 and 1
        assert column(client, "routable") == [True, True, False]
        assert "left behind by a pause" in column(client, "why")[2] and "fake failure" in column(client, "why")[2]
        assert [f.seen.count("POST /resume") for f in fakes] == [0, 0, 0]
        await client.resume()
        assert [f.paused for f in fakes] == [False, False, False] and fakes[2].seen.count("POST /resume") == 0


async def test_a_spare_replica_that_hangs_holds_the_others_paused_only_for_the_grace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from loop.vllm import replicas as replicas_mod

    monkeypatch.setattr(replicas_mod, "SPARE_GRACE_S", 0.3)
    async with replicas(3) as (client, fakes):
        fakes[1].gate.clear()  # a hung host: its pause is never answered (the freeze limit is 30 s)
        t0 = asyncio.get_running_loop().time()
        assert await client.pause(mode="keep", spare=[1, 2]) == [1]
        assert asyncio.get_running_loop().time() - t0 < 0.3 + 1.0
        assert [fakes[0].paused, fakes[2].paused] == [True, True]
        assert column(client, "routable") == [True, False, True] and "did not pause within" in column(client, "why")[1]
        await client.resume()
        fakes[1].gate.set()


async def test_replica_zero_failing_while_a_spare_hangs_fails_the_pause_without_waiting_for_the_spare(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The error comes once the others are resumed, not after the hung spare's resume has timed out (the caller
    holds the weights lock meanwhile); the hung one is still sent its resume and takes it when it thaws."""
    from loop.vllm import replicas as replicas_mod

    monkeypatch.setattr(replicas_mod, "SPARE_GRACE_S", 0.3)
    async with replicas(3) as (client, fakes):
        fakes[0].fail.add("/pause")
        fakes[2].gate.clear()  # a hung host (the freeze limit is 30 s)
        with pytest.raises(VLLMError, match="fake failure"):
            await asyncio.wait_for(client.pause(mode="keep", spare=[1, 2]), 5.0)
        assert [fakes[0].paused, fakes[1].paused] == [False, False]
        assert fakes[1].seen.count("POST /resume") == 1
        fakes[2].gate.set()  # thawed: its late pause, then the resume sent meanwhile
        await until(lambda: fakes[2].seen.count("POST /resume") == 1)
        await until(lambda: not fakes[2].paused)


async def test_replica_zero_failing_fails_the_pause_even_with_spares_and_all_spares_failing_fails_it_too() -> None:
    async with replicas(3) as (client, fakes):
        fakes[0].fail.add("/pause")
        with pytest.raises(VLLMError, match="fake failure"):
            await client.pause(mode="keep", spare=[1, 2])
        assert [f.paused for f in fakes] == [False, False, False] and column(client, "routable") == [True] * 3
        fakes[0].fail.clear()
        for f in fakes[1:]:
            f.fail.add("/pause")
        client.mark(0, False, "down")
        with pytest.raises(VLLMError, match="fake failure"):  # nobody would be paused to write into
            await client.pause(mode="keep", spare=[1, 2])
        assert column(client, "routable") == [False, True, True]


async def test_a_replica_marked_written_is_paused_resumed_and_reset_but_not_routed_to() -> None:
    async with replicas(3) as (client, fakes):
        client.mark(0, False, "unhealthy", written=True)
        client.mark(2, False, "down")
        assert column(client, "paused_for_writes") == [True, True, False]
        assert {await answered_by(client) for _ in range(3)} == {1}
        assert await client.pause(mode="keep") == []
        assert [f.paused for f in fakes] == [True, True, False]
        await client.reset_prefix_cache()
        await client.resume()
        assert [f.paused for f in fakes] == [False, False, False]
        assert fakes[0].seen == ["POST /pause", "POST /reset_prefix_cache", "POST /resume"]
        assert fakes[2].seen == []
        client.mark(0, True)
        client.mark(0, False, "down: refused")  # a mark without `written` drops it
        assert column(client, "paused_for_writes") == [False, True, False]


async def test_health_names_the_unhealthy_replica() -> None:
    async with replicas(2) as (client, fakes):
        assert await client.health() is True and await client.health_problem() is None
        fakes[1].sick = True
        assert await client.health() is False
        problem = await client.health_problem()
        assert problem.startswith("replica 1: vLLM at unix:") and "EngineCore died" in problem
        client.mark(1, False, "down: sick")
        assert await client.health() is True  # only routable replicas serve


async def test_mark_describe_and_replica_zero_stands_for_the_address() -> None:
    async with replicas(2, routable=False) as (client, fakes):
        assert client.describe() == [
            {"index": k, "address": f"unix:{f.path}", "routable": False, "paused_for_writes": False,
             "in_flight": 0, "served": 0,
             "why": "not marked routable yet (its weights are not known to be on the served version)"}
            for k, f in enumerate(fakes)]
        client.mark(0, True)
        client.mark(1, False)
        assert [(r["routable"], r["why"]) for r in client.describe()] == [(True, None), (False, "marked not routable")]
        assert (client.address, client.socket_path, len(client)) == (f"unix:{fakes[0].path}", fakes[0].path, 2)
        assert client.client(1).address == f"unix:{fakes[1].path}"
        with pytest.raises(IndexError, match="no replica 2"):
            client.mark(2, True)
