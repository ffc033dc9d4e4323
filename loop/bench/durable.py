"""`loop bench durable`: what making a version durable costs — the write, and serving while it happens.

Starts vLLM (with loop's plugin) on a model folder, attaches to its weights through the plugin's handles, then in
one run:
- writes the live weights as a checkpoint folder `--repeats` times with the worker's own writer
  (loop/worker/checkpoint.py: safetensors, fsync, rename), timing each and measuring its bytes;
- drives vLLM with `--clients` closed-loop clients (token-id prompts, `--max-tokens` answers) for `--seconds`
  alone, then for `--seconds` while checkpoints are written back to back, and prints generated tokens/s and p50/p99
  latency of both and their ratio.
vLLM is never paused here: the service writes a checkpoint outside the pause (it only holds the trainer's weights
lock, so the next update waits for the write), which is exactly what this measures.

    loop bench durable --model smollm2                                        (CPU)
    loop bench durable --model loop/bench/configs/qwen2-7b --dummy            (GPU)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from loop.bench import stop_group


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    p = sub.add_parser("durable", help="time and bytes to make a version durable, and serving while it is written")
    p.add_argument("--model", default="smollm2", help="model folder or 'smollm2'")
    p.add_argument("--dummy", action="store_true", help="random weights of the real size (--load-format dummy)")
    p.add_argument("--repeats", type=int, default=3, help="checkpoint writes timed")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20.0, help="length of each serving window")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.35)
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary folder)")
    p.add_argument("--json-out", default=None)
    p.set_defaults(func=main)


def _serve_window(url: str, model: str, args: argparse.Namespace, busy: threading.Event | None) -> dict[str, float]:
    """Closed-loop clients for args.seconds (while `busy` is set, if given); tokens/s and latencies."""
    stop_at = time.monotonic() + args.seconds
    lat: list[float] = []
    tokens = [0]
    failed = [0]
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            n = 0
            while time.monotonic() < stop_at and (busy is None or busy.is_set()):
                t = time.perf_counter()
                r = http.post("/v1/completions", json={
                    "model": model, "prompt": [1 + (i * 7 + n) % 50 + k for k in range(16)],
                    "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0.0})
                n += 1
                with lock:
                    if r.status_code == 200:
                        lat.append(time.perf_counter() - t)
                        tokens[0] += r.json()["usage"]["completion_tokens"]
                    else:
                        failed[0] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    lat.sort()
    pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: float("nan"))
    return {"tokens_per_s": tokens[0] / elapsed, "p50_s": pick(0.5), "p99_s": pick(0.99), "requests": len(lat),
            "failed": failed[0], "seconds": elapsed}


def main(args: argparse.Namespace) -> int:
    import torch

    from loop.bench.proxy import free_port
    from loop.bench.update import _start_vllm, _wait
    from loop.config import Settings
    from loop.model_cache import resolve_model
    from loop.worker.checkpoint import write_folder
    from loop.worker.handles import attach, read_handles
    from loop.worker.views import build_model, layout_of

    cuda = torch.cuda.is_available()
    model_path = resolve_model(args.model, Settings().cache_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out_root = Path(args.dir or tempfile.mkdtemp(prefix="loop-bench-durable-"))
    out_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="loop-bench-rt-") as rt:
        Path(rt).chmod(0o700)
        proc = _start_vllm(model_path, port, rt, args, cuda)
        try:
            _wait(url, proc)
            hs = read_handles(rt, wait_s=60)
            model = build_model(hs.meta["model_path"], attach(hs),
                                layout=layout_of(hs.meta))
            tensors = dict(model.named_parameters())
            served = hs.meta["model_path"]
            writes: list[float] = []
            nbytes = 0

            def write_once(i: int) -> float:
                nonlocal nbytes
                final = out_root / f"v{i:06d}"
                t = time.perf_counter()
                with torch.no_grad():
                    files = write_folder(final, Path(model_path), tensors)
                ms = (time.perf_counter() - t) * 1000
                nbytes = sum((final / f).stat().st_size for f in files)
                shutil.rmtree(final)
                return ms

            for i in range(args.repeats):
                writes.append(write_once(i))
            alone = _serve_window(url, served, args, None)
            busy = threading.Event()
            busy.set()
            during_writes: list[float] = []

            def writer() -> None:
                i = 1000
                while busy.is_set():
                    during_writes.append(write_once(i))
                    i += 1

            w = threading.Thread(target=writer)
            w.start()
            time.sleep(0.2)
            during = _serve_window(url, served, args, None)
            busy.clear()
            w.join()
            device = torch.cuda.get_device_name() if cuda else "cpu"
            med = statistics.median(writes)
            print(f"\ndurable write — {Path(model_path).name}, device {device}: {nbytes / 1e9:.3f} GB in "
                  f"{med:.0f} ms median of {len(writes)} ({nbytes / med / 1e6:.2f} GB/s); during serving "
                  f"{statistics.median(during_writes):.0f} ms median of {len(during_writes)}")
            print(f"  serving alone:        {alone['tokens_per_s']:.1f} tok/s, p50 {alone['p50_s']:.3f} s, "
                  f"p99 {alone['p99_s']:.3f} s, {alone['requests']} requests, {alone['failed']} failed")
            print(f"  while writing:        {during['tokens_per_s']:.1f} tok/s, p50 {during['p50_s']:.3f} s, "
                  f"p99 {during['p99_s']:.3f} s, {during['requests']} requests, {during['failed']} failed")
            ratio = during["tokens_per_s"] / alone["tokens_per_s"] if alone["tokens_per_s"] else float("nan")
            print(f"  serving during writes / alone: {ratio:.2f}x tokens/s; vLLM paused: never "
                  f"({args.clients} clients, {args.max_tokens}-token answers, {args.seconds:.0f} s windows)")
            if args.json_out:
                Path(args.json_out).write_text(json.dumps({
                    "device": device, "model": model_path, "bytes": nbytes, "write_ms": writes,
                    "write_ms_during_serving": during_writes, "alone": alone, "during": during, "ratio": ratio},
                    indent=1))
            return 0 if alone["failed"] == 0 and during["failed"] == 0 else 1
        finally:
            stop_group(proc)
            if args.dir is None:
                shutil.rmtree(out_root, ignore_errors=True)
            print("", file=sys.stderr)
