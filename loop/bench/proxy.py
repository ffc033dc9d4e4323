"""`loop bench proxy`: how much latency the logging proxy adds on top of vLLM.

The same N chat requests go straight to vLLM and through loop, interleaved in one run (the order alternates
so drift — other load, thermal — hits both sides equally). Every request asks for exactly `--max-tokens` tokens
(`ignore_eos`, greedy) so both sides do the same work. Each prompt is sent twice per side: once whole (latency
until the full reply) and once streamed (time to the first `data:` event, TTFT). Prints p50 / p99 / mean for
both sides and the added latency and TTFT, also as paired differences (same prompt, back to back), which are
robust to load that drifts during the run. `--no-stream` measures whole replies only. The targets (issue 13):
added p50 latency and TTFT at most 1 % of vLLM's on a CPU, at most 2 ms on a GPU.

`--dummy` starts vLLM with random weights of the model folder's real size (`--load-format dummy`) and no
tokenizer (the GPU configs in loop/bench/configs ship none), so its requests go to /v1/completions with token-id
prompts (`--endpoint completions`, which also works with a real model).

Without `--loop-url` it starts `loop serve` itself on a free port with a temporary data dir (and vLLM with it,
on its private Unix socket, unless `--vllm-url` attaches to a running one), and stops it afterwards. vLLM's
address is `unix:/path` or `http://host:port` (as /health's `vllm.address` reports it).

    loop bench proxy -n 50 --max-tokens 16
    loop bench proxy --vllm-url unix:/run/vllm/sock -n 100
    loop bench proxy --model loop/bench/configs/qwen2-7b --dummy --gpu-memory-utilization 0.2 -n 200 --max-tokens 16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
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
def started_loop(vllm_url: str | None, model: str | None, timeout: float,
                 serve_args: Sequence[str] = ()) -> Iterator[tuple[str, str]]:
    """Start `loop serve` (with `serve_args`) on a free port; yield (loop url, vLLM's address)."""
    with tempfile.TemporaryDirectory(prefix="loop-bench-") as data_dir:
        port = free_port()
        cmd = [sys.executable, "-m", "loop.cli", "serve", "--port", str(port), "--data-dir", data_dir,
               "--no-worker", "--log-level", "warning"]
        cmd += ["--vllm-url", vllm_url] if vllm_url else []
        if model:
            cmd += ["--model", model]
        cmd += list(serve_args)
        print(f"starting loop serve on :{port}{'' if vllm_url else ' (with vLLM)'} …", file=sys.stderr)
        proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            health = wait_healthy(f"http://127.0.0.1:{port}", timeout, proc)
            yield f"http://127.0.0.1:{port}", health["vllm"]["address"]
        finally:
            stop_group(proc)


PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def request_body(endpoint: str, model: str, i: int, max_tokens: int, prompt_tokens: int) -> dict:
    """Request `i`: exactly `max_tokens` greedy tokens; chat sends a short message, completions token ids (no
    tokenizer needed). The prompt differs per `i` in its last part only."""
    common = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if endpoint == "chat":
        return {**common, "messages": [{"role": "user", "content": f"Count to ten. ({i})"}]}
    return {**common, "prompt": [100 + k for k in range(prompt_tokens - 1)] + [1000 + i % 1000]}


def _ttft(client: httpx.Client, body: dict, path: str = PATHS["chat"]) -> float:
    """Seconds from sending a streamed request to its first `data:` event (the stream is read to its end)."""
    t0 = time.perf_counter()
    first = None
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data:"):
                first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("the stream ended without a data event")
    return first


def run_bench(loop_url: str, vllm_address: str, n: int, max_tokens: int, warmup: int = 3,
              stream: bool = True, endpoint: str = "chat", prompt_tokens: int = 32) -> dict[str, Stats]:
    direct = sync_client(vllm_address, timeout=600)
    proxied = httpx.Client(base_url=loop_url, timeout=600)
    model = direct.get("/v1/models").json()["data"][0]["id"]
    path = PATHS[endpoint]

    def body(i: int) -> dict:
        return request_body(endpoint, model, i, max_tokens, prompt_tokens)

    def timed(client: httpx.Client, i: int) -> float:
        t0 = time.perf_counter()
        r = client.post(path, json=body(i))
        dt = time.perf_counter() - t0
        r.raise_for_status()
        return dt

    for i in range(warmup):
        for client in (direct, proxied):
            timed(client, -1 - i)
            if stream:
                _ttft(client, body(-1 - i), path)
    times: dict[str, list[float]] = {"vllm": [], "loop": [], "vllm_ttft": [], "loop_ttft": []}
    for i in range(n):
        order = [("vllm", direct), ("loop", proxied)] if i % 2 == 0 else [("loop", proxied), ("vllm", direct)]
        for name, client in order:
            times[name].append(timed(client, i))
        if stream:
            for name, client in order:
                times[f"{name}_ttft"].append(_ttft(client, body(i), path))
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


def _added(loop_s: float, vllm_s: float) -> str:
    return f"{(loop_s - vllm_s) * 1000:+.1f} ms ({(loop_s / vllm_s - 1) * 100:+.2f} %)"


def report(stats: dict[str, Stats], n: int, max_tokens: int, endpoint: str = "chat") -> str:
    v, lp = stats["vllm"], stats["loop"]
    lines = [f"proxy overhead: {n} {endpoint} requests × {max_tokens} tokens each, interleaved",
             f"whole replies: {'':1}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}"]
    for name, s in (("vLLM", v), ("loop", lp)):
        lines.append(f"{name:15}{s.p50 * 1000:10.1f}{s.p99 * 1000:10.1f}{s.mean * 1000:10.1f}")
    lines.append(f"added latency: p50 {_added(lp.p50, v.p50)}, mean {_added(lp.mean, v.mean)}")
    if "diff" in stats:
        d = stats["diff"]
        lines.append(f"  paired (loop − vLLM, same prompt back to back): median {d.p50 * 1000:+.1f} ms "
                     f"({d.p50 / v.p50 * 100:+.2f} % of vLLM's p50)")
    if "ttft_diff" in stats:
        vt, lt, dt = stats["vllm_ttft"], stats["loop_ttft"], stats["ttft_diff"]
        lines.append(f"stream TTFT:   {'':1}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
        for name, s in (("vLLM", vt), ("loop", lt)):
            lines.append(f"{name:15}{s.p50 * 1000:10.1f}{s.p99 * 1000:10.1f}{s.mean * 1000:10.1f}")
        lines.append(f"added TTFT: p50 {_added(lt.p50, vt.p50)}; paired median {dt.p50 * 1000:+.1f} ms "
                     f"({dt.p50 / vt.p50 * 100:+.2f} % of vLLM's TTFT p50)")
    lines.append("targets: added p50 latency and time to first token ≤ 1 % of vLLM's on a CPU, ≤ 2 ms on a GPU")
    return "\n".join(lines)


def as_json(stats: dict[str, Stats], n: int, max_tokens: int, endpoint: str) -> dict:
    """The figures in milliseconds, for --json-out."""
    out: dict = {"requests": n, "max_tokens": max_tokens, "endpoint": endpoint,
                 "ms": {k: {"p50": s.p50 * 1000, "p99": s.p99 * 1000, "mean": s.mean * 1000} for k, s in stats.items()}}
    v, lp = stats["vllm"], stats["loop"]
    out["added_p50_ms"], out["added_p50_pct"] = (lp.p50 - v.p50) * 1000, (lp.p50 / v.p50 - 1) * 100
    if "ttft_diff" in stats:
        vt, lt = stats["vllm_ttft"], stats["loop_ttft"]
        out["added_ttft_p50_ms"], out["added_ttft_p50_pct"] = (lt.p50 - vt.p50) * 1000, (lt.p50 / vt.p50 - 1) * 100
        out["paired_ttft_ms"] = stats["ttft_diff"].p50 * 1000
    return out


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    p = sub.add_parser("proxy", help="added latency of the logging proxy vs straight vLLM",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--requests", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--vllm-url", help="attach to this vLLM (unix:/path/to/sock or http://host:port) instead of "
                                      "starting one")
    p.add_argument("--loop-url", help="attach to this running loop (then vLLM's address is read from its /health)")
    p.add_argument("--model", help="model for a started loop serve (default: LOOP_MODEL / smollm2)")
    p.add_argument("--dummy", action="store_true",
                   help="random weights of the model's real size and no tokenizer (vLLM --load-format dummy "
                        "--skip-tokenizer-init); implies --endpoint completions")
    p.add_argument("--gpu-memory-utilization", type=float, help="vLLM's share of the GPU for a started loop serve")
    p.add_argument("--endpoint", choices=sorted(PATHS), help="chat (default) or completions (token-id prompts)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length of --endpoint completions")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="measure whole replies only (no streamed requests, no TTFT)")
    p.add_argument("--json-out", help="also write the figures (milliseconds) as JSON here")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.requests < 1:
        print("loop: -n must be at least 1", file=sys.stderr)
        return 2
    if args.dummy and (args.vllm_url or args.loop_url):
        print("loop: --dummy starts vLLM with random weights; leave out --vllm-url and --loop-url", file=sys.stderr)
        return 2
    if args.dummy and args.endpoint == "chat":
        print("loop: --dummy starts vLLM without a tokenizer, so chat cannot be served; use --endpoint completions "
              "(the default with --dummy)", file=sys.stderr)
        return 2
    endpoint = args.endpoint or ("completions" if args.dummy else "chat")
    serve_args = ["--vllm-args", "--load-format dummy --skip-tokenizer-init"] if args.dummy else []
    if args.gpu_memory_utilization is not None:
        serve_args += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    bench = dict(stream=args.stream, endpoint=endpoint, prompt_tokens=args.prompt_tokens)
    if args.loop_url:
        health = wait_healthy(args.loop_url.rstrip("/"), args.start_timeout)
        stats = run_bench(args.loop_url.rstrip("/"), args.vllm_url or health["vllm"]["address"], args.requests,
                          args.max_tokens, **bench)
    else:
        with started_loop(args.vllm_url, args.model, args.start_timeout, serve_args) as (loop_url, vllm_address):
            stats = run_bench(loop_url, vllm_address, args.requests, args.max_tokens, **bench)
    print(report(stats, args.requests, args.max_tokens, endpoint))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(as_json(stats, args.requests, args.max_tokens, endpoint), f, indent=1)
    return 0
