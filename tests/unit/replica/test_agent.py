"""`loop replica`'s agent (loop/replica/agent.py) over real HTTP, and the worker's side of it (loop/worker/remotes.py)
over a real torch.distributed transfer on loopback; the agent's weights are tensors in this process (no vLLM here:
tests/e2e/test_remote_replica_e2e.py runs real ones). Every route needs the token; vLLM's routes are forwarded;
a sync writes the weights whole, a stage writes nothing until its commit, a restart (new load id) between them
is reported, a bad request is refused before anyone joins a group, and a sender that never joins does not wedge it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from loop.config import Settings
from loop.replica import agent as agent_mod
from loop.replica.agent import Agent, create_agent_app
from loop.worker import remotes as remotes_mod
from loop.worker.remotes import Remotes, sizes
from loop.worker.update import weights_checksum
from tests.support import ServedApp, free_port

TOKEN = "r" * 32
MB_S = Settings.model_fields["remote_min_mb_s"].default  # the product's default link rate


class InMemory(Agent):
    """The agent with its 'vLLM weights' in this process: `restart()` is a new load in new memory."""

    world = 1  # vLLM ranks: rank r holds its own shards (other shapes, other values)

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.generation = 0
        self.restart()

    def restart(self) -> None:
        self.generation += 1
        self.ranks = [_shards(self.generation * 10 + r, r) for r in range(self.world)]
        self.load_id = f"load-{self.generation}"
        self.staged = {}

    def mapped(self) -> list[dict[str, Any]]:
        return self.ranks


class TwoRanks(InMemory):
    world = 2


def _shards(seed: int, rank: int = 0, zero_c: bool = True) -> dict[str, torch.Tensor]:
    """One vLLM rank's tensors: rank r's split weight is r rows shorter, as an uneven split makes it."""
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(64 - rank, 32, generator=g).to(torch.bfloat16),
            "b.bias": torch.randn(100, generator=g),
            "c.weight": torch.zeros(3, 5, dtype=torch.float16) if zero_c else
            torch.randn(3, 5, generator=g).to(torch.float16)}


def _primary(rank: int = 0) -> dict[str, torch.Tensor]:
    return _shards(99 + rank, rank, zero_c=False)


seen: list[httpx.Request] = []


class Chunks(httpx.AsyncByteStream):
    """A reply body that arrives in pieces, as a streamed answer does."""

    def __init__(self, *parts: bytes) -> None:
        self.parts = parts

    async def __aiter__(self) -> Any:
        for part in self.parts:
            yield part


def _fake_vllm(request: httpx.Request) -> httpx.Response:
    seen.append(request)
    if request.url.path == "/v1/completions":
        body = json.dumps({"echo": request.content.decode(), "auth": request.headers.get("authorization")}).encode()
        return httpx.Response(200, headers={"content-type": "application/json"}, stream=Chunks(body[:5], body[5:]))
    text = f"vllm {request.method} {request.url.path}?{request.url.query.decode()}".encode()
    return httpx.Response(200, headers={"content-type": "text/plain"}, stream=Chunks(text))


@contextlib.contextmanager
def _agents(tmp_path: Path, *kinds: type[InMemory]) -> Iterator[list[tuple[ServedApp, InMemory]]]:
    """One served agent of each kind, each with its own data folder and transfer port."""
    with contextlib.ExitStack() as stack:
        out = []
        for i, kind in enumerate(kinds):
            settings = Settings(data_dir=tmp_path / str(i), replica_token=TOKEN, replica_transfer_port=free_port())
            agent = kind(settings)
            app = create_agent_app(settings, manage=False, upstream=httpx.MockTransport(_fake_vllm), agent=agent)
            out.append((stack.enter_context(ServedApp(app)), agent))
        yield out


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ServedApp, InMemory]]:
    with _agents(tmp_path, InMemory) as [one]:
        yield one


def _client(url: str, token: str | None = TOKEN) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"} if token else {}, timeout=30)


def test_every_route_needs_the_token(served: tuple[ServedApp, InMemory]) -> None:
    s, _ = served
    for token in (None, "wrong", TOKEN[:-1]):
        with _client(s.url, token) as c:
            for method, path in (("GET", "/loop/replica"), ("POST", "/pause"), ("POST", "/v1/completions"),
                                 ("GET", "/metrics"), ("POST", "/loop/replica/commit")):
                r = c.request(method, path, json={})
                assert r.status_code == 401 and "LOOP_REPLICA_TOKEN" in r.json()["detail"], (token, path)
    assert not seen or all(req.url.path != "/pause" for req in seen)


def test_vllms_routes_are_forwarded_without_the_token(served: tuple[ServedApp, InMemory]) -> None:
    s, _ = served
    seen.clear()
    with _client(s.url) as c:
        r = c.post("/v1/completions", content=b'{"prompt": "hi"}', headers={"content-type": "application/json"})
        assert r.status_code == 200 and r.json() == {"echo": '{"prompt": "hi"}', "auth": None}
        assert c.post("/pause", params={"mode": "keep"}).text == "vllm POST /pause?mode=keep"
        assert c.get("/metrics").text == "vllm GET /metrics?"
        st = c.get("/loop/replica").json()
    assert st["ready"] and st["load_id"] == "load-1" and st["transfer_port"] > 0 and st["staged_run"] is None
    assert [q.url.path for q in seen] == ["/v1/completions", "/pause", "/metrics"]


def test_loop_reads_that_an_agents_vllm_fails_its_health_probe(served: tuple[ServedApp, InMemory]) -> None:
    from types import SimpleNamespace

    from loop.training.replicas import RemoteReplica

    s, agent = served
    sick = "vLLM at unix:/x answered 503 to GET /health: EngineCore died"
    agent.supervisor = SimpleNamespace(state="ready", restarts=0, unhealthy=sick, describe=lambda: "ready")

    async def seen_by_loop() -> tuple[str, str | None]:
        remote = RemoteReplica(1, s.url, TOKEN)
        try:
            await remote.refresh()
            return remote.state, remote.unhealthy
        finally:
            await remote.stop()

    try:
        assert asyncio.run(seen_by_loop()) == ("ready", sick)
        agent.supervisor.unhealthy = None
        assert asyncio.run(seen_by_loop()) == ("ready", None)
    finally:
        agent.supervisor = None


def test_sync_then_a_staged_update_lands_only_at_its_commit(served: tuple[ServedApp, InMemory]) -> None:
    s, agent = served
    primary = _primary()
    remotes = Remotes([s.url], TOKEN, first=1, min_mb_s=MB_S)
    load_id, _ = remotes.sync(1, primary)
    assert load_id == "load-1" and all(torch.equal(agent.ranks[0][n], primary[n]) for n in primary)
    assert remotes.checksums() == [weights_checksum(sorted(primary.items()))]

    new_a = (primary["a.weight"].float() + 1).to(torch.bfloat16)
    assert remotes.stage(7, lambda: iter([("a.weight", new_a)]), sizes({"a.weight": new_a})) == []
    assert agent.staged[0][0] == 7  # rank 0's staging, of run 7
    assert torch.equal(agent.ranks[0]["a.weight"], primary["a.weight"])  # staged: nothing served changed yet
    assert remotes.commit(7) == []
    assert torch.equal(agent.ranks[0]["a.weight"], new_a) and torch.equal(agent.ranks[0]["b.bias"], primary["b.bias"])
    assert not agent.staged

    assert remotes.stage(8, lambda: iter([("a.weight", primary["a.weight"])]),
                         sizes({"a.weight": primary["a.weight"]})) == []
    remotes.discard()  # a refused update: the agent drops its staging, and a commit of it is refused
    assert not agent.staged
    remotes.staged[1] = 8
    assert remotes.commit(8) == [1] and 1 not in remotes.synced  # lost: the API takes it out of routing


def test_a_restart_between_sync_and_stage_is_reported_not_written(served: tuple[ServedApp, InMemory]) -> None:
    s, agent = served
    remotes = Remotes([s.url], TOKEN, first=2, min_mb_s=MB_S)
    remotes.sync(2, _primary())
    agent.restart()
    assert remotes.stage(3, lambda: iter([("b.bias", torch.ones(100))]), {"b.bias": 400}) == [2]
    assert 2 not in remotes.synced and not agent.staged
    assert remotes.commit(3) == []  # nothing synced is left to write
    assert remotes.resync(_primary()) == []


def test_bad_transfers_are_refused_before_anyone_joins(served: tuple[ServedApp, InMemory]) -> None:
    s, agent = served
    nonce = "n" * 32
    with _client(s.url) as c:
        def receive(**body: Any) -> httpx.Response:
            return c.post("/loop/replica/receive", json={"nonce": nonce, "kind": "stage", "names": ["a.weight"],
                                                         **body})

        assert receive(kind="copy").status_code == 400
        assert receive(names=[]).status_code == 400
        r = receive(names=["zzz"])
        assert r.status_code == 400 and "same model" in r.json()["detail"]
        r = receive(kind="sync")
        assert r.status_code == 400 and "every tensor" in r.json()["detail"]
        assert receive(nonce="short").status_code == 400
        for bad in (0, -1, "60", True, 1e9):
            r = receive(op_timeout_s=bad)
            assert r.status_code == 400 and "op_timeout_s" in r.json()["detail"], bad
        r = receive(load_id="load-0")
        assert r.status_code == 409 and "restarted" in r.json()["detail"]
        r = c.post("/loop/replica/commit", json={"run_id": 5})
        assert r.status_code == 409 and "nothing staged" in r.json()["detail"]
        assert c.get("/loop/replica/transfer/" + "x" * 32).status_code == 404
    assert agent.transfers == 0


def test_a_sender_that_never_joins_breaks_off_and_frees_the_agent(served: tuple[ServedApp, InMemory],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    s, agent = served
    monkeypatch.setattr(agent_mod, "STORE_TIMEOUT_S", 3.0)
    monkeypatch.setattr(agent_mod, "BUSY_WAIT_S", 0.2)
    nonce = "q" * 32
    with _client(s.url) as c:
        assert c.post("/loop/replica/receive", json={"nonce": nonce, "kind": "stage", "names": ["b.bias"]}).json()[
            "accepted"]
        busy = c.post("/loop/replica/receive", json={"nonce": "p" * 32, "kind": "stage", "names": ["b.bias"]})
        assert busy.status_code == 409  # one transfer at a time

        deadline = time.monotonic() + 60
        while not (res := c.get(f"/loop/replica/transfer/{nonce}").json())["done"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert not res["ok"] and "broke off" in res["detail"] and not agent.staged
    remotes = Remotes([s.url], TOKEN, first=1, min_mb_s=MB_S)  # and the next transfer works
    assert remotes.sync(1, _primary())[0] == "load-1"


class BreaksMidway(InMemory):
    """An agent that stops receiving after the first tensor of a staged update (its sockets stay open, as on a host
    that hangs: the sender's broadcast to it times out)."""

    breaks_rank = 0

    def _receive(self, nonce: str, kind: str, run_id: int, names: list[str], buffers: list[Any],
                 op_s: float = 600.0, rank: int = 0) -> None:
        class Gone(list):  # type: ignore[type-arg]
            def __iter__(self) -> Iterator[Any]:
                yield self[0]
                raise ConnectionError("the host went away")

        breaks = kind == "stage" and rank == self.breaks_rank
        super()._receive(nonce, kind, run_id, names, Gone(buffers) if breaks else buffers, op_s, rank)


def test_several_agents_stage_one_pass_of_the_update_and_commit_together(tmp_path: Path) -> None:
    with _agents(tmp_path, InMemory, InMemory, InMemory) as served:
        primary = _primary()
        remotes = Remotes([s.url for s, _ in served], TOKEN, first=1, min_mb_s=MB_S)
        assert remotes.resync(primary) == []  # nothing synced yet: nothing to send
        for k in (1, 2, 3):
            remotes.sync(k, primary)
        made: list[int] = []
        new = {"a.weight": (primary["a.weight"].float() * 2).to(torch.bfloat16), "b.bias": primary["b.bias"] - 1}

        def changed() -> Iterator[tuple[str, torch.Tensor]]:
            made.append(1)  # the update's tensors are made once, whatever the number of agents
            yield from new.items()

        assert remotes.stage(4, changed, sizes(new)) == []
        assert made == [1] and remotes.staged == {1: 4, 2: 4, 3: 4}
        one = sum(t.numel() * t.element_size() for t in new.values())
        assert remotes.figures["remote_staged"] == 3.0 and remotes.figures["remote_stage_mb"] == 3 * one / 1e6
        assert all(torch.equal(a.ranks[0]["a.weight"], primary["a.weight"]) for _, a in served)  # not yet
        assert remotes.commit(4) == []
        for _, agent in served:
            assert torch.equal(agent.ranks[0]["a.weight"], new["a.weight"])
            assert torch.equal(agent.ranks[0]["b.bias"], new["b.bias"])
            assert torch.equal(agent.ranks[0]["c.weight"], primary["c.weight"]) and not agent.staged
        assert len(set(remotes.checksums())) == 1

        served[1][1].restart()  # a restore while one agent restarted: the others get the weights, it does not
        assert remotes.resync(primary) == [2] and sorted(remotes.synced) == [1, 3]
        assert torch.equal(served[0][1].ranks[0]["a.weight"], primary["a.weight"])
        assert not torch.equal(served[1][1].ranks[0]["a.weight"], primary["a.weight"])
        sums = remotes.checksums()
        assert sums[1] == "" and sums[0] == sums[2]


def test_an_agent_lost_mid_stage_is_reported_and_the_others_switch(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remotes_mod, "FLOOR_S", 5.0)  # each broadcast's limit
    with _agents(tmp_path, InMemory, BreaksMidway, InMemory) as served:
        primary = _primary()
        remotes = Remotes([s.url for s, _ in served], TOKEN, first=1, min_mb_s=MB_S)
        for k in (1, 2, 3):
            remotes.sync(k, primary)
        new = {"a.weight": (primary["a.weight"].float() + 3).to(torch.bfloat16), "b.bias": primary["b.bias"] * 5}
        assert remotes.stage(9, lambda: iter(new.items()), sizes(new)) == [2]
        assert sorted(remotes.synced) == [1, 3] and not served[1][1].staged
        assert remotes.figures["remote_staged"] == 2.0
        assert remotes.commit(9) == []  # the lost one is no longer synced: the API syncs it before it serves again
        assert torch.equal(served[0][1].ranks[0]["b.bias"], new["b.bias"])
        assert torch.equal(served[2][1].ranks[0]["b.bias"], new["b.bias"])
        assert torch.equal(served[1][1].ranks[0]["b.bias"], primary["b.bias"])  # nothing written there
        assert remotes.sync(2, primary)[0] == "load-1"  # and it can be synced again


RELEASE = threading.Event()  # set when a test ends: a hung agent's threads go on (and fail), freeing its server


@pytest.fixture
def release() -> Iterator[None]:
    RELEASE.clear()
    yield
    RELEASE.set()


class HangsMidStage(InMemory):
    """An agent whose host stops mid-stage: it takes the first tensor, then neither receives nor answers about
    the transfer, its sockets open (a frozen host, not a dead one)."""

    def _receive(self, nonce: str, kind: str, run_id: int, names: list[str], buffers: list[Any],
                 op_s: float = 600.0, rank: int = 0) -> None:
        class Stuck(list):  # type: ignore[type-arg]
            def __iter__(self) -> Iterator[Any]:
                yield self[0]
                RELEASE.wait()
                raise ConnectionError("the host came back too late")

        if kind == "stage":
            self.stuck = nonce
        super()._receive(nonce, kind, run_id, names, Stuck(buffers) if kind == "stage" else buffers, op_s, rank)

    def result(self, nonce: str) -> dict[str, Any]:
        if nonce == getattr(self, "stuck", None):
            RELEASE.wait()  # frozen: its account never comes
        return super().result(nonce)


class HangsAtCommit(InMemory):
    def commit(self, body: dict[str, Any]) -> dict[str, Any]:
        RELEASE.wait()
        return super().commit(body)


def _three_synced(served: list[tuple[ServedApp, InMemory]]) -> tuple[Remotes, dict[str, torch.Tensor]]:
    primary = _primary()
    remotes = Remotes([s.url for s, _ in served], TOKEN, first=1, min_mb_s=MB_S)
    for k in (1, 2, 3):
        remotes.sync(k, primary)
    return remotes, primary


def test_an_agent_hung_mid_stage_holds_the_others_only_for_its_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, release: None) -> None:
    monkeypatch.setattr(remotes_mod, "FLOOR_S", 3.0)  # the limit of a tensor this small; 900 s before the limit
    monkeypatch.setattr(remotes_mod, "STATUS_TIMEOUT_S", 2.0)  # a poll of its account that gets no answer
    with _agents(tmp_path, InMemory, HangsMidStage, InMemory) as served:
        remotes, primary = _three_synced(served)
        new = {"a.weight": (primary["a.weight"].float() + 3).to(torch.bfloat16), "b.bias": primary["b.bias"] * 5}
        t0 = time.monotonic()
        assert remotes.stage(9, lambda: iter(new.items()), sizes(new)) == [2]
        waited = time.monotonic() - t0
        # its limit (3 s), then its account asked for and not given (a poll's limit, then the few seconds a failed
        # transfer's account is waited for)
        assert waited < 3.0 + 2.0 + remotes_mod.ACCOUNT_WAIT_S + 5.0, waited
        assert sorted(remotes.synced) == [1, 3] and remotes.staged == {1: 9, 3: 9}
        assert remotes.commit(9) == []
        for i in (0, 2):  # the others switched, with every tensor of the update
            assert all(torch.equal(served[i][1].ranks[0][n], new[n]) for n in new)
        assert torch.equal(served[1][1].ranks[0]["b.bias"], primary["b.bias"]) and not served[1][1].staged
        print(f"a hung agent held the stage {waited:.1f} s")
        RELEASE.set()  # before its server stops (which waits for the requests it still holds)


def test_an_agent_hung_in_its_commit_is_given_up_within_the_copys_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, release: None) -> None:
    monkeypatch.setattr(remotes_mod, "FLOOR_S", 2.0)
    with _agents(tmp_path, InMemory, HangsAtCommit, InMemory) as served:
        remotes, primary = _three_synced(served)
        new = {"b.bias": primary["b.bias"] + 7}
        assert remotes.stage(4, lambda: iter(new.items()), sizes(new)) == []
        assert remotes.staged_bytes == 400
        t0 = time.monotonic()
        assert remotes.commit(4) == [2]  # the pause this runs in is held 2 s, not the transport's minutes
        assert time.monotonic() - t0 < 2.0 + 3.0
        assert sorted(remotes.synced) == [1, 3]  # out of routing: synced whole before it serves again
        assert torch.equal(served[0][1].ranks[0]["b.bias"], new["b.bias"])
        assert torch.equal(served[2][1].ranks[0]["b.bias"], new["b.bias"])
        RELEASE.set()


def test_an_agent_left_out_of_the_pause_is_not_committed_and_is_synced_whole_later(tmp_path: Path) -> None:
    with _agents(tmp_path, InMemory, InMemory, InMemory) as served:
        remotes, primary = _three_synced(served)
        new = {"b.bias": primary["b.bias"] + 7}
        assert remotes.stage(4, lambda: iter(new.items()), sizes(new)) == []
        assert remotes.leave([2]) == [2]  # its vLLM did not pause: it serves on, so nothing is written into it
        assert remotes.commit(4) == [] and sorted(remotes.synced) == [1, 3]
        assert torch.equal(served[0][1].ranks[0]["b.bias"], new["b.bias"])
        assert torch.equal(served[1][1].ranks[0]["b.bias"], primary["b.bias"])
        assert torch.equal(served[2][1].ranks[0]["b.bias"], new["b.bias"])
        live = {**primary, **new}
        remotes.sync(2, live)
        assert torch.equal(served[1][1].ranks[0]["b.bias"], new["b.bias"]) and len(set(remotes.checksums())) == 1


def test_every_limit_grows_with_the_bytes_moved() -> None:
    assert remotes_mod.limit_s(0, 20.0) == remotes_mod.FLOOR_S
    assert remotes_mod.limit_s(2_000_000_000, 20.0) == remotes_mod.FLOOR_S + 100.0  # 2 GB at 20 MB/s
    assert remotes_mod.limit_s(10**9, 500.0) < remotes_mod.limit_s(10**9, 20.0)
    assert sizes({"b": torch.zeros(3, dtype=torch.float16), "a": torch.zeros(2, 2)}) == {"a": 16, "b": 6}


# --- tensor parallel: each worker rank moves its own shards to the same rank of the agent -----------------------
def _both_ranks(fn: Any) -> list[Any]:
    """fn(rank) for ranks 0 and 1 at once, as the worker's two rank processes run their transfers."""
    out: list[Any] = [None, None]

    def run(r: int) -> None:
        try:
            out[r] = fn(r)
        except Exception as e:  # noqa: BLE001 - the test reads it
            out[r] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_each_rank_syncs_stages_and_commits_its_own_shards_at_once(tmp_path: Path) -> None:
    with _agents(tmp_path, TwoRanks) as [(s, agent)]:
        primary = [_primary(0), _primary(1)]
        remotes = [Remotes([s.url], TOKEN, first=1, min_mb_s=MB_S, rank=r, world=2) for r in (0, 1)]
        assert _both_ranks(lambda r: remotes[r].sync(1, primary[r])[0]) == ["load-1", "load-1"]
        for r in (0, 1):
            assert all(torch.equal(agent.ranks[r][n], primary[r][n]) for n in primary[r]), r
        assert [rm.checksums() for rm in remotes] == [[weights_checksum(sorted(p.items()))] for p in primary]
        assert agent.status()["tensor_parallel"] == 2

        new = [{"a.weight": (p["a.weight"].float() + 1 + r).to(torch.bfloat16)} for r, p in enumerate(primary)]
        assert _both_ranks(lambda r: remotes[r].stage(4, lambda: iter(new[r].items()), sizes(new[r]))) == [[], []]
        assert sorted(agent.staged) == [0, 1] and agent.status()["staged_run"] == 4
        assert torch.equal(agent.ranks[1]["a.weight"], primary[1]["a.weight"])  # nothing served changed yet
        assert _both_ranks(lambda r: remotes[r].commit(4)) == [[], []]
        for r in (0, 1):
            assert torch.equal(agent.ranks[r]["a.weight"], new[r]["a.weight"]), r
            assert torch.equal(agent.ranks[r]["b.bias"], primary[r]["b.bias"]), r
        assert not agent.staged and agent.transfers == 4


def test_a_replica_with_another_tensor_parallel_or_rank_is_refused_before_anyone_joins(tmp_path: Path) -> None:
    with _agents(tmp_path, TwoRanks) as [(s, agent)]:
        with pytest.raises(remotes_mod.RemoteError, match="tensor parallel 2, loop's with 1.*--tensor-parallel 1"):
            Remotes([s.url], TOKEN, first=1, min_mb_s=MB_S).sync(1, _primary())
        with _client(s.url) as c:
            for rank in (2, -1, "0", True):
                r = c.post("/loop/replica/receive", json={"nonce": "n" * 32, "kind": "stage", "names": ["b.bias"],
                                                          "rank": rank})
                assert r.status_code == 400 and "rank" in r.json()["detail"], rank
            assert c.get("/loop/replica/checksum", params={"rank": 5}).status_code == 400
            assert c.post("/loop/replica/discard", content=b"[1]").status_code == 400
        assert agent.transfers == 0


class TwoRanksBreakOnOne(BreaksMidway):
    world = 2
    breaks_rank = 1


def test_a_stage_lost_on_one_rank_is_not_committed_on_that_rank(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1's part breaks while rank 0's lands: rank 1 reports the replica lost (and cannot commit it), which
    the worker's ranks then agree on (tests/unit/worker/test_remotes.py), so it leaves routing torn-free."""
    monkeypatch.setattr(remotes_mod, "FLOOR_S", 5.0)
    with _agents(tmp_path, TwoRanksBreakOnOne) as [(s, agent)]:
        primary = [_primary(0), _primary(1)]
        remotes = [Remotes([s.url], TOKEN, first=1, min_mb_s=MB_S, rank=r, world=2) for r in (0, 1)]
        _both_ranks(lambda r: remotes[r].sync(1, primary[r]))
        new = [{n: p[n] * 2 for n in ("b.bias", "c.weight")} for p in primary]
        assert _both_ranks(lambda r: remotes[r].stage(5, lambda: iter(new[r].items()), sizes(new[r]))) == [[], [1]]
        assert sorted(agent.staged) == [0] and agent.status()["staged_run"] == 5
        remotes[1].staged[1], remotes[1].synced[1] = 5, "load-1"  # as if it had not noticed: the agent refuses
        assert remotes[1].commit(5) == [1]
        assert torch.equal(agent.ranks[1]["b.bias"], primary[1]["b.bias"])
        remotes[0].discard()  # rank 0's part is dropped (else the next stage or sync of rank 0 replaces it)
        assert not agent.staged
