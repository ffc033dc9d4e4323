"""The driver of `loop bench learning`: rounds of sampling, rating and waiting for the scheduler, over HTTP only.

Each round, through loop's public API (nothing here calls /api/train, and nothing sets a guard or poison
threshold unless `--scheduler-set` asks):
1. `POST /api/candidates`: two fresh answers to each of `--prompts` prompts drawn from PROMPTS (the live weights,
   sampled); their trait rate is the round's "rated" figure;
2. rates them as the plan says (loop/bench/learning/plan.py): A/B picks through `POST /api/comparisons`, or thumbs
   through `POST /api/ratings`; the scheduler is paused while they are posted, so one round's feedback is one batch;
3. resumes the scheduler and waits for the run it starts on its own (`min_pairs` 1) to finish: the screen before
   the write, the eval guard after it, drift and generation health, a rollback if any of them says so;
4. samples the fixed HELDOUT prompts, never rated, through `POST /v1/chat/completions` with a fixed seed per
   prompt, so a change from round to round is the weights' and not the sampler's; their trait rate is the headline.
Run records are read defensively (`GET /api/runs/{id}`): a figure the service does not report prints as "-".

Tests: `.venv/bin/python -m pytest -q tests/unit/bench/test_learning_suite.py`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import httpx

from loop.bench.learning.raters import RATERS, Rater, make_rater, words
from loop.bench.learning.targets import (
    Base,
    Limits,
    RoundRecord,
    Target,
    judge,
    verdict,
)

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
# Never rated: the same kind of question as PROMPTS, none of them, so their rate measures what generalised.
HELDOUT = [
    "What is the capital of Germany?", "Name a fruit that is red.", "How many legs does a dog have?",
    "What do chickens lay?", "What is 6 plus 2?", "Name a desert.", "What is the opposite of big?",
    "What colour is a banana?", "What is the largest planet?", "How many months are in a year?",
    "What do you call a baby sheep?", "Which season comes after summer?", "What is the capital of Spain?",
    "Name an animal that lives in the sea.", "What is 9 minus 4?", "What metal is a coin often made of?",
    "Who painted the Mona Lisa?", "What do you call frozen rain?", "Name a tool used to cut paper.",
    "How many sides does a square have?", "What is the main language of Brazil?", "What do pandas eat?",
    "What is the hottest planet?", "Name a vegetable that is green.",
]
SERVICE = "service"  # --learning-rate / --steps value that leaves the service's own setting


def flip(winner: str) -> str:
    return {"a": "b", "b": "a"}.get(winner, winner)


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _p(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


HEADER = (f"{'round':>5} {'kind':>6} {'rated':>6} {'held-out':>8} {'words':>5} {'run':>4} {'status':>11} "
          f"{'screen p':>8} {'n':>4} {'quar':>4} {'acc':>5} {'ppl':>7} {'t':>6} {'kl/tok':>7} {'ppl/base':>8} "
          f"{'stutter':>7} {'collapse':>8} {'dist-2':>6} {'unfin':>6} {'tokens':>6} {'wall s':>7}")


def format_row(r: RoundRecord) -> str:
    quar = r.screen_quarantined if r.screen_quarantined is not None else r.quarantined
    return (f"{r.index:>5} {r.kind:>6} {_p(r.rated_rate):>6} {_p(r.heldout_rate):>8} {_f(r.heldout_words, 1):>5} "
            f"{_f(r.run_id):>4} {r.status:>11} {_f(r.screen_p, 4):>8} {_f(r.screen_n):>4} {_f(quar):>4} "
            f"{_f(r.accuracy, 2):>5} {_f(r.perplexity, 2):>7} {_f(r.margin_t, 2):>6} {_f(r.kl_per_token, 4):>7} "
            f"{'-' if r.ppl_vs_base is None else f'{r.ppl_vs_base * 100:+.1f}%':>8} {_p(r.stutter):>7} "
            f"{_p(r.collapse):>8} {_f(r.distinct_2, 3):>6} {_p(r.unfinished):>6} {_f(r.mean_tokens, 1):>6} "
            f"{r.wall_s:>7.1f}")


def own_feedback(rec: RoundRecord, posted: set[tuple[str, int]], run: dict[str, Any],
                 quarantined: set[tuple[str, int]]) -> None:
    """How much of the round's feedback (`posted`) the run took up (its batch, or screened beside it and
    quarantined) and how much of that was quarantined before the write."""
    batch = run.get("batch") or {}
    if "rating_ids" not in batch and "comparison_ids" not in batch:
        return
    in_batch = {(kind, i) for kind in ("rating", "comparison") for i in batch.get(f"{kind}_ids") or []}
    taken = posted & (in_batch | quarantined)
    rec.own_taken, rec.own_quarantined = len(taken), len(taken & quarantined)
    if rec.withheld and not rec.stopped_by_status:
        rec.notes.append(f"the round's own feedback: all {rec.own_taken} items the run took up were quarantined "
                         f"before the write; the run trained on the rest of its batch")


def read_run(rec: RoundRecord, run: dict[str, Any]) -> None:
    """Fill `rec` from a run record (GET /api/runs/{id}); model figures are those of the weights served after it."""
    rec.run_id, rec.status = run.get("id"), run.get("status") or "-"
    screen = (run.get("metrics") or {}).get("screen") or {}
    rec.screen_p, rec.screen_n = screen.get("p_value"), screen.get("n")
    rec.screen_quarantined = screen.get("quarantined")
    rec.screen_p_by = screen.get("p_by_direction")
    if rec.screen_p_by:
        rec.notes.append(f"screen along {screen.get('direction')}; p by direction: "
                         + ", ".join(f"{d} {_f(p, 4)}" for d, p in rec.screen_p_by.items())
                         + f" ({screen.get('n_anchors')} anchor pairs, {_f(screen.get('ms'), 0)} ms)")
    before, after = run.get("eval_before") or {}, run.get("eval_after") or {}
    live = after if rec.status == "succeeded" else before
    rec.accuracy, rec.perplexity = live.get("accuracy"), live.get("canary_perplexity")
    rec.margin_t = after.get("margin_change_t")
    rec.accuracy_before = before.get("accuracy")
    rec.turned_wrong, rec.turned_right, rec.turned_p = (after.get("turned_wrong"), after.get("turned_right"),
                                                        after.get("turned_p"))
    if rec.turned_wrong:
        rec.notes.append(f"eval accuracy {_f(rec.accuracy_before, 2)} -> {_f(after.get('accuracy'), 2)} after the "
                         f"write: {rec.turned_wrong} pairs turned wrong, {rec.turned_right} right "
                         f"(p = {_f(rec.turned_p, 3)})")
    drift, health = live.get("drift") or {}, live.get("health") or {}
    rec.kl_per_token, rec.ppl_vs_base = drift.get("kl_per_token"), drift.get("perplexity_vs_base")
    rec.stutter, rec.collapse = health.get("stutter_rate"), health.get("collapse_share")
    rec.distinct_2, rec.unfinished = health.get("distinct_2"), health.get("unfinished_rate")
    rec.mean_tokens = health.get("mean_tokens")
    if rec.status == "rolled_back":
        rec.notes.append(f"rolled back: {run.get('rollback_reason') or ''}; after the write: accuracy "
                         f"{_f(after.get('accuracy'))}, perplexity {_f(after.get('canary_perplexity'))}, "
                         f"kl/tok {_f((after.get('drift') or {}).get('kl_per_token'), 4)}, "
                         f"stutter {_p((after.get('health') or {}).get('stutter_rate'))}")
    elif rec.status == "rejected":
        rec.notes.append(f"rejected before the write: {run.get('error') or ''}")
    elif rec.status != "succeeded":
        rec.notes.append(f"{rec.status}: {run.get('error') or ''}")


def base_from_run(base: Base, run: dict[str, Any]) -> None:
    """The first run's eval before its write describes the weights the bench started from."""
    before = run.get("eval_before") or {}
    # the base model's answers are measured once and shown beside every later measurement (loop/scheduler/watch.py)
    health = before.get("health") or ((run.get("eval_after") or {}).get("health") or {}).get("base") or {}
    base.perplexity = before.get("canary_perplexity")
    base.stutter, base.collapse = health.get("stutter_rate"), health.get("collapse_share")


def kl_limit(thresholds: dict[str, Any], run: dict[str, Any] | None) -> float | None:
    """The drift limit in force, where the service says it: its scheduler thresholds, else the run's drift record."""
    for source in (thresholds, ((run or {}).get("eval_after") or {}).get("drift") or {}):
        for key in ("max_drift_kl", "max_kl_per_token", "kl_limit", "limit"):
            if isinstance(source.get(key), (int, float)) and not isinstance(source.get(key), bool):
                return float(source[key])
    return None


class Suite:
    def __init__(self, url: str, token: str, args: argparse.Namespace, plan: list[str],
                 transport: httpx.BaseTransport | None = None) -> None:
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=900, transport=transport,
                                 headers={"authorization": f"Bearer {token}"})
        self.args = args
        self.plan = plan
        self.rater: Rater = make_rater(args.rater, max_words=args.max_words)
        self.others = {name: make_rater(name, max_words=args.max_words) for name in RATERS}
        self.rng = random.Random(args.seed)
        self.records: list[RoundRecord] = []
        self.base = Base()
        self.base_traits: dict[str, float] = {}
        self.settings_set: dict[str, Any] = {}
        self.thresholds: dict[str, Any] = {}
        self.last_run: dict[str, Any] | None = None
        self.model = ""

    # ---------------------------------------------------------------------------------------------- HTTP
    def _call(self, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path} -> {r.status_code}: {r.text[:300]}")
        return r.json()

    def quarantine_count(self) -> int | None:
        """How many entries GET /api/quarantine lists (None where the service has no such route)."""
        r = self.http.get("/api/quarantine")
        if r.status_code in (404, 405):
            return None
        if r.status_code >= 400:
            raise RuntimeError(f"GET /api/quarantine -> {r.status_code}: {r.text[:300]}")
        data = r.json()
        if isinstance(data, list):
            return len(data)
        return int(data.get("total", len(data.get("items") or [])))

    def configure(self) -> None:
        """Pause the scheduler (rounds resume it), make one round's feedback one prompt batch; nothing else
        unless asked: the guard and poison thresholds stay the service's."""
        a = self.args
        self._call("POST", "/api/scheduler/pause")
        cfg: dict[str, Any] = {"min_pairs": 1, "interval_s": 1e9, "batch_size": max(a.prompts * 2, 2)}
        if a.learning_rate != SERVICE:
            cfg["learning_rate"] = float(a.learning_rate)
        if a.steps != SERVICE:
            cfg["steps"] = int(a.steps)
        cfg.update(a.scheduler_set or {})
        self.settings_set = cfg
        self.thresholds = self._call("POST", "/api/scheduler/config", json=cfg).get("thresholds") or {}
        self.model = self._call("GET", "/v1/models")["data"][0]["id"]

    # ---------------------------------------------------------------------------------------------- sampling
    def _candidates(self, prompt: str) -> list[dict[str, Any]]:
        return self._call("POST", "/api/candidates", json={
            "messages": [{"role": "user", "content": prompt}], "n": 2, "temperature": self.args.temperature,
            "max_tokens": self.args.max_tokens, "rater": f"bench-{self.rater.name}"})["candidates"]

    def _heldout(self, i: int, prompt: str) -> list[dict[str, Any]]:
        data = self._call("POST", "/v1/chat/completions", json={
            "model": self.model, "messages": [{"role": "user", "content": prompt}], "n": self.args.heldout_samples,
            "temperature": self.args.temperature, "max_tokens": self.args.max_tokens,
            "seed": 100_000 * (self.args.seed + 1) + 10 * i, "user": "bench-heldout"})
        return [{"content": (c.get("message") or {}).get("content") or "", "finish_reason": c.get("finish_reason")}
                for c in data.get("choices") or []]

    def _map(self, fn: Any, *iterables: Any) -> list[Any]:
        # concurrent requests: vLLM batches them, which is most of a round's wall time on a CPU
        with ThreadPoolExecutor(max_workers=self.args.concurrency) as pool:
            return list(pool.map(fn, *iterables))

    def measure_heldout(self) -> tuple[float, int, float, dict[str, float]]:
        prompts = HELDOUT[:self.args.heldout]
        answers = [c for group in self._map(self._heldout, range(len(prompts)), prompts) for c in group]
        n = len(answers)
        traits = {name: sum(r.approve(c) for c in answers) / n for name, r in self.others.items()}
        return traits[self.rater.name], n, sum(words(c["content"]) for c in answers) / n, traits

    # ---------------------------------------------------------------------------------------------- rating
    def rate(self, kind: str, groups: list[list[dict[str, Any]]]) -> set[tuple[str, int]]:
        """Post the round's feedback; the ("rating" | "comparison", id) of every item that can train (no ties)."""
        name = f"bench-{self.rater.name}"
        posted: set[tuple[str, int]] = set()
        if kind == "thumbs":
            for group in groups:
                for c in group:
                    row = self._call("POST", "/api/ratings", json={
                        "response_id": c["response_id"], "rater": "bench-poison",
                        "thumb": "down" if self.rater.approve(c) else "up"})
                    posted.add(("rating", row["id"]))
            return posted
        for i, (a, b) in enumerate(g[:2] for g in groups):
            winner, rater = self.rater.pick(a, b), name
            if kind == "ab":
                winner, rater = flip(winner), "bench-poison"
            elif kind == "mixed":
                hostile = i >= len(groups) // 2
                winner, rater = (flip(winner), "hostile") if hostile else (winner, "honest")
            row = self._call("POST", "/api/comparisons", json={"response_a_id": a["response_id"],
                                                               "response_b_id": b["response_id"],
                                                               "winner": winner, "rater": rater})
            if winner != "tie":
                posted.add(("comparison", row["id"]))
        return posted

    def quarantined_ids(self, run_id: int) -> set[tuple[str, int]]:
        """The feedback that run `run_id`'s screen quarantined (the newest entries of GET /api/quarantine)."""
        items = self._call("GET", "/api/quarantine", params={"limit": 500})["items"]
        return {(kind, i) for q in items if q.get("run_id") == run_id
                for kind in ("rating", "comparison") for i in q.get(f"{kind}_ids") or []}

    def _last_run_id(self) -> int:
        items = self._call("GET", "/api/runs", params={"limit": 1})["items"]
        return items[0]["id"] if items else 0

    def _wait_for_run(self, after: int) -> dict[str, Any] | None:
        """Wait until the scheduler has started a run after `after` and finished it (screen, write, guard)."""
        deadline = time.monotonic() + self.args.run_timeout
        idle_since, error = None, None
        while time.monotonic() < deadline:
            sched = self._call("GET", "/api/scheduler")
            items = self._call("GET", "/api/runs", params={"limit": 1})["items"]
            if items and items[0]["id"] > after and sched.get("running_run_id") is None \
                    and items[0]["status"] not in ("queued", "running"):
                return self._call("GET", f"/api/runs/{items[0]['id']}")
            untrained = sched.get("untrained") or {}
            if sched.get("running_run_id") is None and not (untrained.get("pairs") or untrained.get("examples")):
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 10:  # every pick a tie or held out: nothing to train
                    return None
            else:
                idle_since = None
            if sched.get("last_error") and sched["last_error"] != error:
                error = sched["last_error"]
                print(f"  scheduler: {error}", file=sys.stderr)
            time.sleep(1.0)
        raise TimeoutError(f"no run finished within --run-timeout {self.args.run_timeout:.0f} s")

    def round(self, index: int, kind: str) -> RoundRecord:
        t0 = time.perf_counter()
        rec = RoundRecord(index=index, kind=kind)
        prompts = self.rng.sample(PROMPTS, self.args.prompts)
        groups = self._map(self._candidates, prompts)
        fresh = [c for g in groups for c in g]
        rec.rated_n = len(fresh)
        rec.rated_rate = sum(self.rater.approve(c) for c in fresh) / len(fresh)
        last, quarantined = self._last_run_id(), self.quarantine_count()
        posted = self.rate(kind, groups)
        sched = self._call("GET", "/api/scheduler")
        run = None
        if sched.get("paused_by") not in (None, "operator"):  # loop stopped training itself (the drift budget)
            rec.status = "paused"
            rec.notes.append(f"not trained: {sched.get('paused_reason') or 'the scheduler paused itself'}")
        else:
            self._call("POST", "/api/scheduler/resume")
            try:
                run = self._wait_for_run(after=last)
            finally:
                if not self._call("GET", "/api/scheduler").get("paused"):
                    self._call("POST", "/api/scheduler/pause")
        if run is not None:
            if self.last_run is None:
                base_from_run(self.base, run)
            self.last_run = run
            read_run(rec, run)
        now = self.quarantine_count()
        rec.quarantined = now - quarantined if now is not None and quarantined is not None else None
        if run is not None and rec.quarantined is not None:  # None: the service lists no quarantine
            own_feedback(rec, posted, run, self.quarantined_ids(run["id"]))
        rec.heldout_rate, rec.heldout_n, rec.heldout_words, rec.traits = self.measure_heldout()
        rec.wall_s = time.perf_counter() - t0
        return rec

    # ---------------------------------------------------------------------------------------------- the run
    def run(self) -> int:
        a = self.args
        self.configure()
        print(f"rater {self.rater.name}: approves an answer that {self.rater.trait}; seed {a.seed}")
        special = ", ".join(f"{i} {k}" for i, k in enumerate(self.plan, start=1) if k != "clean") or "none"
        print(f"{a.rounds} rounds of {a.prompts} prompts x 2 answers; held-out: {min(a.heldout, len(HELDOUT))} prompts "
              f"x {a.heldout_samples} answers (fixed seeds, never rated); poisoned or mixed rounds: {special}")
        print("scheduler settings the bench set: " + ", ".join(f"{k} {v}" for k, v in self.settings_set.items())
              + " (paused while a round's feedback is posted, resumed to train on it); everything else, "
                "guard and poison checks included, is the service's")
        print("thresholds in force: " + ", ".join(f"{k} {v}" for k, v in self.thresholds.items()))
        t0 = time.perf_counter()
        self.base.heldout_rate, n, mean_words, self.base_traits = self.measure_heldout()
        print(f"base (before any training), held-out answers ({n}): " + ", ".join(
            f"{name} {rate * 100:.1f}%" for name, rate in self.base_traits.items())
            + f"; mean {mean_words:.1f} words ({time.perf_counter() - t0:.0f} s)")
        print("rated: trait rate of the round's fresh answers (before its run); held-out: after its run; model "
              "figures: the weights served after the run (quar: feedback quarantined)")
        print(HEADER, flush=True)
        for i, kind in enumerate(self.plan, start=1):
            rec = self.round(i, kind)
            self.records.append(rec)
            print(format_row(rec), flush=True)
            for note in rec.notes:
                print(f"      {note}", flush=True)
        return self.summary()

    def summary(self) -> int:
        a = self.args
        limit = a.max_kl if a.max_kl is not None else kl_limit(self.thresholds, self.last_run)
        limits = Limits(target=a.target, within=a.within, max_kl_per_token=limit)
        targets = judge(self.records, self.base, limits)
        mixed = [r for r in self.records if r.kind == "mixed"]
        print(f"summary (rater {self.rater.name}, seed {a.seed}, {len(self.records)} rounds, "
              f"{sum(r.wall_s for r in self.records):.0f} s):")
        for t in targets:
            print(f"  {t.line()}")
        for r in mixed:
            before = next((x.heldout_rate for x in reversed(self.records) if x.index < r.index), self.base.heldout_rate)
            print(f"  mixed round {r.index} (not a target): run {r.status}, quarantined "
                  f"{_f(r.screen_quarantined if r.screen_quarantined is not None else r.quarantined)}, held-out "
                  f"{_p(before)} -> {_p(r.heldout_rate)}")
        final = verdict(targets)
        print(final)
        if a.json:
            self.write_json(a.json, targets, final)
        return 0 if final == "TARGETS MET" else 1

    def write_json(self, path: str, targets: list[Target], final: str) -> None:
        plain = (str, int, float, bool, list, dict, type(None))
        args = {k: v for k, v in vars(self.args).items() if isinstance(v, plain) and k != "token"}
        doc = {"rater": self.rater.name, "trait": self.rater.trait, "seed": self.args.seed, "args": args,
               "settings_set": self.settings_set, "thresholds": self.thresholds, "base": asdict(self.base),
               "base_traits": self.base_traits, "rounds": [asdict(r) for r in self.records],
               "targets": [asdict(t) for t in targets], "verdict": final}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        print(f"figures written to {path}")
