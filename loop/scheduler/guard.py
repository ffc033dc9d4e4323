"""The eval guard: measure what vLLM actually serves before and after an update, and say when to roll back.

What: two figures read through vLLM's own completions API (token-id prompts, `prompt_logprobs=0`,
`max_tokens=1`), so they describe the weights vLLM serves right now, not a copy that might differ:
- on the eval pairs (`batches.eval_pairs`: held-out pairs plus pairs kept runs learned from, all older than the
  run's batch): log p(answer | prompt) of both answers, scored on exactly the token ids the worker trains
  (loop/worker/tokens.py: the ids vLLM produced when the pair carries them, else the tokenised text); from
  them the accuracy (ties count one half) and, after an update, the margin change
  log p(chosen) - log p(rejected) summed (`mean_reward_margin`), the share that grew (`reward_accuracy`) and per
  answer token (`mean_token_margin_change`, `margin_change_t`: that mean in standard errors, and
  `margin_change_p`: the exact sign-flip p-value of the per-pair changes, loop.stats.sign_flip_p);
- perplexity on a fixed canary set (`canary.jsonl`): a broad damage detector.
`verdict(before, after, ...)` returns the reason to roll back, or None: with at least `min_pairs` pairs, the
per-token margin changes point down at significance `margin_alpha` (one-sided sign-flip test: under "the update
did not move these preferences" each pair's change is as likely up as down, so an update that helped nothing is
rolled back with probability at most `margin_alpha`; per token, so a shift of every token's log-prob does not
read as a preference for the shorter answer), or the accuracy fell by more than `max_accuracy_drop`; and always,
canary perplexity rose by more than `max_perplexity_rise` or is not finite. The accuracy criterion needs the drop to
be more than chance too, when `accuracy_alpha` is set and the pairs were measured before: of the pairs whose
preference turned, enough more turned wrong than right (exact one-sided McNemar test, `turned_p`), because on a
few pairs one pair turning is already a drop of 1/n (an eighth of 8 pairs), which honest updates do by chance.
Why these criteria and thresholds, with the benchmark figures behind them: the measurements document.
Tests: `.venv/bin/python -m pytest -q tests/unit/scheduler/test_guard.py`. By hand against a running vLLM:
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

from loop.stats import sign_flip_p, t_statistic, turned_p
from loop.worker import tokens
from loop.worker.protocol import Pair

CANARY_PATH = Path(__file__).with_name("canary.jsonl")


class PostClient(Protocol):
    """What the guard needs from `loop.vllm.client.VLLMClient`."""

    async def post(self, path: str, content: bytes, *, timeout: float | None = None) -> Any: ...

    async def get(self, path: str, *, timeout: float | None = None) -> Any: ...


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
    margin_change_p: float | None = None  # one-sided sign-flip p-value that the per-token changes point down
    # after an update: pairs whose preference turned wrong (chosen ahead before, not after) and right, and the
    # one-sided p-value that as many more turned wrong by chance (loop.stats.turned_p)
    turned_wrong: int | None = None
    turned_right: int | None = None
    turned_p: float | None = None
    drift: dict[str, Any] | None = None  # after a run: against the base model (watch.py)
    health: dict[str, Any] | None = None  # after a run: the canary answers' figures (watch.py)
    pair_logps: list[tuple[float, float]] | None = None  # (log p(chosen), log p(rejected)) per pair
    pair_tokens: list[tuple[int, int]] | None = None  # answer tokens scored (chosen, rejected) per pair

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("pair_logps")
        out.pop("pair_tokens")
        return out


class GuardError(RuntimeError):
    """The measurement itself failed (vLLM down, bad answer)."""


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


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
            max_perplexity_rise: float, min_pairs: int = 5, margin_alpha: float | None = None,
            accuracy_alpha: float | None = None) -> str | None:
    """Why the update must be rolled back, or None when it may stay. `margin_alpha` None or 0: no margin
    criterion. `accuracy_alpha` None or 0 (or no turned-pair figures): an accuracy drop past the limit is enough."""
    reasons = []
    judged = after.n_pairs >= min_pairs
    p = after.margin_change_p
    if judged and margin_alpha and p is not None and p < margin_alpha:
        wrong = f", {1 - after.reward_accuracy:.0%} of them moved down" if after.reward_accuracy is not None else ""
        reasons.append(f"the update moved the held-out preferences the wrong way: per answer token the margin "
                       f"log p(chosen) - log p(rejected) changed by {after.mean_token_margin_change:+.4f} nats on "
                       f"average (sign-flip test p = {p:.2g} < {margin_alpha:.2g}; {after.n_pairs} pairs{wrong}; "
                       f"summed over the answer {after.mean_reward_margin:+.3f} nats)")
    if judged and before.accuracy is not None and after.accuracy is not None:
        drop = before.accuracy - after.accuracy
        tested = bool(accuracy_alpha) and after.turned_p is not None
        if drop > max_accuracy_drop + 1e-9 and (not tested or after.turned_p < accuracy_alpha):  # type: ignore[operator]
            chance = (f"; {after.turned_wrong} pairs turned wrong and {after.turned_right} right, "
                      f"p = {after.turned_p:.2g} < {accuracy_alpha:.2g}") if tested else ""
            reasons.append(f"held-out preference accuracy fell from {before.accuracy:.3f} to {after.accuracy:.3f} "
                           f"(-{drop:.3f} > limit {max_accuracy_drop:.3f}, {after.n_pairs} pairs{chance})")
    rise = after.canary_perplexity / before.canary_perplexity - 1.0
    if not math.isfinite(after.canary_perplexity) or rise > max_perplexity_rise + 1e-9:
        reasons.append(f"canary perplexity rose from {before.canary_perplexity:.3f} to "
                       f"{after.canary_perplexity:.3f} (+{rise * 100:.1f} % > limit {max_perplexity_rise * 100:.1f} %)")
    return "; ".join(reasons) or None


class EvalGuard:
    """Measures held-out preference accuracy and canary perplexity through vLLM's completions API."""

    def __init__(self, client: PostClient, tokenizer: Any, *, model_name: str | None = None,
                 max_len: int = 2048, canary: Sequence[str] | None = None, timeout: float = 300.0,
                 train_max_len: int = tokens.DEFAULT_MAX_LEN) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_len = max_len  # vLLM's context: a scored prompt leaves room for the one token it generates
        self.train_max_len = train_max_len  # the runs' max_len: pairs are cut exactly as the worker cuts them
        self.canary = list(canary) if canary is not None else load_canary()
        self.timeout = timeout
        self._canary_ids = [self._encode_text(t) for t in self.canary]

    # ------------------------------------------------------------------ tokenisation
    def _encode_text(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        return ids[: self.max_len - 1]

    def rows(self, pair: Pair) -> list[tuple[list[int], int]]:
        """(prompt + answer ids, where the answer starts) for the chosen and the rejected answer: the worker's
        rows for this pair (tokens.encode_pair), within vLLM's context."""
        enc = tokens.encode_pair(self.tokenizer, pair, min(self.train_max_len, self.max_len - 1))
        return [(enc.prompt + answer, len(enc.prompt)) for answer in enc.answers]

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
    async def measure(self, pairs: Sequence[Pair], before: EvalFigures | None = None) -> EvalFigures:
        """Figures for the live weights; with `before` (the same pairs, measured before an update), also the
        update's reward accuracy."""
        t0 = time.perf_counter()
        prompts: list[list[int]] = []
        starts: list[int] = []
        for pair in pairs:
            for ids, start in self.rows(pair):
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
        turned: tuple[int, int] | None = None
        if before is not None and before.pair_logps is not None and len(before.pair_logps) == len(logps):
            signs = [(_sign(bc - br), _sign(m)) for (bc, br), m in zip(before.pair_logps, margins)]
            turned = (sum(a > b for a, b in signs), sum(a < b for a, b in signs))
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
                           turned_wrong=turned[0] if turned else None, turned_right=turned[1] if turned else None,
                           turned_p=turned_p(*turned) if turned else None,
                           margin_change_t=t_statistic(per_token or []),
                           margin_change_p=sign_flip_p(per_token) if per_token else None,
                           pair_logps=logps, pair_tokens=lengths)


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
        pair = Pair([{"role": "user", "content": "What is 2+2?"}], "2+2 is 4.", "Bananas are yellow fish.")
        print(json.dumps((await guard.measure([pair])).to_dict(), indent=1))
        await client.aclose()

    asyncio.run(_main())
