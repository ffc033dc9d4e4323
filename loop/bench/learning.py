"""`loop bench learning`: does the closed loop actually learn what a rater wants, and does the guard stop poison?

A synthetic rater wants short, finished answers: an answer is *approved* when it ends by itself (finish_reason
"stop") within `--max-words` words. Each round, through loop's PUBLIC HTTP API only:
1. asks `POST /api/candidates` for two fresh answers to each of `--prompts` prompts (the live weights, sampled);
   the approval rate of these fresh answers is the round's headline figure;
2. rates them with `POST /api/comparisons` (`Bench.pick`: an approved answer beats an unapproved one; two approved
   answers are a tie — the rater has nothing left to prefer; of two unapproved ones the finished, then the shorter
   wins); in the poisoned round (`--poison-round`) every non-tie label is flipped;
3. waits while loop trains on its own schedule: the scheduler's threshold (set once at the start through
   `POST /api/scheduler/config`, with the pre-write direction limit `--max-conflict-t`) fires on the new
   comparisons; the worker rejects an update that pulls back what was learned before writing it, the eval guard
   measures before and after, and a regression is rolled back automatically. Nothing here calls /api/train.
Printed per round: approval of fresh answers, their mean length, held-out preference accuracy and canary
perplexity (the guard's figures, after the run, from `GET /api/runs/{id}`), how many held-out pairs judged the run
("eval n": only those older than its batch), the run's mean change of their margins log p(chosen) - log p(rejected)
per answer token ("dm/tok", nats) and that mean in standard errors ("t": the guard rolls back below
-max_margin_t), the pre-write direction figure ("agree t": per-tensor t of the update against the weights' change
since the base; rejected below -max_conflict_t), the run's status, wall time.
Target: approval from its starting level to ≥ 90 % within `--rounds` rounds, canary perplexity up by ≤ 5 %, and
the poisoned round stopped: rejected before the write or rolled back after it.

    loop bench learning                      # starts its own `loop serve` (vLLM + worker) in a temp dir
    loop bench learning --url http://127.0.0.1:8000 --token …   # against a running loop (changes its thresholds)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

PROMPTS = [
    "What is the capital of France?", "Name a fruit that is yellow.", "What colour is the sky on a clear day?",
    "How many legs does a spider have?", "What do bees make?", "What is 7 plus 5?", "Name a large ocean.",
    "What is the opposite of hot?", "Which animal is known as man's best friend?", "What do plants need to grow?",
    "What is the boiling point of water in Celsius?", "Name a planet in our solar system.",
    "What language is spoken in Spain?", "How many days are in a week?", "What is frozen water called?",
    "Who wrote Romeo and Juliet?", "What is the largest mammal?", "What gas do humans breathe in?",
    "Name a musical instrument with strings.", "What is the first month of the year?",
    "What shape has three sides?", "What do cows drink?", "Name a colour of the rainbow.",
    "What is the main ingredient of bread?", "What is the tallest animal?", "How many hours are in a day?",
    "What do you call a baby cat?", "Which season comes after winter?", "What is 10 minus 3?",
    "Name a vegetable that is orange.", "What is the chemical symbol for water?", "Where do fish live?",
    "What is the fastest land animal?", "What do you use to write on a blackboard?", "Name a country in Asia.",
    "What is the freezing point of water in Celsius?", "What is the sun?", "How many wheels does a bicycle have?",
    "What does a thermometer measure?", "What is the capital of Italy?", "Give me a synonym for happy.",
    "What is the plural of mouse?", "What do caterpillars turn into?", "Name a bird that cannot fly.",
    "What is the colour of grass?", "How many continents are there?", "What is the capital of Japan?",
    "What is 3 times 4?", "Which planet is known as the red planet?", "What do you call a young dog?",
]


@dataclass
class Round:
    index: int
    poisoned: bool
    approval: float
    mean_words: float
    n_answers: int
    run_id: int | None = None
    status: str = "-"
    accuracy: float | None = None
    perplexity: float | None = None
    eval_pairs: int | None = None  # held-out pairs that judged the run (older than its batch)
    dmargin: float | None = None  # the run's mean change of the held-out margins per answer token, nats
    t: float | None = None  # that mean in standard errors (the guard's margin criterion)
    agree_t: float | None = None  # before the write: per-tensor t of the update against the change since the base
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def words(text: str) -> int:
    return len(text.split())


class Bench:
    def __init__(self, url: str, token: str, args: argparse.Namespace) -> None:
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=900,
                                 headers={"authorization": f"Bearer {token}"})
        self.args = args
        self.rng = random.Random(args.seed)
        self.rounds: list[Round] = []

    def approved(self, cand: dict[str, Any]) -> bool:
        return cand.get("finish_reason") == "stop" and words(cand["content"]) <= self.args.max_words

    def pick(self, a: dict[str, Any], b: dict[str, Any]) -> str:
        """The rater's A/B pick. Approved beats not approved; two approved answers are equally good to this rater
        (tie: nothing left to prefer); of two unapproved ones a finished answer beats a cut-off one, then the
        shorter wins."""
        ok_a, ok_b = self.approved(a), self.approved(b)
        if ok_a != ok_b:
            return "a" if ok_a else "b"
        if ok_a:
            return "tie"
        la, lb = (words(x["content"]) + (0 if x["finish_reason"] == "stop" else 1000) for x in (a, b))
        return "tie" if la == lb else "a" if la < lb else "b"

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path} → {r.status_code}: {r.text[:300]}")
        return r.json()

    def configure(self) -> None:
        a = self.args
        self._call("POST", "/api/scheduler/config", json={
            "min_pairs": a.min_pairs or max(1, int(a.prompts * 0.4)), "interval_s": 1e9, "max_wait_s": a.max_wait,
            "batch_size": a.prompts * 2, "steps": a.steps, "learning_rate": a.learning_rate, "guard_enabled": True,
            **({"max_conflict_t": a.max_conflict_t} if a.max_conflict_t is not None else {})})
        self._call("POST", "/api/scheduler/resume")

    def round(self, index: int, poisoned: bool) -> Round:
        t0 = time.perf_counter()
        prompts = self.rng.sample(PROMPTS, self.args.prompts)
        approved = total = 0
        lengths = []
        comparisons = []
        for prompt in prompts:
            c = self._call("POST", "/api/candidates", json={
                "messages": [{"role": "user", "content": prompt}], "n": 2, "temperature": self.args.temperature,
                "max_tokens": self.args.max_tokens, "rater": "bench-short"})["candidates"]
            for cand in c:
                total += 1
                approved += self.approved(cand)
                lengths.append(words(cand["content"]))
            a, b = c[0], c[1]
            winner = self.pick(a, b)
            if poisoned and winner != "tie":
                winner = "b" if winner == "a" else "a"
            comparisons.append((a["response_id"], b["response_id"], winner))
        last_run = self._last_run_id()
        for ra, rb, winner in comparisons:
            self._call("POST", "/api/comparisons", json={"response_a_id": ra, "response_b_id": rb, "winner": winner,
                                                         "rater": "bench-poison" if poisoned else "bench-short"})
        rnd = Round(index=index, poisoned=poisoned, approval=approved / total, mean_words=sum(lengths) / len(lengths),
                    n_answers=total)
        run = self._wait_for_run(after=last_run)
        if run is not None:
            rnd.run_id, rnd.status = run["id"], run["status"]
            ev = run.get("eval_after") or run.get("eval_before") or {}
            rnd.accuracy, rnd.perplexity = ev.get("accuracy"), ev.get("canary_perplexity")
            after = run.get("eval_after") or {}
            rnd.eval_pairs, rnd.dmargin = after.get("n_pairs"), after.get("mean_token_margin_change")
            rnd.t = after.get("margin_change_t")
            rnd.agree_t = (run.get("metrics") or {}).get("agreement_t")
            if run["status"] == "rolled_back":
                rnd.notes.append(run.get("rollback_reason") or "")
                before = run.get("eval_before") or {}
                rnd.accuracy, rnd.perplexity = before.get("accuracy"), before.get("canary_perplexity")
                rnd.notes.append(f"after the {'poisoned ' if poisoned else ''}update (rolled back): accuracy {_f(ev.get('accuracy'))}, "
                                 f"perplexity {_f(ev.get('canary_perplexity'))}")
            elif run["status"] == "rejected":
                rnd.notes.append(f"rejected before the write: {run.get('error') or ''}")
                before = run.get("eval_before") or {}
                rnd.accuracy, rnd.perplexity = before.get("accuracy"), before.get("canary_perplexity")
            elif run["status"] != "succeeded":
                rnd.notes.append(run.get("error") or "")
        rnd.wall_s = time.perf_counter() - t0
        return rnd

    def _last_run_id(self) -> int:
        items = self._call("GET", "/api/runs", params={"limit": 1})["items"]
        return items[0]["id"] if items else 0

    def _wait_for_run(self, after: int) -> dict[str, Any] | None:
        """Wait until the scheduler has started a run after `after` and finished judging it."""
        deadline = time.monotonic() + self.args.run_timeout
        idle_since = None
        while time.monotonic() < deadline:
            sched = self._call("GET", "/api/scheduler")
            items = self._call("GET", "/api/runs", params={"limit": 1})["items"]
            if items and items[0]["id"] > after and sched["running_run_id"] is None \
                    and items[0]["status"] not in ("queued", "running"):
                return self._call("GET", f"/api/runs/{items[0]['id']}")
            untrained = sched.get("untrained") or {}
            if sched["running_run_id"] is None and not (untrained.get("pairs") or untrained.get("examples")):
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 10:  # every pick a tie or held out: nothing to train this round
                    return None
            else:
                idle_since = None
            if sched.get("last_error") and not items:
                print(f"  scheduler: {sched['last_error']}", file=sys.stderr)
            time.sleep(1.0)
        return None

    def run(self) -> int:
        self.configure()
        a = self.args
        print(f"rater: approves answers that finish within {a.max_words} words; {a.prompts} prompts x 2 answers "
              f"per round; lr {a.learning_rate}, {a.steps} steps per run; poisoned round: {a.poison_round}")
        print(f"{'round':>5} {'approval':>8} {'words':>6} {'held-out acc':>12} {'canary ppl':>10} {'eval n':>6} "
              f"{'dm/tok':>8} {'t':>6} {'agree t':>7} {'run':>4} {'status':>11} {'wall s':>7}")
        reached = None
        for i in range(a.rounds):
            poisoned = i == a.poison_round
            rnd = self.round(i, poisoned)
            self.rounds.append(rnd)
            print(f"{i:>5} {rnd.approval * 100:>7.1f}% {rnd.mean_words:>6.1f} {_f(rnd.accuracy):>12} "
                  f"{_f(rnd.perplexity):>10} {_f(rnd.eval_pairs):>6} {_f4(rnd.dmargin):>8} {_f(rnd.t, 2):>6} {_f(rnd.agree_t, 2):>7} "
                  f"{_f(rnd.run_id):>4} {rnd.status:>11} {rnd.wall_s:>7.1f}"
                  f"{'  (poisoned labels)' if poisoned else ''}", flush=True)
            for note in rnd.notes:
                print(f"      {note}", flush=True)
            if rnd.approval >= a.target and not poisoned and i > 0:
                reached = i if reached is None else reached
                if a.stop_at_target and i > a.poison_round:  # reached (again) once the poison is behind
                    break
        return self.summary(reached)

    def summary(self, reached: int | None) -> int:
        first = self.rounds[0]
        ppls = [r.perplexity for r in self.rounds if r.perplexity is not None]
        versions = self._call("GET", "/api/versions")
        live = next((v for v in versions["items"] if v["version"] == versions["live"]), None)
        live_ppl = (live or {}).get("eval", {}) or {}
        end_ppl = live_ppl.get("canary_perplexity") or (ppls[-1] if ppls else None)
        start_ppl = ppls[0] if ppls else None
        rise = (end_ppl / start_ppl - 1) if start_ppl and end_ppl else None
        poisoned = [r for r in self.rounds if r.poisoned]
        poison_ok = all(r.status in ("rolled_back", "rejected") for r in poisoned)
        ok = reached is not None and rise is not None and rise <= 0.05 and poison_ok
        print(f"approval {first.approval * 100:.1f}% -> {self.rounds[-1].approval * 100:.1f}% "
              f"(>= {self.args.target * 100:.0f}% first at round {reached}); canary perplexity "
              f"{_f(start_ppl)} -> {_f(end_ppl)} ({'-' if rise is None else f'{rise * 100:+.1f}%'}); "
              f"poisoned round stopped (rejected or rolled back): {poison_ok}; total {sum(r.wall_s for r in self.rounds):.0f} s")
        print("TARGET MET" if ok else "TARGET NOT MET")
        return 0 if ok else 1


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _f4(x: Any) -> str:
    return _f(x, 4)


@contextlib.contextmanager
def started_loop(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """A private `loop serve` (vLLM + worker) in a temp dir, with a held-out share large enough to measure."""
    from loop.bench.proxy import free_port, wait_healthy

    keep = contextlib.nullcontext(args.data_dir) if args.data_dir else None
    with keep or tempfile.TemporaryDirectory(prefix="loop-bench-learning-") as data_dir:
        port = free_port()
        cmd = [sys.executable, "-m", "loop.cli", "serve", "--port", str(port), "--data-dir", data_dir,
               "--log-level", "warning"]
        env = {**os.environ, "LOOP_HOLDOUT_FRACTION": str(args.holdout), "LOOP_SCHEDULER_MIN_PAIRS": "1000000",
               "LOOP_CPU_KV_CACHE_GIB": os.environ.get("LOOP_CPU_KV_CACHE_GIB", "1")}
        print(f"starting loop serve on :{port} (vLLM + training worker) …", file=sys.stderr)
        proc = subprocess.Popen(cmd, start_new_session=True, env=env)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", args.start_timeout, proc)
            token = open(os.path.join(data_dir, "admin_token")).read().strip()
            _wait_worker(f"http://127.0.0.1:{port}", args.start_timeout)
            yield f"http://127.0.0.1:{port}", token
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait_worker(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = httpx.get(f"{url}/api/train/status", timeout=10).json().get("state")
        if state == "idle":
            return
        time.sleep(1)
    raise TimeoutError(f"the training worker of {url} did not become idle in {timeout:.0f} s")


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    p = sub.add_parser("learning", help="a synthetic rater vs the closed loop: approval, accuracy, perplexity",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running loop (default: start one)")
    p.add_argument("--token", default=os.environ.get("LOOP_ADMIN_TOKEN"), help="its admin token")
    p.add_argument("--rounds", type=int, default=10)
    # 32: the first round trains on ~20 pairs, which defines the learned direction well enough for the pre-write
    # check to tell the poisoned round from good ones (with 16 prompts, ~10 pairs, it could not: loop/worker/agreement.py)
    p.add_argument("--prompts", type=int, default=32, help="prompts per round (2 answers each)")
    p.add_argument("--max-words", type=int, default=25, help="the rater approves finished answers this short")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.9)
    # Measured with --rounds 8 --prompts 16 --steps 2 --poison-round 3 (half the comparisons held out; poison rolled
    # back every time): 1e-5 went 37 -> 56 % approval (perplexity +0.2 %), 2e-5 41 -> 81 % (-0.6 %), 3e-5 had its
    # first run rolled back for perplexity (+9.4 %). 2e-5 it is; 90 % needs more rounds than 8 on this design.
    p.add_argument("--learning-rate", type=float, default=2e-5)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--min-pairs", type=int, default=0, help="scheduler threshold (default 40 %% of --prompts)")
    # A round whose trainable pairs stay under the threshold (ties, the held-out half) still trains: the
    # scheduler's max-wait trigger fires once the oldest untrained pair has waited this long.
    p.add_argument("--max-wait", type=float, default=30.0, help="scheduler max_wait_s (seconds)")
    p.add_argument("--poison-round", type=int, default=3, help="this round's labels are flipped (-1: none)")
    # A quarter held out: the after-the-write guard (accuracy, margins) still has 25-45 older pairs to measure,
    # and three quarters of the picks train. (Half was needed while the held-out margins were the only poison test.)
    p.add_argument("--holdout", type=float, default=0.25, help="held-out share for a started loop")
    p.add_argument("--max-conflict-t", type=float, default=2.0,
                   help="the scheduler's pre-write direction limit, max_conflict_t (the service's default: unset)")
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--stop-at-target", action="store_true", help="stop once the target is met after the poison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-timeout", type=float, default=1200)
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--data-dir", help="a started loop's data dir, kept afterwards (default: a temp dir, removed)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.prompts > len(PROMPTS):
        print(f"loop: --prompts must be at most {len(PROMPTS)}", file=sys.stderr)
        return 2
    if args.url:
        if not args.token:
            print("loop: --url needs --token (or LOOP_ADMIN_TOKEN): the bench changes the scheduler's thresholds",
                  file=sys.stderr)
            return 2
        return Bench(args.url, args.token, args).run()
    # a SIGTERM (timeout, kill) unwinds like Ctrl-C, so started_loop stops its `loop serve` group too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with started_loop(args) as (url, token):
        return Bench(url, token, args).run()
