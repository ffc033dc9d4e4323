"""`loop bench proxy`: how much latency the logging proxy adds on top of vLLM.

The same N chat requests go straight to vLLM and through loop, interleaved in one run (the order alternates
so drift — other load, thermal — hits both sides equally). Every request asks for exactly `--max-tokens` tokens
(`ignore_eos`, greedy) so both sides do the same work. Each prompt is sent twice per side: once whole (latency
until the full reply) and once streamed (time to the first `data:` event, TTFT). Prints p50 / p99 / mean for
both sides and the added latency and TTFT, also as paired differences (same prompt, back to back), which are
robust to load that drifts during the run. `--no-stream` measures whole replies only.

Without `--loop-url` it starts `loop serve` itself on a free port with a temporary data dir (and vLLM with it,
on its private Unix socket, unless `--vllm-url` attaches to a running one), and stops it afterwards. vLLM's
address is `unix:/path` or `http://host:port` (as /health's `vllm.address` reports it).

    loop bench proxy -n 50 --max-tokens 16
    loop bench proxy --vllm-url unix:/run/vllm/sock -n 100
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from loop.bench import stop_group
from loop.vllm.client import sync_client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stats:
    p50: float
    p99: float
    mean: float

    @classmethod
    def of(cls, xs: list[float]) -> "Stats":
        xs = sorted(xs)
        p99 = xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]
        return cls(statistics.median(xs), p99, statistics.fmean(xs))


def wait_healthy(url: str, timeout: float, proc: subprocess.Popen | None = None) -> dict:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"loop serve exited with code {proc.returncode}")
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            if r.status_code == 200:
                return r.json()
            last = r.json().get("vllm", {}).get("last_error") or r.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f} s: {last}")


@contextlib.contextmanager
def started_loop(vllm_url: str | None, model: str | None, timeout: float) -> Iterator[tuple[str, str]]:
    """Start `loop serve` on a free port; yield (loop url, vLLM's address)."""
    with tempfile.TemporaryDirectory(prefix="loop-bench-") as data_dir:
        port = free_port()
        cmd = [sys.executable, "-m", "loop.cli", "serve", "--port", str(port), "--data-dir", data_dir,
               "--no-worker", "--log-level", "warning"]
        cmd += ["--vllm-url", vllm_url] if vllm_url else []
        if model:
            cmd += ["--model", model]
        print(f"starting loop serve on :{port}{'' if vllm_url else ' (with vLLM)'} …", file=sys.stderr)
        proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            health = wait_healthy(f"http://127.0.0.1:{port}", timeout, proc)
            yield f"http://127.0.0.1:{port}", health["vllm"]["address"]
        finally:
            stop_group(proc)


def _ttft(client: httpx.Client, body: dict) -> float:
    """Seconds from sending a streamed request to its first `data:` event (the stream is read to its end)."""
    t0 = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data:"):
                first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("the stream ended without a data event")
    return first


def run_bench(loop_url: str, vllm_address: str, n: int, max_tokens: int, warmup: int = 3,
              stream: bool = True) -> dict[str, Stats]:
    direct = sync_client(vllm_address, timeout=600)
    proxied = httpx.Client(base_url=loop_url, timeout=600)
    model = direct.get("/v1/models").json()["data"][0]["id"]

    def body(i: int) -> dict:
        return {"model": model, "messages": [{"role": "user", "content": f"Count to ten. ({i})"}],
                "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}

    def timed(client: httpx.Client, i: int) -> float:
        t0 = time.perf_counter()
        r = client.post("/v1/chat/completions", json=body(i))
        dt = time.perf_counter() - t0
        r.raise_for_status()
        return dt

    for i in range(warmup):
        for client in (direct, proxied):
            timed(client, -1 - i)
            if stream:
                _ttft(client, body(-1 - i))
    times: dict[str, list[float]] = {"vllm": [], "loop": [], "vllm_ttft": [], "loop_ttft": []}
    for i in range(n):
        order = [("vllm", direct), ("loop", proxied)] if i % 2 == 0 else [("loop", proxied), ("vllm", direct)]
        for name, client in order:
            times[name].append(timed(client, i))
        if stream:
            for name, client in order:
                times[f"{name}_ttft"].append(_ttft(client, body(i)))
        if (i + 1) % 10 == 0:
            print(f"… {i + 1}/{n}", file=sys.stderr)
    direct.close()
    proxied.close()
    stats = {k: Stats.of(v) for k, v in times.items() if v}
    # Paired differences (same prompt, back to back) are robust to load that drifts during the run.
    stats["diff"] = Stats.of([lp - v for lp, v in zip(times["loop"], times["vllm"], strict=True)])
    if stream:
        stats["ttft_diff"] = Stats.of([lp - v for lp, v in zip(times["loop_ttft"], times["vllm_ttft"], strict=True)])
    return stats


def report(stats: dict[str, Stats], n: int, max_tokens: int) -> str:
    v, lp = stats["vllm"], stats["loop"]
    lines = [f"proxy overhead: {n} chat requests × {max_tokens} tokens each, interleaved",
             f"{'':8}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}"]
    for name, s in (("vLLM", v), ("loop", lp)):
        lines.append(f"{name:8}{s.p50 * 1000:10.1f}{s.p99 * 1000:10.1f}{s.mean * 1000:10.1f}")
    added = (lp.mean / v.mean - 1) * 100
    added50 = (lp.p50 / v.p50 - 1) * 100
    lines.append(f"added latency: mean {added:+.2f} %  p50 {added50:+.2f} %  "
                 f"({(lp.mean - v.mean) * 1000:+.1f} ms per request; target: ≤ 1 % on a CPU, ≤ 2 ms on a GPU)")
    if "diff" in stats:
        d = stats["diff"]
        lines.append(f"paired (loop − vLLM, same prompt back to back): median {d.p50 * 1000:+.1f} ms "
                     f"= {d.p50 / v.p50 * 100:+.2f} % of vLLM's p50")
    if "ttft_diff" in stats:
        vt, lt, dt = stats["vllm_ttft"], stats["loop_ttft"], stats["ttft_diff"]
        lines.append(f"stream time to first token: {'':2}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
        for name, s in (("vLLM", vt), ("loop", lt)):
            lines.append(f"{name:8}{s.p50 * 1000:10.1f}{s.p99 * 1000:10.1f}{s.mean * 1000:10.1f}")
        lines.append(f"added TTFT: p50 {(lt.p50 - vt.p50) * 1000:+.1f} ms; paired median {dt.p50 * 1000:+.1f} ms "
                     f"= {dt.p50 / vt.p50 * 100:+.2f} % of vLLM's TTFT p50")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    p = sub.add_parser("proxy", help="added latency of the logging proxy vs straight vLLM",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--requests", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--vllm-url", help="attach to this vLLM (unix:/path/to/sock or http://host:port) instead of "
                                      "starting one")
    p.add_argument("--loop-url", help="attach to this running loop (then vLLM's address is read from its /health)")
    p.add_argument("--model", help="model for a started loop serve (default: LOOP_MODEL / smollm2)")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="measure whole replies only (no streamed requests, no TTFT)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.requests < 1:
        print("loop: -n must be at least 1", file=sys.stderr)
        return 2
    if args.loop_url:
        health = wait_healthy(args.loop_url.rstrip("/"), args.start_timeout)
        stats = run_bench(args.loop_url.rstrip("/"), args.vllm_url or health["vllm"]["address"], args.requests,
                          args.max_tokens, stream=args.stream)
    else:
        with started_loop(args.vllm_url, args.model, args.start_timeout) as (loop_url, vllm_address):
            stats = run_bench(loop_url, vllm_address, args.requests, args.max_tokens, stream=args.stream)
    print(report(stats, args.requests, args.max_tokens))
    return 0
