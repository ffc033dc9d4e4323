"""Replicas on other hosts: the worker's side of keeping them on replica 0's version (loop/replica/agent.py is theirs).

With `loop serve --remote-replicas URL,...` a replica runs beside a `loop replica` agent on another host: the agent owns
its vLLM (reached by nobody else) and maps its weights as the worker maps replica 0's. Nothing is shared in memory,
so every write crosses the network (loop/replica/transfer.py), in two phases:
1. stage (`Train`, before any pause): for each vLLM tensor the update touches, its content after the update is
   made here one tensor at a time (`UpdatePlan`: a copy of the live tensor with the trained views' new values and
   the row-ordered copies written into it, exactly what `Apply` will leave in replica 0) and sent to every synced
   agent at once (one group per agent, each tensor made once and broadcast to all of them together), which keeps
   it in staging memory beside its weights. A replica that cannot stage it is reported
   (`TrainDone.unstaged`): the API takes it out of routing before the pause, and syncs it again later.
2. commit (`Apply`, inside the pause the API holds on every routable replica, the remote ones through their
   agents): each staged agent copies its staging into its weights, a local device copy, all agents at once. One
   that fails is reported (`Applied.lost`) and leaves routing before the API resumes. So no client sees version
   n+1 from one replica and n from another after the switch.
A whole sync (a replica that joined or restarted, and a restore, which writes inside its own pause) sends every
vLLM tensor straight into the paused agent's weights (a restore: into every synced agent's at once).
Tensor parallel: each worker rank has its own `Remotes` (`rank`, `world`) and moves its own shards to the same rank
of every agent (which must run the same tensor parallel), all ranks at once; the worker unites what each rank
reports (`Worker.agreed_lost`), so a replica that missed one rank's part leaves routing on every rank.

An agent that restarted holds other weights (its load id changed): it is skipped and reported, as for local
replicas. One that hangs (a frozen host, a wedged link) is given up after a limit scaled by what it must move
(`limit_s`: 30 s plus the bytes at `Settings.remote_min_mb_s`): each tensor of a transfer, each commit. So it holds
an update, and the pause a commit runs in, for that long at most; the others go on and it is synced again later.
Tests: tests/unit/worker/test_remotes.py; tests/unit/replica/test_agent.py; tests/e2e/test_remote_replica_e2e.py.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("loop.worker")

STATUS_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 30.0  # a request the agent answers at once (it waits a few seconds at most for its lock)
FLOOR_S = 30.0  # of every limit: a host's hiccup is not a hang
COPY_FACTOR = 25.0  # a commit (a local copy on the agent) is given the bytes at this many times the link's rate
HASH_MB_S = 50.0  # the slowest an agent is waited for while it hashes its weights (a checksum)
ACCOUNT_WAIT_S = 5.0  # after a transfer failed here, how long the agent may take to say why (a hung one never does)


def limit_s(nbytes: int, mb_s: float) -> float:
    """How long moving `nbytes` at no less than `mb_s` MB/s may take before the other side counts as hung."""
    return FLOOR_S + nbytes / (mb_s * 1e6)


def sizes(tensors: dict[str, Any]) -> dict[str, int]:
    """Each tensor's bytes, by name, in name order: what a transfer of them names and how long it may take."""
    return {n: tensors[n].numel() * tensors[n].element_size() for n in sorted(tensors)}


class RemoteError(RuntimeError):
    """A remote replica could not take a transfer (unreachable, restarted, another model, a failed transfer)."""


# --- the update in vLLM's own terms ------------------------------------------------------------------------------
def _homes(vllm_tensors: dict[str, Any], params: list[Any]) -> dict[str, list[Any]]:
    """Which vLLM tensor each tensor of `params` lies in (by address range on its device): name -> params."""
    ranges = [(name, t.device, t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
              for name, t in vllm_tensors.items()]
    out: dict[str, list[Any]] = {}
    for prm in params:
        start = prm.data_ptr()
        end = start + max(1, prm.numel()) * prm.element_size()
        home = next((name for name, dev, lo, hi in ranges if dev == prm.device and lo <= start and end <= hi), None)
        if home is None:
            raise RemoteError(f"a weight of shape {tuple(prm.shape)} lies in none of vLLM's tensors")
        out.setdefault(home, []).append(prm)
    return out


def _same_place(out: Any, home: Any, view: Any) -> Any:
    """`view` (inside `home`) seen in `out`, a copy of `home` with the same layout."""
    if view.dtype != home.dtype:
        raise RemoteError(f"a {view.dtype} weight inside a {home.dtype} vLLM tensor: cannot place it by address")
    offset = (view.data_ptr() - home.data_ptr()) // view.element_size()
    return out.as_strided(view.size(), view.stride(), out.storage_offset() + offset)


class UpdatePlan:
    """Which vLLM tensors an update touches, and (`tensors()`) each one's content once it is written, made one at a
    time without writing anything: what `Apply` leaves in replica 0 (the views' copies, then `write_back`'s rows)."""

    def __init__(self, model: Any, vllm_tensors: dict[str, Any], values: dict[Any, Any]) -> None:
        self.vllm_tensors, self.values = vllm_tensors, values
        rows = getattr(model, "loop_rows", {})  # name -> (region in vLLM's memory, row index) of copies
        self.row_of = {id(model.get_parameter(name)): (region, index) for name, (region, index) in rows.items()}
        self.view_homes = _homes(vllm_tensors, [prm for prm in values if id(prm) not in self.row_of])
        self.copy_homes: dict[str, list[Any]] = {}
        for prm in values:
            if id(prm) in self.row_of:
                (home_name,) = _homes(vllm_tensors, [self.row_of[id(prm)][0]])
                self.copy_homes.setdefault(home_name, []).append(prm)
        self.names = sorted(set(self.view_homes) | set(self.copy_homes))

    def tensors(self, tick: Callable[[], None] | None = None) -> Iterator[tuple[str, Any]]:
        import torch

        with torch.no_grad():
            for name in self.names:
                home = self.vllm_tensors[name]
                if not home.is_contiguous():
                    raise RemoteError(f"vLLM's {name} is not contiguous: its staged copy would not match its layout")
                out = home.clone()
                for prm in self.view_homes.get(name, []):
                    _same_place(out, home, prm).copy_(self.values[prm])
                for prm in self.copy_homes.get(name, []):
                    region, index = self.row_of[id(prm)]
                    _same_place(out, home, region).index_copy_(0, index, self.values[prm].reshape(len(index), -1))
                yield name, out
                del out
                if tick is not None:
                    tick()

    def sizes(self) -> dict[str, int]:
        """The touched tensors' bytes, by name, in the order `tensors()` makes them."""
        return sizes({n: self.vllm_tensors[n] for n in self.names})


@dataclass
class _Leg:
    """One agent's side of a transfer: its replica, the transfer's nonce, its transfer port, the group once open,
    and what failed on this side."""

    k: int
    nonce: str
    port: int
    group: Any = None
    failure: BaseException | None = None


# --- the agents -------------------------------------------------------------------------------------------------
class Remotes:
    """The worker's view of replicas first..first+len(urls)-1, each behind a `loop replica` agent at its URL."""

    def __init__(self, urls: list[str], token: str | None, first: int, *, min_mb_s: float,
                 device: str = "cpu", rank: int = 0, world: int = 1) -> None:
        self.urls, self.token, self.first = list(urls), token, first
        self.device = device
        # tensor parallel: this worker rank's shards go to the same vLLM rank of each agent (every rank its own)
        self.rank, self.world = rank, world
        self.min_mb_s = min_mb_s  # Settings.remote_min_mb_s
        self.synced: dict[int, str] = {}  # replica -> the agent's load id when it was synced
        self.staged: dict[int, int] = {}  # replica -> the run whose update it holds in staging
        self.staged_bytes = 0  # of that staging (what a commit copies)
        self.weight_bytes = 0  # of the whole weights, as last synced (what a checksum hashes)
        self.figures: dict[str, float] = {}  # the last stage's and commit's cost (the run's metrics carry them)
        self._client: Any = None

    def owns(self, k: int) -> bool:
        return self.first <= k < self.first + len(self.urls)

    def url(self, k: int) -> str:
        if not self.owns(k):
            raise RemoteError(f"replica {k} is not a remote replica")
        return self.urls[k - self.first].rstrip("/")

    def _http(self) -> Any:
        if self._client is None:
            import httpx

            self._client = httpx.Client(headers={"authorization": f"Bearer {self.token}"} if self.token else {},
                                        timeout=STATUS_TIMEOUT_S, trust_env=False)
        return self._client

    def status(self, k: int) -> dict[str, Any]:
        try:
            r = self._http().get(f"{self.url(k)}/loop/replica")
        except Exception as e:  # noqa: BLE001 - any failure to reach it says the same
            raise RemoteError(f"remote replica {k} ({self.url(k)}) cannot be reached: {e}") from e
        if r.status_code != 200:
            raise RemoteError(f"remote replica {k} ({self.url(k)}) answered {r.status_code}: {r.text[:300]}")
        return dict(r.json())

    def forget(self) -> None:
        """Replica 0 reloaded (or the worker restarted): every remote replica must be synced again."""
        self.synced.clear()
        self.staged.clear()

    # --- transfers ---
    def _transfer(self, ks: list[int], kind: str, named: Iterator[tuple[str, Any]], names: dict[str, int],
                  run_id: int = 0, load_ids: dict[int, str] | None = None) -> dict[int, dict[str, Any] | RemoteError]:
        """Agents `ks` each check and accept the transfer (`names`: name -> bytes, kind sync or stage); then each
        joins a group with this worker and `named`'s tensors, read once, go to all of them together in that order;
        each agent's own account of it decides. Each tensor may take `limit_s` of the largest: an agent that has
        not taken it by then is given up (its group times out) and the others go on. The agents wait for the next
        tensor longer than that (one limit for every agent that could hang before it), so a hang costs no one
        else their transfer. Returns each agent's result, or the RemoteError that says why it has none."""
        from loop.replica.transfer import backend_for, close, local_address_towards, open_group, send_to_all

        op_s = limit_s(max(names.values(), default=0), self.min_mb_s)
        out: dict[int, dict[str, Any] | RemoteError] = {}
        legs: list[_Leg] = []  # the agents that accepted
        for k in ks:
            try:
                st = self.status(k)
                if not st.get("ready"):
                    raise RemoteError(f"remote replica {k} is not ready ({st.get('state')})")
                want = (load_ids or {}).get(k)
                if want is not None and st.get("load_id") != want:
                    raise RemoteError(f"remote replica {k} restarted (load {want} gone, now {st.get('load_id')})")
                nonce = secrets.token_hex(16)
                self._post(k, "/loop/replica/receive", {"nonce": nonce, "kind": kind, "run_id": run_id,
                                                        "names": list(names), "load_id": st.get("load_id"),
                                                        "op_timeout_s": op_s * (len(ks) + 1), "rank": self.rank,
                                                        "world": self.world})
                legs.append(_Leg(k, nonce, int(st["transfer_port"])))
            except RemoteError as e:
                out[k] = e
        for leg in legs:  # every agent is already joining: each group opens without waiting
            host = urlsplit(self.url(leg.k)).hostname or "127.0.0.1"
            try:
                leg.group = open_group(host, leg.port, leg.nonce, 0, bind=local_address_towards(host, leg.port),
                                       backend=backend_for(self.device), timeout_s=op_s)
            except Exception as e:  # noqa: BLE001 - the agent's account below says more when it has one
                leg.failure = e
        receivers = [leg for leg in legs if leg.group is not None]
        sent = 0
        try:
            if receivers:
                sent, broken = send_to_all([leg.group for leg in receivers], (t for _, t in named))
                for j, e in broken.items():
                    receivers[j].failure = e
        except Exception as e:  # noqa: BLE001 - making the tensors failed: no agent has the whole transfer
            for leg in receivers:
                leg.failure = e
        finally:
            for leg in legs:
                if leg.group is not None:
                    close(leg.group)
        for leg in legs:
            result = self._outcome(leg, kind, op_s)
            if isinstance(result, dict):
                result["bytes"] = sent
            out[leg.k] = result
        return out

    def _outcome(self, leg: _Leg, kind: str, op_s: float) -> dict[str, Any] | RemoteError:
        """The agent's own account of its part of a transfer (waited for: the last tensor's limit once everything
        was sent; briefly when this side already failed)."""
        failure = leg.failure
        deadline = time.monotonic() + ACCOUNT_WAIT_S + (0.0 if failure else op_s)
        while True:
            try:
                r = self._http().get(f"{self.url(leg.k)}/loop/replica/transfer/{leg.nonce}",
                                     timeout=STATUS_TIMEOUT_S)
                result = dict(r.json()) if r.status_code == 200 else {"done": True, "ok": False,
                                                                      "detail": r.text[:300]}
            except Exception as e:  # noqa: BLE001
                result = {"done": True, "ok": False, "detail": f"cannot be reached: {e}"}
            if result.get("done") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if failure is not None or not result.get("ok"):
            return RemoteError(f"remote replica {leg.k}: the {kind} transfer failed: "
                               f"{result.get('detail') or failure or 'no answer'}")
        return result

    def sync(self, k: int, primary: dict[str, Any]) -> tuple[str, float]:
        """Every tensor of `primary` (replica 0's vLLM tensors) into agent k's weights; the caller paused it."""
        self.synced.pop(k, None)
        self.staged.pop(k, None)
        t0 = time.perf_counter()
        names = sizes(primary)
        body = self._transfer([k], "sync", ((n, primary[n]) for n in names), names)[k]
        if isinstance(body, RemoteError):
            raise body
        self.synced[k], self.weight_bytes = str(body["load_id"]), body["bytes"]
        ms = (time.perf_counter() - t0) * 1000
        log.info("remote replica %d (load %s) synced from replica 0 in %.1f ms (%.0f MB)", k, body["load_id"], ms,
                 body["bytes"] / 1e6)
        return self.synced[k], ms

    def stage(self, run_id: int, changed: Callable[[], Iterator[tuple[str, Any]]], names: dict[str, int]) -> list[int]:
        """Phase 1: every synced agent receives the touched tensors' new content (`names`: name -> bytes, in the
        order `changed` makes them) into staging, all at once (each tensor made once, sent to every agent together).
        Returns the replicas that could not (each forgotten: the API syncs it again before it serves)."""
        failed, sent, t0 = [], 0, time.perf_counter()
        ks = sorted(self.synced)
        results = self._transfer(ks, "stage", changed(), names, run_id=run_id, load_ids=dict(self.synced)) if ks \
            else {}
        for k in ks:
            res = results[k]
            if isinstance(res, RemoteError):
                log.warning("%s; it leaves routing until it is synced again", res)
                self.synced.pop(k, None)
                self.staged.pop(k, None)
                failed.append(k)
            else:
                sent += res["bytes"]
                self.staged[k] = run_id
                self.staged_bytes = res["bytes"]
        self.figures = {"remote_stage_ms": (time.perf_counter() - t0) * 1000, "remote_stage_mb": sent / 1e6,
                        "remote_staged": float(len(self.staged))}
        return failed

    def _post(self, k: int, path: str, body: dict[str, Any], timeout_s: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        try:
            r = self._http().post(f"{self.url(k)}{path}", json=body, timeout=timeout_s)
        except Exception as e:  # noqa: BLE001
            raise RemoteError(f"remote replica {k} cannot be reached: {e}") from e
        if r.status_code != 200:
            raise RemoteError(f"remote replica {k} answered {r.status_code}: {r.text[:300]}")
        return dict(r.json())

    def commit(self, run_id: int) -> list[int]:
        """Phase 2, inside the pause: every agent that staged `run_id` writes it, all at once (the pause lasts the
        slowest one, not their sum; one that has not answered within the copy's limit is given up). Returns the
        synced replicas that are not on the new weights now (failed, hung, or never staged), each forgotten. A hung
        one may still write later: it is out of routing, and its next sync rewrites it whole."""
        t0 = time.perf_counter()
        copy_s = limit_s(self.staged_bytes, self.min_mb_s * COPY_FACTOR)

        def one(k: int) -> RemoteError | None:
            try:
                if self.staged.get(k) != run_id:
                    raise RemoteError(f"remote replica {k} did not stage run {run_id}")
                self._post(k, "/loop/replica/commit", {"run_id": run_id, "load_id": self.synced[k],
                                                       "rank": self.rank}, copy_s)
                return None
            except RemoteError as e:
                return e

        ks = sorted(self.synced)
        lost = []
        for k, err in zip(ks, self._each(one, ks)):
            if err is not None:
                log.warning("%s; it leaves routing until it is synced again", err)
                self.synced.pop(k, None)
                lost.append(k)
            self.staged.pop(k, None)
        self.figures["remote_commit_ms"] = (time.perf_counter() - t0) * 1000
        return lost

    def leave(self, replicas: list[int]) -> list[int]:
        """Forget these agents without a word to them (a write's pause left them serving, maybe hung): nothing is
        committed on them, and their next sync replaces what they staged. Returns those that were synced."""
        left = [k for k in replicas if self.synced.pop(k, None) is not None]
        for k in replicas:
            self.staged.pop(k, None)
        return left

    def _each(self, fn: Callable[[int], Any], ks: list[int]) -> list[Any]:
        """fn(k) for every k, in threads when there are several (each is an HTTP request to another host)."""
        if len(ks) <= 1:
            return [fn(k) for k in ks]
        self._http()  # made once, before the threads share it
        with ThreadPoolExecutor(max_workers=min(len(ks), 16), thread_name_prefix="loop-remote") as pool:
            return list(pool.map(fn, ks))

    def discard(self) -> None:
        """Drop what the agents staged (a refused or discarded update); best effort, a commit never follows."""
        def one(k: int) -> None:
            try:
                self._post(k, "/loop/replica/discard", {"rank": self.rank})
            except RemoteError as e:
                log.info("remote replica %d: could not drop its staging (%s); the next stage replaces it", k, e)

        self._each(one, sorted(self.staged))
        self.staged.clear()

    def resync(self, primary: dict[str, Any]) -> list[int]:
        """A write made inside a pause with nothing staged (a restore, a low-memory apply): every synced agent gets
        the whole weights now, inside the same pause, all agents at once; one that restarted since its sync is not
        written. Returns the replicas that did not get them (forgotten)."""
        ks = sorted(self.synced)
        if not ks:
            return []
        t0 = time.perf_counter()
        names = sizes(primary)
        results = self._transfer(ks, "sync", ((n, primary[n]) for n in names), names, load_ids=dict(self.synced))
        lost = []
        self.staged.clear()
        for k in ks:
            res = results[k]
            if isinstance(res, RemoteError):
                log.warning("%s; it leaves routing until it is synced again", res)
                self.synced.pop(k, None)
                lost.append(k)
        log.info("%d remote replicas synced from replica 0 in %.1f ms", len(ks) - len(lost),
                 (time.perf_counter() - t0) * 1000)
        return lost

    def checksums(self) -> list[str]:
        """Each remote replica's sha256 of its weights (as `weights_checksum` over its vLLM tensors by name), asked
        of all at once; "" for one not synced or not answering within the hash's limit."""
        def one(k: int) -> str:
            if k not in self.synced:
                return ""
            try:
                r = self._http().get(f"{self.url(k)}/loop/replica/checksum", params={"rank": self.rank},
                                     timeout=limit_s(self.weight_bytes, HASH_MB_S))
                return str(r.json()["checksum"]) if r.status_code == 200 else ""
            except Exception:  # noqa: BLE001 - not answering: no checksum
                return ""

        return self._each(one, [self.first + i for i in range(len(self.urls))])

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
