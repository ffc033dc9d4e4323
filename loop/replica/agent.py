"""`loop replica`: a replica of the served model on another host, kept on loop's version by loop's trainer.

What: the agent starts its own vLLM with loop's plugin (the same supervisor as `loop serve`: private Unix socket,
restarts, the weight-handle file), maps that vLLM's weights as the worker maps replica 0's, and answers one
`loop serve --remote-replicas URL` over HTTP, every route behind `LOOP_REPLICA_TOKEN`:
- vLLM's own routes (`/v1/*`, `/health`, `/metrics`, `/pause`, `/resume`, `/reset_prefix_cache`, `/is_paused`, ...)
  are forwarded to its socket, so loop routes chat to it and pauses it like a local replica, while vLLM's
  unauthenticated development routes never face the network;
- `GET /loop/replica`: ready?, vLLM's state, whether it fails its health probe (`unhealthy`), its load id (new
  after every restart), its tensor parallel, the transfer port;
- `POST /loop/replica/receive {nonce, kind, run_id, names, load_id, op_timeout_s, rank, world}`: checked at once
  (400/409 say what is wrong), then received in the background: join the transfer group `nonce` as rank 1
  (loop/replica/transfer.py) and take the named tensors of vLLM rank `rank`, in that order: kind "sync" straight
  into the weights (loop has paused this vLLM; every tensor must be named), kind "stage" into staging memory beside
  them; `GET /loop/replica/transfer/{nonce}` says how it ended (a sender that never joins: broken off after a
  minute);
- `POST /loop/replica/commit {run_id, load_id, rank}`: copy what run `run_id` staged for that rank into its weights
  (loop holds the pause); `POST /loop/replica/discard {rank}`; `GET /loop/replica/checksum?rank=r`: sha256 of that
  rank's weights by name.
Tensor parallel: with `--tensor-parallel N` (the same N as loop serve's: `world` must match) the agent maps each of
its vLLM's N ranks, and worker rank r of loop's trainer sends rank r's shards, all ranks at once: each rank has its
own transfer, staging and commit (one at a time per rank). loop's worker agrees across its ranks which replicas
took every rank's part, and one that missed any rank leaves routing until it is synced again whole.
A restart of its vLLM changes the load id: staging is dropped and loop syncs the replica again before routing to it.
Tests: tests/unit/replica/test_agent.py; tests/e2e/test_remote_replica_e2e.py.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from loop.config import Settings

log = logging.getLogger("loop.replica")

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade",
              "proxy-authenticate", "proxy-authorization", "authorization", "host"}
BUSY_WAIT_S = 5.0  # a transfer asked for while another runs waits this long for it, then is refused
STORE_TIMEOUT_S = 60.0  # a transfer whose sender never joins is broken off after this long
MAX_OP_TIMEOUT_S = 86400.0
RECEIVE_OP_S = 600.0  # the least a receiving agent waits for each tensor (see `receive`)


def transfer_bind(host: str) -> str:
    """The address gloo binds and advertises: the listen host, or this host's own address when it listens on all."""
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostbyname(socket.gethostname())
    return socket.gethostbyname(host)


class Agent:
    """The replica's weights, as mapped from its vLLM's handle file (one name -> tensor map per vLLM rank), and what
    loop staged for each rank."""

    def __init__(self, settings: Settings, supervisor: Any = None) -> None:
        self.settings = settings
        self.supervisor = supervisor
        self.store: Any = None
        self.ranks: list[dict[str, Any]] = []  # vLLM rank -> its tensors by name
        self.load_id: str | None = None
        self.device = "cpu"
        self.staged: dict[int, tuple[int, dict[str, Any]]] = {}  # rank -> (run, its new tensors)
        self.map_lock = threading.Lock()  # (re)mapping the handle file
        self.locks: dict[int, threading.Lock] = {}  # rank -> one transfer or commit at a time (its thread releases it)
        self.results: dict[str, dict[str, Any]] = {}  # transfer nonce -> how it ended
        self.transfers = 0

    # --- the weights ---
    def mapped(self) -> list[dict[str, Any]]:
        """vLLM's tensors by name, one map per rank, mapped again when its load id changed (a restart: new memory,
        staging dropped)."""
        from loop.worker.handles import HandleError, attach, read_handles

        with self.map_lock:
            try:
                hs = read_handles(self.settings.runtime_dir)
            except HandleError as e:
                raise HTTPException(503, f"this replica's vLLM has no weights to map yet: {e}") from None
            load_id = str(hs.meta["load_id"])
            if load_id != self.load_id:
                world = int(hs.meta["tp_size"])
                self.ranks, self.load_id, self.staged = [attach(hs, r) for r in range(world)], load_id, {}
                self.device = str(hs.meta.get("device", "cpu"))
                log.info("mapped the weights of load %s (%d tensors on %d ranks)", load_id,
                         sum(len(t) for t in self.ranks), world)
            return self.ranks

    def lock(self, rank: int) -> threading.Lock:
        return self.locks.setdefault(rank, threading.Lock())

    def _take(self, body: dict[str, Any], wait_s: float) -> tuple[int, threading.Lock]:
        """The request's rank (checked) and its lock, acquired: 409 when another transfer or commit holds it."""
        rank = self._rank(body, self.mapped())
        lock = self.lock(rank)
        if not lock.acquire(timeout=wait_s):
            raise HTTPException(409, f"another transfer or commit is running on rank {rank} of this replica; try "
                                     "again")
        return rank, lock

    def _rank(self, body: dict[str, Any], ranks: list[dict[str, Any]]) -> int:
        """The request's vLLM rank (0 when it names none), and its world checked against this vLLM's."""
        world, rank = body.get("world"), body.get("rank", 0)
        if world is not None and world != len(ranks):
            raise HTTPException(409, f"this replica's vLLM runs with tensor parallel {len(ranks)}, loop's with "
                                     f"{world}: start `loop replica --tensor-parallel {world}`")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < len(ranks):
            raise HTTPException(400, f"rank must be an integer in [0, {len(ranks)}), got {rank!r}")
        return rank

    def status(self) -> dict[str, Any]:
        sup = self.supervisor
        state = sup.state if sup is not None else "ready"
        load_id = None
        if state == "ready":
            with contextlib.suppress(HTTPException):
                self.mapped()
            load_id = self.load_id
        staged = {run for run, _ in self.staged.values()}
        return {"ready": state == "ready" and load_id is not None, "state": state, "load_id": load_id,
                "restarts": sup.restarts if sup is not None else 0,
                "unhealthy": sup.unhealthy if sup is not None else None,
                "describe": sup.describe() if sup is not None else "", "device": self.device,
                "tensor_parallel": len(self.ranks) or None, "transfer_port": self.settings.replica_transfer_port,
                "staged_run": next(iter(staged)) if len(staged) == 1 else None, "transfers": self.transfers}

    def _store(self) -> Any:
        with self.map_lock:
            if self.store is None:
                import datetime

                import torch.distributed as dist

                self.store = dist.TCPStore(transfer_bind(self.settings.host), self.settings.replica_transfer_port,
                                           None, True, datetime.timedelta(seconds=STORE_TIMEOUT_S),
                                           wait_for_workers=False)
            return self.store

    def receive(self, body: dict[str, Any]) -> dict[str, Any]:
        """Check a transfer and start receiving it in the background (the sender joins once this answered);
        `result(nonce)` says how it ended. One at a time per rank: 409 while another runs."""
        import torch

        kind, names = body.get("kind"), body.get("names")
        if kind not in ("sync", "stage"):
            raise HTTPException(400, f"kind must be 'sync' or 'stage', got {kind!r}")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
            raise HTTPException(400, "names must be a non-empty list of vLLM tensor names")
        nonce = str(body.get("nonce") or "")
        if len(nonce) < 16 or not nonce.isalnum():
            raise HTTPException(400, "nonce must be at least 16 letters or digits")
        op_s = body.get("op_timeout_s", RECEIVE_OP_S)
        if isinstance(op_s, bool) or not isinstance(op_s, (int, float)) or not 0 < op_s <= MAX_OP_TIMEOUT_S:
            raise HTTPException(400, f"op_timeout_s must be a number of seconds in (0, {MAX_OP_TIMEOUT_S:g}], got "
                                     f"{op_s!r}")
        rank, lock = self._take(body, BUSY_WAIT_S)
        try:
            tensors = self.mapped()[rank]
            if body.get("load_id") not in (None, self.load_id):
                raise HTTPException(409, f"this replica restarted: load {body.get('load_id')} is gone (now "
                                         f"{self.load_id}); sync it again")
            unknown = [n for n in names if n not in tensors]
            if unknown:
                raise HTTPException(400, f"this replica's vLLM has no tensor {unknown[0]!r} ({len(unknown)} unknown): "
                                         "is it serving the same model?")
            if kind == "sync" and sorted(names) != sorted(tensors):
                raise HTTPException(400, f"a sync names every tensor of the model: {len(names)} named, this replica "
                                         f"holds {len(tensors)}")
            if kind == "sync":
                self.staged.pop(rank, None)  # the weights are rewritten whole: an earlier staging no longer applies
                buffers = [tensors[n] for n in names]
            else:
                buffers = [torch.empty_like(tensors[n]) for n in names]
        except BaseException:
            lock.release()
            raise
        self.results[nonce] = {"done": False, "load_id": self.load_id}  # the memory it writes, whatever comes after
        # the sender gives up on this side sooner than that; waiting no less than the default only matters when the
        # sender's host hangs (a sender that died closes its sockets, which ends the wait at once)
        threading.Thread(target=self._receive, args=(nonce, kind, int(body.get("run_id") or 0), names, buffers,
                                                     max(float(op_s), RECEIVE_OP_S), rank),
                         name=f"loop-replica-receive-{rank}", daemon=True).start()
        return {"accepted": True, "load_id": self.load_id}

    def _receive(self, nonce: str, kind: str, run_id: int, names: list[str], buffers: list[Any],
                 op_s: float = RECEIVE_OP_S, rank: int = 0) -> None:
        from loop.replica.transfer import backend_for, close, open_group, receive

        t0 = time.perf_counter()
        group = None
        try:
            if buffers[0].is_cuda:  # NCCL's communicator belongs to the thread's current card: this rank's
                import torch

                torch.cuda.set_device(buffers[0].device)
            group = open_group("", 0, nonce, 1, bind=transfer_bind(self.settings.host),
                               backend=backend_for(self.device), store=self._store(), join_s=STORE_TIMEOUT_S,
                               timeout_s=op_s)
            n = receive(group, buffers)
            if kind == "stage":
                self.staged[rank] = (run_id, dict(zip(names, buffers)))
            with self.map_lock:  # ranks finish at once
                self.transfers += 1
            ms = (time.perf_counter() - t0) * 1000
            self.results[nonce] = {"done": True, "ok": True, "bytes": n, "ms": ms,
                                   "load_id": self.results[nonce]["load_id"]}
            log.info("%s of %d tensors of rank %d (%.0f MB) received in %.0f ms", kind, len(names), rank, n / 1e6, ms)
        except Exception as e:  # noqa: BLE001 - a broken transfer: nothing staged; loop syncs a broken sync again
            self.results[nonce] = {"done": True, "ok": False, "detail": f"the transfer broke off: "
                                                                        f"{type(e).__name__}: {e}"}
            log.warning("a %s transfer of rank %d broke off: %s", kind, rank, e)
        finally:
            if group is not None:
                close(group)
            while len(self.results) > 64:  # old results nobody asked for
                self.results.pop(next(iter(self.results)))
            self.lock(rank).release()

    def result(self, nonce: str) -> dict[str, Any]:
        if nonce not in self.results:
            raise HTTPException(404, f"no transfer {nonce!r} on this replica")
        return dict(self.results[nonce])

    def commit(self, body: dict[str, Any]) -> dict[str, Any]:
        import torch

        run_id = body.get("run_id")
        rank, lock = self._take(body, 600)
        try:
            tensors = self.mapped()[rank]
            if body.get("load_id") not in (None, self.load_id):
                raise HTTPException(409, f"this replica restarted: load {body.get('load_id')} is gone; sync it again")
            staged = self.staged.get(rank)
            if staged is None or staged[0] != run_id:
                have = f"run {staged[0]}" if staged else "nothing"
                raise HTTPException(409, f"nothing staged for run {run_id} on rank {rank} (staged: {have})")
            t0 = time.perf_counter()
            with torch.no_grad():
                for name, value in staged[1].items():
                    tensors[name].copy_(value)
            for dev in {t.device for t in tensors.values() if t.is_cuda}:
                torch.cuda.synchronize(dev)
            self.staged.pop(rank, None)
            ms = (time.perf_counter() - t0) * 1000
        finally:
            lock.release()
        log.info("run %s committed on rank %d in %.1f ms", run_id, rank, ms)
        return {"ms": ms, "load_id": self.load_id}

    def discard(self, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """Drop what rank `rank` staged (every rank's when the body names none)."""
        rank = (body or {}).get("rank")
        ranks = list(self.staged) if rank is None else [rank]
        had = {r: self.staged.pop(r)[0] for r in ranks if r in self.staged}
        return {"discarded": next(iter(had.values())) if had else None}

    def checksum(self, rank: int = 0) -> dict[str, Any]:
        from loop.worker.update import weights_checksum

        rank, lock = self._take({"rank": rank}, 600)
        try:
            tensors = self.mapped()[rank]
            return {"checksum": weights_checksum(sorted(tensors.items())), "load_id": self.load_id}
        finally:
            lock.release()


def _authorized(request: Request, token: str) -> bool:
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


def create_agent_app(settings: Settings, *, manage: bool = True, upstream: httpx.AsyncBaseTransport | None = None,
                     agent: Agent | None = None) -> FastAPI:
    """The agent's HTTP API. `manage`: start and stop its vLLM with the app (tests pass False with `upstream`, a
    fake vLLM transport, and their own `agent`)."""
    token = settings.replica_token
    if not token or len(token) < 16:
        raise ValueError("loop replica needs LOOP_REPLICA_TOKEN (at least 16 characters, the one loop serve has)")
    holder: dict[str, Any] = {"agent": agent}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sup = None
        if manage:
            from loop.vllm.process import VLLMSupervisor

            settings.ensure_dirs()
            sup = VLLMSupervisor(settings, park_s=settings.vllm_restart_window_s)
            await sup.start()
        if holder["agent"] is None:
            holder["agent"] = Agent(settings, sup)
        transport = upstream or httpx.AsyncHTTPTransport(uds=str(settings.vllm_socket))
        app.state.upstream = httpx.AsyncClient(transport=transport, base_url="http://vllm", timeout=None)
        try:
            yield
        finally:
            await app.state.upstream.aclose()
            if sup is not None:
                await sup.stop()

    app = FastAPI(title="loop replica", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def require_token(request: Request, call_next: Any) -> Response:
        if not _authorized(request, token):
            return JSONResponse({"detail": "this loop replica answers only its loop (Authorization: Bearer "
                                           "<LOOP_REPLICA_TOKEN>)"}, status_code=401)
        return await call_next(request)

    def the_agent() -> Agent:
        return holder["agent"]

    @app.get("/loop/replica")
    def status() -> dict[str, Any]:
        return the_agent().status()

    @app.post("/loop/replica/receive")
    def receive(body: dict[str, Any]) -> dict[str, Any]:
        return the_agent().receive(body)

    @app.get("/loop/replica/transfer/{nonce}")
    def result(nonce: str) -> dict[str, Any]:
        return the_agent().result(nonce)

    @app.post("/loop/replica/commit")
    def commit(body: dict[str, Any]) -> dict[str, Any]:
        return the_agent().commit(body)

    @app.post("/loop/replica/discard")
    async def discard(request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise HTTPException(400, "the body must be a JSON object like {\"rank\": 0}")
        return the_agent().discard(body)

    @app.get("/loop/replica/checksum")
    def checksum(rank: int = 0) -> dict[str, Any]:
        return the_agent().checksum(rank)

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(path: str, request: Request) -> Response:
        client: httpx.AsyncClient = request.app.state.upstream
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        req = client.build_request(request.method, "/" + path, params=request.query_params,
                                   content=await request.body(), headers=headers)
        try:
            reply = await client.send(req, stream=True)
        except httpx.TransportError as e:
            return JSONResponse({"detail": f"this replica's vLLM cannot be reached: {e}"}, status_code=503)
        out = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(reply.aiter_raw(), status_code=reply.status_code, headers=out,
                                 background=BackgroundTask(reply.aclose))

    return app
