"""The driver of `loop bench learning` (loop/bench/learning/suite.py) against a small fake of loop's HTTP API:
what each round kind posts, how run records are read (defensively), the table row, and a whole run's summary and
JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from loop.bench.learning.suite import HELDOUT, PROMPTS, Suite, format_row, kl_limit, own_feedback, read_run
from loop.bench.learning.targets import RoundRecord
from loop.cli import build_parser

GOOD, BAD = "The answer is 4.", "I think that it might be something else entirely, maybe, or not, perhaps!"


class FakeLoop:
    """Just enough of loop's API: answers get better with every kept run; a batch with poisoned feedback is rejected."""

    def __init__(self, quarantine: bool = False, run_extra: dict[str, Any] | None = None,
                 withhold: bool = False) -> None:
        self.quarantine = quarantine
        self.withhold = withhold  # a poisoned batch: its poisoned items quarantined, the run trains on the rest
        self.entries: list[dict[str, Any]] = []
        self.run_extra = run_extra or {}
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self.pending: list[dict[str, Any]] = []
        self.runs: list[dict[str, Any]] = []
        self.paused = False
        self.paused_by: str | None = None  # "drift": loop paused itself; the bench must not resume it
        self.kept = 0
        self.seeds: list[int] = []
        self.n = 0

    def answer(self, i: int) -> dict[str, Any]:
        self.n += 1
        good = (i + self.kept) % 4 < 1 + self.kept  # 1 in 4 at first, all after 3 kept runs
        return {"content": GOOD if good else BAD, "finish_reason": "stop"}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path, body = request.url.path, json.loads(request.content or b"{}")
        if request.method == "POST":
            self.posts.append((path, body))
        if path == "/api/scheduler/pause":
            self.paused = True
            return httpx.Response(200, json={})
        if path == "/api/scheduler/resume":
            self.paused = False
            if self.pending:
                self.train()
            return httpx.Response(200, json={})
        if path == "/api/scheduler/config":
            return httpx.Response(200, json={"thresholds": {**body, "max_kl_per_token": 0.05}})
        if path == "/api/scheduler":
            return httpx.Response(200, json={"running_run_id": None, "untrained": {"pairs": 0, "examples": 0},
                                             "paused": self.paused or self.paused_by is not None,
                                             "paused_by": self.paused_by, "paused_reason": self.paused_by})
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake-model"}]})
        if path == "/api/candidates":
            return httpx.Response(200, json={"candidates": [
                {"response_id": f"resp-{self.n}-{j}", **self.answer(self.n + j)} for j in range(body["n"])]})
        if path == "/v1/chat/completions":
            self.seeds.append(body["seed"])
            return httpx.Response(200, json={"choices": [
                {"message": {"content": a["content"]}, "finish_reason": "stop"}
                for a in (self.answer(body["seed"] + j) for j in range(body["n"]))]})
        if path in ("/api/comparisons", "/api/ratings"):
            self.pending.append({**body, "id": len(self.posts), "kind": path.removeprefix("/api/")[:-1]})
            return httpx.Response(201, json={"id": len(self.posts)})
        if path == "/api/runs":
            return httpx.Response(200, json={"items": self.runs[-1:]})
        if path.startswith("/api/runs/"):
            return httpx.Response(200, json=self.runs[int(path.rsplit("/", 1)[1]) - 1])
        if path == "/api/quarantine":
            return httpx.Response(200, json={"items": self.entries[::-1], "total": 2 * len(self.runs)}) \
                if self.quarantine \
                else httpx.Response(404, json={"error": {"message": "no such route"}})
        return httpx.Response(404, json={"error": {"message": f"fake: {path}"}})

    def train(self) -> None:
        bad = [p for p in self.pending if p.get("rater") in ("bench-poison", "hostile")]
        poisoned = bool(bad) and not self.withhold
        status = "rejected" if poisoned else "succeeded"
        ids = {kind: [p["id"] for p in self.pending if p["kind"] == kind] for kind in ("rating", "comparison")}
        if bad and self.withhold:
            self.entries.append({"run_id": len(self.runs) + 1, **{f"{kind}_ids": [p["id"] for p in bad
                                                                                  if p["kind"] == kind]
                                                                  for kind in ("rating", "comparison")}})
        self.kept += status == "succeeded"
        health = {"stutter_rate": 0.0, "collapse_share": 0.1, "distinct_2": 0.8, "unfinished_rate": 0.0,
                  "mean_tokens": 12.0}
        ev = {"accuracy": 0.7, "canary_perplexity": 10.0, "health": health}
        self.runs.append({"id": len(self.runs) + 1, "status": status, "error": "screen: p 0.001" if poisoned else None,
                          "metrics": {"screen": {"p_value": 0.001 if poisoned else 0.6, "n": len(self.pending),
                                                 "quarantined": 0}},
                          "batch": {"rating_ids": ids["rating"], "comparison_ids": ids["comparison"]},
                          "eval_before": ev,
                          "eval_after": {**ev, "margin_change_t": 1.5,
                                         "drift": {"kl_per_token": 0.01, "perplexity_vs_base": 0.01}},
                          **self.run_extra})
        self.pending = []


def args_for(*extra: str) -> Any:
    args = build_parser().parse_args(["bench", "learning", "--prompts", "4", "--heldout", "4", *extra])
    args.scheduler_set = dict(args.scheduler_set)
    return args


def suite(fake: FakeLoop, plan: list[str], *extra: str) -> Suite:
    return Suite("http://loop", "token", args_for("--rounds", str(len(plan)), *extra), plan,
                 transport=httpx.MockTransport(fake))


def posted(fake: FakeLoop, path: str) -> list[dict[str, Any]]:
    return [b for p, b in fake.posts if p == path]


def test_a_whole_run_learns_stops_the_poison_and_writes_every_round(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeLoop()
    out = tmp_path / "rounds.json"
    s = suite(fake, ["clean", "ab", "clean", "thumbs", "clean", "clean"], "--rater", "number", "--json", str(out))
    assert s.run() == 0
    text = capsys.readouterr().out
    assert "rater number" in text and "min_pairs 1" in text
    assert not any("learning_rate" in body or "steps" in body for body in posted(fake, "/api/scheduler/config"))
    guard_keys = {"poison_alpha", "margin_alpha", "max_drift_kl", "max_perplexity_vs_base", "health_enabled",
                  "drift_enabled", "guard_enabled", "max_accuracy_drop", "max_perplexity_rise", "accuracy_alpha"}
    assert not any(guard_keys & set(body) for body in posted(fake, "/api/scheduler/config"))  # the defaults judge
    assert "trait: held-out trait rate" in text and "poison: round 2 (ab) rejected, round 4 (thumbs) rejected" in text
    assert "\nTARGETS MET\n" in text
    doc = json.loads(out.read_text())
    assert [r["kind"] for r in doc["rounds"]] == ["clean", "ab", "clean", "thumbs", "clean", "clean"]
    assert doc["rounds"][-1]["heldout_rate"] == 1.0 and doc["base"]["heldout_rate"] == 0.25
    assert doc["verdict"] == "TARGETS MET" and "token" not in doc["args"]
    assert {t["name"]: t["met"] for t in doc["targets"]}["poison"] is True
    # held-out prompts use the same seeds every round, and are never rated
    per_round = len(fake.seeds) // 7
    assert sorted(fake.seeds[:per_round]) == sorted(fake.seeds[-per_round:]) and len(set(fake.seeds[:per_round])) == 4
    rated = {b["response_a_id"] for b in posted(fake, "/api/comparisons")} | \
        {b["response_id"] for b in posted(fake, "/api/ratings")}
    assert all(i.startswith("resp-") for i in rated) and len(posted(fake, "/v1/chat/completions")) == 7 * 4


def test_each_round_kind_posts_its_feedback() -> None:
    fake = FakeLoop()
    s = suite(fake, ["clean"])
    s.configure()
    a = {"response_id": "ra", "content": GOOD, "finish_reason": "stop"}
    b = {"response_id": "rb", "content": BAD, "finish_reason": "length"}  # cut off: the short rater refuses it
    tie = {"response_id": "rc", "content": GOOD, "finish_reason": "stop"}
    s.rate("clean", [[a, b], [b, a], [a, tie]])
    assert [(c["winner"], c["rater"]) for c in posted(fake, "/api/comparisons")] == \
        [("a", "bench-short"), ("b", "bench-short"), ("tie", "bench-short")]
    fake.posts.clear()
    s.rate("ab", [[a, b], [a, tie]])
    assert [(c["winner"], c["rater"]) for c in posted(fake, "/api/comparisons")] == \
        [("b", "bench-poison"), ("tie", "bench-poison")]
    fake.posts.clear()
    s.rate("thumbs", [[a, b]])
    assert [(r["response_id"], r["thumb"], r["rater"]) for r in posted(fake, "/api/ratings")] == \
        [("ra", "down", "bench-poison"), ("rb", "up", "bench-poison")]
    fake.posts.clear()
    s.rate("mixed", [[a, b], [a, b], [a, b], [a, b]])
    assert [(c["winner"], c["rater"]) for c in posted(fake, "/api/comparisons")] == \
        [("a", "honest"), ("a", "honest"), ("b", "hostile"), ("b", "hostile")]


def test_scheduler_set_and_service_values_reach_the_config_call() -> None:
    fake = FakeLoop()
    suite(fake, ["clean"], "--learning-rate", "service", "--steps", "3",
          "--scheduler-set", "margin_alpha=0.05").configure()
    cfg = posted(fake, "/api/scheduler/config")[0]
    assert cfg == {"min_pairs": 1, "interval_s": 1e9, "batch_size": 8, "steps": 3, "margin_alpha": 0.05}
    assert fake.posts[0][0] == "/api/scheduler/pause"  # paused before anything can fire


def test_a_round_after_loop_paused_itself_is_not_trained_and_says_why() -> None:
    fake = FakeLoop()
    s = suite(fake, ["clean"])
    s.configure()
    fake.paused_by = "drift"
    rec = s.round(1, "clean")
    assert rec.status == "paused" and rec.run_id is None and "not trained: drift" in rec.notes[0]
    assert "/api/scheduler/resume" not in [path for path, _ in fake.posts]  # the bench leaves loop's pause alone


def test_quarantine_is_counted_where_the_service_lists_it() -> None:
    assert suite(FakeLoop(), ["clean"]).quarantine_count() is None
    fake = FakeLoop(quarantine=True)
    fake.runs = [{}, {}]
    assert suite(fake, ["clean"]).quarantine_count() == 4


def test_read_run_takes_the_served_weights_figures_and_tolerates_missing_ones() -> None:
    before = {"accuracy": 0.6, "canary_perplexity": 10.0}
    after = {"accuracy": 0.4, "canary_perplexity": 12.0, "margin_change_t": -3.0,
             "drift": {"kl_per_token": 0.2, "perplexity_vs_base": 0.2}, "health": {"stutter_rate": 0.3}}
    r = RoundRecord(index=1, kind="ab")
    read_run(r, {"id": 7, "status": "rolled_back", "rollback_reason": "margins fell", "eval_before": before,
                 "eval_after": after})
    assert (r.run_id, r.status, r.accuracy, r.perplexity, r.margin_t) == (7, "rolled_back", 0.6, 10.0, -3.0)
    assert r.kl_per_token is None and r.stutter is None  # the served weights are the ones before: no drift reported
    assert "margins fell" in r.notes[0] and "kl/tok 0.2000" in r.notes[0]
    kept = RoundRecord(index=2, kind="clean")
    read_run(kept, {"id": 8, "status": "succeeded", "eval_before": before, "eval_after": after,
                    "metrics": {"screen": {"p_value": 0.5, "n": 12, "quarantined": 1}}})
    assert (kept.accuracy, kept.kl_per_token, kept.stutter, kept.screen_p, kept.screen_n, kept.screen_quarantined) == \
        (0.4, 0.2, 0.3, 0.5, 12, 1)
    anchored = RoundRecord(index=4, kind="ab")
    read_run(anchored, {"id": 10, "status": "succeeded", "metrics": {"screen": {
        "p_value": 0.004, "direction": "both", "n_anchors": 9, "ms": 1234.5,
        "p_by_direction": {"learned": 0.09, "anchors": 0.001, "both": 0.004}}}})
    assert anchored.screen_p_by == {"learned": 0.09, "anchors": 0.001, "both": 0.004}
    assert any("learned 0.0900, anchors 0.0010, both 0.0040 (9 anchor pairs" in n for n in anchored.notes)
    bare = RoundRecord(index=3, kind="clean")
    read_run(bare, {"id": 9, "status": "failed", "error": "worker died", "metrics": None, "eval_after": None})
    assert bare.status == "failed" and bare.accuracy is None and bare.notes == ["failed: worker died"]


def test_a_row_prints_dashes_for_missing_figures() -> None:
    row = format_row(RoundRecord(index=3, kind="thumbs", rated_rate=0.25, heldout_rate=0.5))
    assert row.split()[:6] == ["3", "thumbs", "25.0%", "50.0%", "-", "-"]
    assert "nan" not in row and "None" not in row


def test_the_drift_limit_comes_from_the_service() -> None:
    assert kl_limit({"max_kl_per_token": 0.05}, None) == 0.05
    assert kl_limit({}, {"eval_after": {"drift": {"max_kl_per_token": 0.1}}}) == 0.1
    assert kl_limit({"max_kl_per_token": True}, {"eval_after": None}) is None


def test_held_out_prompts_are_never_rated_prompts() -> None:
    assert not set(HELDOUT) & set(PROMPTS) and len(set(HELDOUT)) == len(HELDOUT)


def test_the_rounds_own_feedback_is_followed_into_the_batch_and_the_quarantine() -> None:
    posted = {("comparison", 1), ("comparison", 2), ("comparison", 3), ("rating", 7)}
    run = {"id": 4, "status": "succeeded", "batch": {"comparison_ids": [1, 2, 9], "rating_ids": []}}
    quarantined = {("comparison", 1), ("comparison", 2), ("comparison", 9), ("rating", 7)}
    r = RoundRecord(index=4, kind="ab", status="succeeded")
    own_feedback(r, posted, run, quarantined)  # 3 waits (not taken up); 7 was screened beside the batch
    assert (r.own_taken, r.own_quarantined) == (3, 3) and r.withheld and r.stopped
    assert "all 3 items the run took up were quarantined" in r.notes[-1]
    r = RoundRecord(index=4, kind="ab", status="succeeded")
    own_feedback(r, posted, run, quarantined - {("comparison", 2)})  # comparison 2 trained
    assert (r.own_taken, r.own_quarantined) == (3, 2) and not r.withheld and not r.stopped
    r = RoundRecord(index=4, kind="ab", status="succeeded")
    own_feedback(r, posted, {"id": 4, "status": "succeeded"}, quarantined)  # a service that names no feedback
    assert r.own_taken is None and not r.withheld


def test_rating_posts_return_the_ids_that_can_train() -> None:
    fake = FakeLoop()
    s = suite(fake, ["ab"], "--rater", "number")
    groups = [[{"response_id": "a", "content": GOOD, "finish_reason": "stop"},
                {"response_id": "b", "content": BAD, "finish_reason": "stop"}],
              [{"response_id": "c", "content": GOOD, "finish_reason": "stop"},
               {"response_id": "d", "content": GOOD, "finish_reason": "stop"}]]  # a tie: never a pair
    ids = s.rate("ab", groups)
    assert ids == {("comparison", 1)} and len(posted(fake, "/api/comparisons")) == 2
    assert s.rate("thumbs", groups) == {("rating", n) for n in (3, 4, 5, 6)}


def test_a_poisoned_round_held_back_by_the_screen_per_rater_counts_as_stopped(tmp_path: Path) -> None:
    """The service quarantines the poisoned items and trains on the rest of the batch: the run succeeds, the
    poison never reaches the weights, and the summary says so."""
    fake = FakeLoop(quarantine=True, withhold=True)
    out = tmp_path / "rounds.json"
    s = suite(fake, ["clean", "ab", "clean", "thumbs"], "--rater", "number", "--json", str(out))
    s.run()
    doc = json.loads(out.read_text())
    poison = next(t for t in doc["targets"] if t["name"] == "poison")
    assert poison["met"] is True, poison
    assert "round 2 (ab) succeeded, its" in poison["text"] and "round 4 (thumbs) succeeded, its" in poison["text"]
    rounds = {r["index"]: r for r in doc["rounds"]}
    assert rounds[2]["own_taken"] == rounds[2]["own_quarantined"] > 0
    assert rounds[1]["own_taken"] > 0 and rounds[1]["own_quarantined"] == 0
