"""`loop bench learning`: does the closed loop learn what a rater wants, stay healthy, and stop poison?

A synthetic rater (`--rater`, loop/bench/learning/raters.py: short, direct or number) wants one trait of an
answer. Round after round it rates fresh answers through loop's public HTTP API while the scheduler trains on its
own (loop/bench/learning/suite.py says how a round goes); some rounds can be poisoned (`--poison ab:N`: round N's
A/B picks flipped; `--poison thumbs:N`: round N rated with flipped thumbs) or mixed (`--mixed N`: an honest and a
hostile account, half the prompts each). The headline figure per round is the trait rate on held-out prompts that
are never rated; beside it, the trait rate of the rated answers, the run's screen, guard, drift and generation
health figures. The summary judges each target (loop/bench/learning/targets.py) and `--json PATH` keeps every
round's figures. The guard and poison thresholds are the service's; `--scheduler-set KEY=VALUE` changes one for an
experiment.

    loop bench learning --rater direct --rounds 20 --poison ab:4 --poison thumbs:8 --mixed 12 --json out.json
    loop bench learning --url http://127.0.0.1:8000 --token …   # against a running loop (pauses its scheduler
                                                                 # between rounds and changes its batch thresholds)

Tests: `.venv/bin/python -m pytest -q tests/unit/bench/test_learning_raters.py tests/unit/bench/test_learning_plan.py
tests/unit/bench/test_learning_targets.py tests/unit/bench/test_learning_suite.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx

from loop.bench.learning.plan import parse_poison, parse_round, plan_rounds
from loop.bench.learning.raters import RATERS
from loop.bench.learning.suite import HELDOUT, PROMPTS, SERVICE, Suite


@contextlib.contextmanager
def started_loop(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """A private `loop serve` (vLLM + worker) in a temp dir; its scheduler waits until the bench configures it."""
    from loop.bench import stop_group
    from loop.bench.proxy import free_port, wait_healthy

    keep = contextlib.nullcontext(args.data_dir) if args.data_dir else None
    with keep or tempfile.TemporaryDirectory(prefix="loop-bench-learning-") as data_dir:
        port = free_port()
        cmd = [sys.executable, "-m", "loop.cli", "serve", "--port", str(port), "--data-dir", data_dir,
               "--log-level", "warning"]
        env = {**os.environ, "LOOP_SCHEDULER_MIN_PAIRS": "1000000",
               "LOOP_CPU_KV_CACHE_GIB": os.environ.get("LOOP_CPU_KV_CACHE_GIB", "1")}
        if args.holdout is not None:
            env["LOOP_HOLDOUT_FRACTION"] = str(args.holdout)
        print(f"starting loop serve on :{port} (vLLM + training worker) …", file=sys.stderr)
        proc = subprocess.Popen(cmd, start_new_session=True, env=env)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", args.start_timeout, proc)
            with open(os.path.join(data_dir, "admin_token"), encoding="utf-8") as f:
                token = f.read().strip()
            _wait_worker(f"http://127.0.0.1:{port}", args.start_timeout)
            yield f"http://127.0.0.1:{port}", token
        finally:
            stop_group(proc, timeout=60)


def _wait_worker(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/api/train/status", timeout=10).json().get("state") == "idle":
            return
        time.sleep(1)
    raise TimeoutError(f"the training worker of {url} did not become idle in {timeout:.0f} s")


def _rate_or_service(text: str) -> str | float:
    if text == SERVICE:
        return SERVICE
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number or {SERVICE!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number or {SERVICE!r}")
    return value


def _steps_or_service(text: str) -> str | int:
    if text == SERVICE:
        return SERVICE
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of steps or {SERVICE!r}") from None


def parse_setting(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` for POST /api/scheduler/config; VALUE is read as JSON (2, 0.5, true, null), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. margin_alpha=0.05")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    p = sub.add_parser("learning", help="synthetic raters vs the closed loop: trait rate, drift, health, poison",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running loop (default: start one)")
    p.add_argument("--token", default=os.environ.get("LOOP_ADMIN_TOKEN"), help="its admin token")
    p.add_argument("--rater", choices=list(RATERS), default="short", help="which trait the synthetic rater wants")
    p.add_argument("--rounds", type=int, default=10)
    # 32: the first round trains on ~20 pairs (docs/measurements.md: fewer defined the learned direction too poorly)
    p.add_argument("--prompts", type=int, default=32, help="rated prompts per round (2 answers each)")
    p.add_argument("--heldout", type=int, default=len(HELDOUT), help="held-out prompts sampled after every round")
    p.add_argument("--heldout-samples", type=int, default=2, help="answers per held-out prompt (seeded)")
    p.add_argument("--max-words", type=int, default=25, help="the short rater approves finished answers this short")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.9)
    # the service's own learning rate and steps by default (the targets are for default settings); the
    # earlier learning runs used 2e-5 and 2 steps (docs/measurements.md)
    p.add_argument("--learning-rate", type=_rate_or_service, default=SERVICE,
                   help=f"the scheduler's learning_rate ({SERVICE!r}: leave the service's)")
    p.add_argument("--steps", type=_steps_or_service, default=SERVICE, help=f"steps per run ({SERVICE!r}: the service's)")
    p.add_argument("--poison", type=parse_poison, action="append", default=[], metavar="KIND:N",
                   help="ab:N flips round N's A/B picks; thumbs:N rates round N with flipped thumbs (repeatable)")
    p.add_argument("--mixed", type=parse_round, action="append", default=[], metavar="N",
                   help="round N is rated by 'honest' and 'hostile' (flipped), half the prompts each (repeatable)")
    p.add_argument("--holdout", type=float, default=None,
                   help="LOOP_HOLDOUT_FRACTION for a started loop (default: the service's)")
    p.add_argument("--scheduler-set", type=parse_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="an experiment: also send this to POST /api/scheduler/config (e.g. margin_alpha=0.05)")
    p.add_argument("--target", type=float, default=0.9, help="held-out trait rate to reach")
    p.add_argument("--within", type=int, default=10, help="... within this many rounds")
    p.add_argument("--max-kl", type=float, default=None,
                   help="the summary's drift limit, nats/token (default: the limit the service reports)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight while sampling")
    p.add_argument("--run-timeout", type=float, default=1200)
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--data-dir", help="a started loop's data dir, kept afterwards (default: a temp dir, removed)")
    p.add_argument("--json", metavar="PATH", help="write every round's figures and the targets here")
    p.set_defaults(func=main)


def check(args: argparse.Namespace) -> list[str]:
    """The bench's arguments after the plan is made; errors name the flag."""
    if not 1 <= args.prompts <= len(PROMPTS):
        raise ValueError(f"--prompts must be 1..{len(PROMPTS)}, got {args.prompts}")
    if not 1 <= args.heldout <= len(HELDOUT):
        raise ValueError(f"--heldout must be 1..{len(HELDOUT)}, got {args.heldout}")
    if not 1 <= args.heldout_samples <= 8:
        raise ValueError(f"--heldout-samples must be 1..8, got {args.heldout_samples}")
    if args.concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {args.concurrency}")
    return plan_rounds(args.rounds, args.poison, args.mixed)


def main(args: argparse.Namespace) -> int:
    try:
        plan = check(args)
    except ValueError as exc:
        print(f"loop: {exc}", file=sys.stderr)
        return 2
    args.scheduler_set = dict(args.scheduler_set)
    if args.url:
        if not args.token:
            print("loop: --url needs --token (or LOOP_ADMIN_TOKEN): the bench pauses the scheduler and sets its "
                  "batch thresholds", file=sys.stderr)
            return 2
        return Suite(args.url, args.token, args, plan).run()
    # a SIGTERM (timeout, kill) unwinds like Ctrl-C, so started_loop stops its `loop serve` group too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with started_loop(args) as (url, token):
        return Suite(url, token, args, plan).run()
