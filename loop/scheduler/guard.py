"""The eval guard: measure what vLLM actually serves before and after an update, and say when to roll back.

Two figures, both read through vLLM's own OpenAI API (`POST /v1/completions` with token-id prompts,
`prompt_logprobs=0`, `max_tokens=1`), so they describe the weights vLLM is serving right now — not a copy in the
trainer that might differ (stale prepacked linears, a missed prefix-cache reset, a half-applied update):

- preference accuracy on held-out pairs: the share of pairs where log p(chosen | prompt) > log p(rejected | prompt)
  (sums over the answer tokens; a tie counts one half) — and, after an update, how the update moved each pair's
  margin log p(chosen) - log p(rejected) (DPO's implicit reward with the pre-update weights as reference): summed
  (`mean_reward_margin`, nats), the share that grew (`reward_accuracy`) and, the judged figure, per answer token
  (`mean_token_margin_change`, and `margin_change_t`: that mean in standard errors). The held-out slice is
  feedback never trained on (see `batches.is_held_out`).
- perplexity on a fixed canary set (`canary.jsonl`: short general texts written for this project): a broad
  damage detector — an update that wrecks the language model raises it even when the preference looks fine.

Which pairs judge an update (the scheduler's choice, `batches.held_out_pairs(created_before=...)`): only held-out
pairs whose feedback is OLDER than everything in the run's batch and than the previous scheduled batch: the set is
frozen when the batch's feedback began to be collected (`Scheduler._eval_cutoff`). Why: feedback collected
together with a batch comes from the same session and rater, so it shares the batch's mistakes — in `loop bench
learning` ~5 of the 14 held-out pairs measured for the poisoned round were that round's own flipped labels, and
they voted for the poison. Judging an update on earlier feedback asks the question that matters: does the update
undo preferences we already trusted? (The first runs of a fresh service have no older held-out pairs; they are
judged on perplexity alone, see `min_pairs`.)

Beside the held-out pairs the scheduler replays up to `eval_replay_pairs` pairs that KEPT runs learned from
(`batches.trained_pairs`, same freezing): a flipped-label batch contradicts exactly what earlier batches taught, so
it pulls those fitted margins down hard, while unseen pairs move little either way in one small update (with a
second seed of `loop bench learning` the held-out t read -1.60 for a good round and -0.68 for the poisoned one).
Pairs of rolled-back runs never judge.

A poisoned batch is first met before the write, in the worker (loop/worker/agreement.py: the update's direction
against the weights' change since the base model, measured on the exact fp32 update; its limit `max_conflict_t`
is off by default): in `loop bench learning`, once the first rounds trained on ~20 pairs, that check told
poisoned rounds from good ones where the margin test below could not (its t values overlap for one small update:
over session 3 it rolled back 8 of ~36 good rounds and caught 3 of 7 poisoned ones). The test below stays as the
second line, after the write.

`verdict(before, after, ...)` returns the reason to roll back, or None. Preference criteria, each only with at
least `min_pairs` held-out pairs (fewer are noise):
- the margins moved the wrong way: the mean per-token margin change lies more than `max_margin_t` standard errors
  below zero (a one-sided t test). Why this figure (measured in `loop bench learning`, lr 1e-5 x 2 steps):
  * raw accuracy is blind to a mild poison: summed log-probs favour the shorter answer by many nats, so a
    short-answer rater's pairs read ~100 % before and after a poisoned round; the margins move a fraction of a
    nat and rarely cross zero;
  * each pair's margin change is mostly noise (APOLLO-Mini's random projections, 2 small steps): a good run moved
    21 unseen pairs by +0.26 +- 1.2 nats summed and +0.016 +- 0.045 nats per token, 40 % of them the wrong way.
    A bare majority or a fixed nats floor therefore rolled back a good run (5 of 6 pairs down, -0.41 nats),
    while a test against the spread only fires when the drop is large for the number of pairs measured;
  * per token, not summed: an update that shifts every token's log-prob a little (DPO moves the likelihood of
    all sampled text) moves a summed margin by that shift times the length difference of the two answers — for
    a length-preferring rater that is the very thing judged. Per token that shift cancels; in the measurement
    above the mean grew from 0.21 to 0.36 standard deviations of a pair.
  * the threshold (`max_margin_t`, default 1.0): in two 8-round benchmark runs the 12 good runs judged on >= 5
    pairs measured t = +0.85 +- 0.7 (lowest -0.66), the two poisoned rounds -1.67 and -1.52 (21-22 pairs); 1.0
    sits in that gap, ~2.5 spreads below the good runs (a good run is rolled back well under 1 % of the time).
- raw held-out accuracy fell by more than `max_accuracy_drop` (absolute).
And always: canary perplexity rose by more than `max_perplexity_rise` (relative), or is not finite.

Try it by hand against a running vLLM:
    python -m loop.scheduler.guard http://127.0.0.1:8001 /root/.cache/loop/models/SmolLM2-135M-Instruct-bf16
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from loop.stats import t_statistic

CANARY_PATH = Path(__file__).with_name("canary.jsonl")


class PostClient(Protocol):
    """What the guard needs from `loop.vllm.client.VLLMClient`."""

    async def post(self, path: str, content: bytes, *, timeout: float | None = None) -> Any: ...

    async def get(self, path: str, *, timeout: float | None = None) -> Any: ...


@dataclass(frozen=True)
class EvalPair:
    """One held-out preference: the prompt (text or chat messages) and two answers, the first preferred."""

    prompt: str | list[dict[str, str]]
    chosen: str
    rejected: str
    chosen_cut: bool = False  # cut off by max_tokens: scored without the end token, as it is trained
    rejected_cut: bool = False


@dataclass
class EvalFigures:
    accuracy: float | None  # None when there are no held-out pairs yet
    n_pairs: int
    mean_margin: float | None  # mean of log p(chosen) - log p(rejected), nats (sums over the answer tokens)
    canary_perplexity: float
    canary_tokens: int
    ms: float
    reward_accuracy: float | None = None  # after an update: share of held-out margins that grew
    mean_reward_margin: float | None = None  # after an update: mean change of the margin, nats
    # after an update, per answer token: mean over pairs of d(log p(chosen))/len(chosen) - d(log p(rejected))/len(
    # rejected), nats per token, and that mean in standard errors (t statistic; None below 2 pairs or no spread)
    mean_token_margin_change: float | None = None
    margin_change_t: float | None = None
    pair_logps: list[tuple[float, float]] | None = None  # (log p(chosen), log p(rejected)) per pair
    pair_tokens: list[tuple[int, int]] | None = None  # answer tokens scored (chosen, rejected) per pair

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("pair_logps")
        out.pop("pair_tokens")
        return out


class GuardError(RuntimeError):
    """The measurement itself failed (vLLM down, bad answer)."""


def load_canary(path: Path = CANARY_PATH) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                texts.append(json.loads(line)["text"])
    if not texts:
        raise GuardError(f"the canary file {path} is empty")
    return texts


def verdict(before: EvalFigures, after: EvalFigures, *, max_accuracy_drop: float,
            max_perplexity_rise: float, min_pairs: int = 5, max_margin_t: float | None = None) -> str | None:
    """Why the update must be rolled back, or None when it may stay. `max_margin_t` None: no margin criterion."""
    reasons = []
    judged = after.n_pairs >= min_pairs
    t = after.margin_change_t
    if judged and max_margin_t is not None and t is not None and t < -max_margin_t - 1e-9:
        wrong = f", {1 - after.reward_accuracy:.0%} of them moved down" if after.reward_accuracy is not None else ""
        reasons.append(f"the update moved the held-out preferences the wrong way: per answer token the margin "
                       f"log p(chosen) - log p(rejected) changed by {after.mean_token_margin_change:+.4f} nats on "
                       f"average, {t:+.2f} standard errors < -{max_margin_t:.2f} ({after.n_pairs} pairs{wrong}; "
                       f"summed over the answer {after.mean_reward_margin:+.3f} nats)")
    if judged and before.accuracy is not None and after.accuracy is not None:
        drop = before.accuracy - after.accuracy
        if drop > max_accuracy_drop + 1e-9:
            reasons.append(f"held-out preference accuracy fell from {before.accuracy:.3f} to {after.accuracy:.3f} "
                           f"(-{drop:.3f} > limit {max_accuracy_drop:.3f}, {after.n_pairs} pairs)")
    rise = after.canary_perplexity / before.canary_perplexity - 1.0
    if not math.isfinite(after.canary_perplexity) or rise > max_perplexity_rise + 1e-9:
        reasons.append(f"canary perplexity rose from {before.canary_perplexity:.3f} to "
                       f"{after.canary_perplexity:.3f} (+{rise * 100:.1f} % > limit {max_perplexity_rise * 100:.1f} %)")
    return "; ".join(reasons) or None


class EvalGuard:
    """Measures held-out preference accuracy and canary perplexity through vLLM's completions API."""

    def __init__(self, client: PostClient, tokenizer: Any, *, model_name: str | None = None,
                 max_len: int = 2048, canary: Sequence[str] | None = None, timeout: float = 300.0) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_len = max_len
        self.canary = list(canary) if canary is not None else load_canary()
        self.timeout = timeout
        self._canary_ids = [self._encode_text(t) for t in self.canary]

    # ------------------------------------------------------------------ tokenisation
    def _encode_text(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        return ids[: self.max_len - 1]

    def prompt_ids(self, prompt: str | list[dict[str, str]]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        # The chat template as text, then tokens: the same string vLLM's chat endpoint would have built.
        text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def answer_ids(self, answer: str, cut: bool = False) -> list[int]:
        ids = list(self.tokenizer(answer, add_special_tokens=False)["input_ids"])
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return ids + ([eos] if eos is not None and not cut else [])

    def _join(self, prompt: list[int], answer: list[int]) -> tuple[list[int], int]:
        """prompt + answer, keeping the answer whole: long prompts lose their oldest tokens."""
        room = self.max_len - 1 - len(answer)
        if room < 1:
            answer = answer[: self.max_len - 2]
            room = 1
        prompt = prompt[-room:]
        return prompt + answer, len(prompt)

    # ------------------------------------------------------------------ vLLM
    async def _model(self) -> str:
        if self.model_name is None:
            response = await self.client.get("/v1/models", timeout=30.0)
            data = response.json()
            self.model_name = data["data"][0]["id"]
        return self.model_name

    async def prompt_logprobs(self, prompts: list[list[int]]) -> list[list[float | None]]:
        """Per prompt, the log-prob vLLM gives each of its tokens (None for the first)."""
        if not prompts:
            return []
        body = {"model": await self._model(), "prompt": prompts, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": 0}
        try:
            response = await self.client.post("/v1/completions", json.dumps(body).encode(), timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001 - VLLMUnreachable, timeouts: the measurement failed
            raise GuardError(f"eval request to vLLM failed: {exc}") from exc
        if response.status_code != 200:
            raise GuardError(f"vLLM refused the eval request ({response.status_code}): {response.text[:300]}")
        choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        if len(choices) != len(prompts):
            raise GuardError(f"vLLM returned {len(choices)} choices for {len(prompts)} eval prompts")
        out = []
        for ids, choice in zip(prompts, choices):
            entries = choice.get("prompt_logprobs")
            if entries is None or len(entries) != len(ids):
                raise GuardError("vLLM returned no prompt_logprobs (or the wrong number) for an eval prompt")
            row: list[float | None] = []
            for tok, entry in zip(ids, entries):
                if entry is None:
                    row.append(None)
                    continue
                item = entry.get(str(tok))
                if item is None:
                    raise GuardError(f"vLLM's prompt_logprobs lack the prompt token {tok}")
                row.append(float(item["logprob"]))
            out.append(row)
        return out

    # ------------------------------------------------------------------ figures
    async def measure(self, pairs: Sequence[EvalPair], before: EvalFigures | None = None) -> EvalFigures:
        """Figures for the live weights; with `before` (the same pairs, measured before an update), also the
        update's reward accuracy."""
        t0 = time.perf_counter()
        prompts: list[list[int]] = []
        starts: list[int] = []
        for pair in pairs:
            p = self.prompt_ids(pair.prompt)
            for answer, cut in ((pair.chosen, pair.chosen_cut), (pair.rejected, pair.rejected_cut)):
                ids, start = self._join(p, self.answer_ids(answer, cut))
                prompts.append(ids)
                starts.append(start)
        n_canary = len(self._canary_ids)
        rows = await self.prompt_logprobs(self._canary_ids + prompts)
        nll, n_tok = 0.0, 0
        for row in rows[:n_canary]:
            vals = [v for v in row if v is not None]
            nll -= sum(vals)
            n_tok += len(vals)
        ppl = math.exp(nll / max(n_tok, 1))
        logps: list[tuple[float, float]] = []
        lengths: list[tuple[int, int]] = []
        pair_rows = rows[n_canary:]
        for i in range(0, len(pair_rows), 2):
            logps.append((sum(v for v in pair_rows[i][starts[i]:] if v is not None),
                          sum(v for v in pair_rows[i + 1][starts[i + 1]:] if v is not None)))
            lengths.append((max(len(prompts[i]) - starts[i], 1), max(len(prompts[i + 1]) - starts[i + 1], 1)))
        margins = [c - r for c, r in logps]
        rewards: list[float] | None = None
        per_token: list[float] | None = None
        if before is not None and before.pair_logps is not None and len(before.pair_logps) == len(logps):
            rewards = [(c - bc) - (r - br) for (c, r), (bc, br) in zip(logps, before.pair_logps)]
            per_token = [(c - bc) / lc - (r - br) / lr
                         for (c, r), (bc, br), (lc, lr) in zip(logps, before.pair_logps, lengths)]

        def share(ms: list[float] | None) -> float | None:
            return sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in ms) / len(ms) if ms else None

        return EvalFigures(accuracy=share(margins), n_pairs=len(margins),
                           mean_margin=(sum(margins) / len(margins)) if margins else None,
                           canary_perplexity=ppl, canary_tokens=n_tok,
                           ms=(time.perf_counter() - t0) * 1000, reward_accuracy=share(rewards),
                           mean_reward_margin=(sum(rewards) / len(rewards)) if rewards else None,
                           mean_token_margin_change=(sum(per_token) / len(per_token)) if per_token else None,
                           margin_change_t=t_statistic(per_token or []), pair_logps=logps, pair_tokens=lengths)


def load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


if __name__ == "__main__":  # manual check against a running vLLM
    import asyncio
    import sys

    from loop.vllm.client import VLLMClient

    async def _main() -> None:
        client = VLLMClient(sys.argv[1], timeout=300.0)
        guard = EvalGuard(client, load_tokenizer(sys.argv[2]))
        pair = EvalPair([{"role": "user", "content": "What is 2+2?"}], "2+2 is 4.", "Bananas are yellow fish.")
        print(json.dumps((await guard.measure([pair])).to_dict(), indent=1))
        await client.aclose()

    asyncio.run(_main())
