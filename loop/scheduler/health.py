"""Model health beside the eval guard: how far the live weights drifted from the base, and what they now generate.

Why: the guard (guard.py) compares a run with its own starting point, so many small kept runs can walk far from
the base model while each one passes, and none of its figures looks at generated text (a model can keep its
canary perplexity while most answers open with "1." or stutter "1. **1. **1."). Two cheap probes, both read
through vLLM's OpenAI API so they describe the weights vLLM serves right now:

- drift: `measure_reference` records, once while the base weights (version 0) are served, the top-k next-token
  log-probs at every canary position (canary.jsonl, the same token ids the guard scores, `/v1/completions` with
  `prompt_logprobs=k`); `measure_drift` later scores the same ids on the live weights and estimates
  KL(base || live) per token (`kl_top_k` says how, and its bias) and perplexity_vs_base = ppl_live / ppl_base - 1.
  A `DriftReference` is a JSON file that names its model, k and a hash of the canary ids; a stale one (other
  model, other canary or tokenizer) is refused (`StaleReference`).
- generation: `HealthProbe` samples the live model on fixed chat prompts (canary_prompts.jsonl) with a fixed
  temperature, seed per prompt and max_tokens, and `health_figures` computes repetition, stutter, diversity,
  length, unfinished and format-collapse figures over the answers.
`compare(base, live, limits)` and `drift_verdict(drift, limits)` return the reason to roll back, or None.
Every vLLM failure raises `HealthError` (a `guard.GuardError`).

Tests: `.venv/bin/python -m pytest -q tests/unit/scheduler/test_health.py`; against the real vLLM:
`.venv/bin/python -m pytest -q tests/e2e/test_health_e2e.py`. By hand against a running vLLM:
    python -m loop.scheduler.health unix:/path/to/vllm.sock /root/.cache/loop/models/SmolLM2-135M-Instruct-bf16
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loop.scheduler.guard import GuardError, PostClient, load_canary

CANARY_PROMPTS_PATH = Path(__file__).with_name("canary_prompts.jsonl")
DEFAULT_TOP_K = 20  # vLLM's default max_logprobs: a larger k is refused unless vLLM is started with more
REFERENCE_FORMAT = 1
_FLOOR = 1e-12  # smallest probability the remainder bucket may take (keeps log() finite)


class HealthError(GuardError):
    """A health measurement failed (vLLM down or refusing, an answer of the wrong shape, an unreadable file)."""


class StaleReference(HealthError):
    """The drift reference belongs to another model, canary, tokenizer or k: it cannot be compared."""


# ---------------------------------------------------------------------------------------------- vLLM requests
async def _served_name(client: PostClient, model_name: str | None) -> str:
    if model_name is not None:
        return model_name
    try:
        response = await client.get("/v1/models", timeout=30.0)
        return str(response.json()["data"][0]["id"])
    except Exception as exc:  # noqa: BLE001 - unreachable, refusing, or an answer without a model
        raise HealthError(f"cannot read the served model's name from vLLM's /v1/models: {exc}") from exc


async def _post(client: PostClient, path: str, body: dict[str, Any], timeout: float, what: str) -> dict[str, Any]:
    try:
        response = await client.post(path, json.dumps(body).encode(), timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - VLLMUnreachable, timeouts: the measurement failed
        raise HealthError(f"the {what} request to vLLM failed: {exc}") from exc
    if response.status_code != 200:
        raise HealthError(f"vLLM refused the {what} request ({response.status_code}): {response.text[:300]}")
    try:
        return response.json()
    except ValueError as exc:
        raise HealthError(f"vLLM's answer to the {what} request is not JSON: {response.text[:300]}") from exc


# ---------------------------------------------------------------------------------------------- drift
def canary_token_ids(tokenizer: Any, texts: Sequence[str] | None = None, max_len: int = 2048) -> list[list[int]]:
    """The canary's token ids exactly as the eval guard scores them (special tokens added, cut to vLLM's context
    minus the one token a completion generates)."""
    texts = list(texts) if texts is not None else load_canary()
    return [list(tokenizer(t, add_special_tokens=True)["input_ids"])[: max_len - 1] for t in texts]


def canary_hash(ids: Sequence[Sequence[int]]) -> str:
    return hashlib.sha256(json.dumps([list(row) for row in ids]).encode()).hexdigest()[:16]


@dataclass
class DriftReference:
    """The base model's next-token distribution on the canary: per scored position (every canary token after
    each text's first, texts in order), the top-k token ids and their log-probs, best first."""

    model: str  # the base model's identity (its folder or HF id), as the caller names it
    k: int
    canary_hash: str
    perplexity: float  # of the base on the canary tokens
    tokens: int  # scored positions
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]
    format: int = REFERENCE_FORMAT

    def check(self, model: str, ids: Sequence[Sequence[int]]) -> None:
        """Refuse (StaleReference) when this reference cannot describe `model` scored on canary `ids`."""
        problems = []
        if self.format != REFERENCE_FORMAT:
            problems.append(f"it has format {self.format}, this loop reads format {REFERENCE_FORMAT}")
        if self.model != model:
            problems.append(f"it belongs to model {self.model!r}, the base model now is {model!r}")
        if self.canary_hash != canary_hash(ids):
            problems.append("its canary token ids differ from the current canary's (another canary file or "
                            "tokenizer)")
        if len(self.top_ids) != self.tokens or len(self.top_logprobs) != self.tokens:
            problems.append("its per-position rows do not match its token count")
        if problems:
            raise StaleReference("the drift reference is stale: " + "; ".join(problems) + ". Measure a new one "
                                 "(measure_reference) while the base weights (version 0) are served.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DriftReference:
        try:
            ref = cls(model=str(data["model"]), k=int(data["k"]), canary_hash=str(data["canary_hash"]),
                      perplexity=float(data["perplexity"]), tokens=int(data["tokens"]),
                      top_ids=[[int(t) for t in row] for row in data["top_ids"]],
                      top_logprobs=[[float(v) for v in row] for row in data["top_logprobs"]],
                      format=int(data.get("format", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise HealthError(f"the drift reference lacks a field or has one of the wrong type ({exc!r}): "
                              f"measure a new one while the base weights are served") from exc
        return ref

    def save(self, path: Path) -> None:
        """Write atomically (a temporary file in the same folder, then renamed): a crash leaves the old file."""
        path = Path(path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(self.to_dict(), f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise HealthError(f"cannot write the drift reference to {path}: {exc}") from exc

    @classmethod
    def load(cls, path: Path) -> DriftReference:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise HealthError(f"cannot read the drift reference {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise HealthError(f"the drift reference {path} is not a JSON object")
        return cls.from_dict(data)


@dataclass
class Drift:
    kl_per_token: float  # estimated KL(base || live), nats per canary position (see kl_top_k)
    perplexity: float  # of the live weights on the canary
    perplexity_vs_base: float  # perplexity / the reference's - 1
    tokens: int
    top_k_mass: float  # mean base probability inside its top-k: the share of the distribution the estimate sees
    missing_share: float  # share of base top-k tokens absent from live's top-k (their log-prob was bounded)
    ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kl_top_k(base_ids: Sequence[int], base_logprobs: Sequence[float], live: dict[int, float],
             live_floor: float) -> tuple[float, int]:
    """Estimate KL(base || live) at one position from the base's top-k and what vLLM reports of live.

    `live`: the live log-probs vLLM returned (live's own top-k, plus the scored token); `live_floor`: live's k-th
    largest log-prob. With S the base's top-k, p the base and q the live probabilities:
        q_i = live[i] if vLLM reported it, else exp(live_floor)   (i in S; a token outside live's top-k has
                                                                     log-prob at most live_floor)
        P_r = 1 - sum_S p_i,  Q_r = max(1 - sum_S q_i, 1e-12)      (one bucket for everything outside S)
        KL ~ sum_S p_i (log p_i - log q_i) + P_r log(P_r / Q_r)
    i.e. the exact KL between the two distributions coarse-grained onto S plus one remainder bucket. Bias: the
    coarse-graining can only lower KL (log-sum inequality), so with every q_i known the estimate is a lower bound
    of the true KL, equal to it when the remainder is split alike on both sides; identical distributions give
    exactly 0. The bound for a missing q_i raises it, which usually lowers the estimate further (a token the base
    ranks high but live dropped is where live lost mass), so read the figure as a conservative drift gauge, best
    where `top_k_mass` is high. Returns (estimate, how many of S were missing from `live`); never negative.
    """
    kl, p_in, q_in, missing = 0.0, 0.0, 0.0, 0
    for tok, b in zip(base_ids, base_logprobs):
        lq = live.get(tok)
        if lq is None:
            lq = live_floor
            missing += 1
        p = math.exp(b)
        kl += p * (b - lq)
        p_in += p
        q_in += math.exp(lq)
    p_rest = max(1.0 - p_in, 0.0)
    q_rest = max(1.0 - q_in, _FLOOR)
    if p_rest > _FLOOR:
        kl += p_rest * math.log(p_rest / q_rest)
    return max(kl, 0.0), missing


async def _prompt_logprobs(client: PostClient, ids: list[list[int]], k: int, model_name: str | None,
                           timeout: float) -> list[list[tuple[float, dict[int, tuple[float, int]]]]]:
    """Per canary text, per scored position: (log-prob of the canary token, {token: (log-prob, rank)})."""
    body = {"model": await _served_name(client, model_name), "prompt": ids, "max_tokens": 1, "temperature": 0.0,
            "prompt_logprobs": k}
    data = await _post(client, "/v1/completions", body, timeout, "drift")
    try:
        choices = sorted(data["choices"], key=lambda c: c["index"])
        if len(choices) != len(ids):
            raise HealthError(f"vLLM returned {len(choices)} choices for {len(ids)} canary prompts")
        out = []
        for row, choice in zip(ids, choices):
            entries = choice.get("prompt_logprobs")
            if entries is None or len(entries) != len(row):
                raise HealthError("vLLM returned no prompt_logprobs (or the wrong number) for a canary prompt")
            positions = []
            for tok, entry in zip(row[1:], entries[1:]):
                table = {int(t): (float(v["logprob"]), int(v["rank"])) for t, v in entry.items()}
                if tok not in table:
                    raise HealthError(f"vLLM's prompt_logprobs lack the canary token {tok}")
                positions.append((table[tok][0], table))
            out.append(positions)
        return out
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise HealthError(f"vLLM's prompt_logprobs answer has an unexpected shape ({exc!r})") from exc


def _perplexity(token_logprobs: Sequence[float]) -> float:
    return math.exp(-sum(token_logprobs) / max(len(token_logprobs), 1))


async def measure_reference(client: PostClient, ids: list[list[int]], *, model: str, k: int = DEFAULT_TOP_K,
                            model_name: str | None = None, timeout: float = 300.0) -> DriftReference:
    """The base's top-k log-probs on canary `ids` (canary_token_ids). Call it while version 0 is served; `model`
    names the base (its folder), `model_name` is vLLM's served name (read from /v1/models when None)."""
    if not 1 <= k <= DEFAULT_TOP_K:
        raise ValueError(f"k must lie in 1..{DEFAULT_TOP_K} (vLLM's default max_logprobs), got {k}")
    rows = await _prompt_logprobs(client, ids, k, model_name, timeout)
    top_ids, top_lps, token_lps = [], [], []
    for positions in rows:
        for token_lp, table in positions:
            top = sorted(((rank, lp, tok) for tok, (lp, rank) in table.items() if rank <= k))[:k]
            top_ids.append([tok for _, _, tok in top])
            top_lps.append([lp for _, lp, _ in top])
            token_lps.append(token_lp)
    return DriftReference(model=model, k=k, canary_hash=canary_hash(ids), perplexity=_perplexity(token_lps),
                          tokens=len(token_lps), top_ids=top_ids, top_logprobs=top_lps)


async def measure_drift(client: PostClient, reference: DriftReference, ids: list[list[int]], *, model: str,
                        model_name: str | None = None, timeout: float = 300.0) -> Drift:
    """KL(base || live) per canary position and the canary perplexity against the base's, for the live weights.
    `ids` and `model` are the current canary ids and base model: a reference that does not match them is refused
    (StaleReference) before anything is sent."""
    reference.check(model, ids)
    t0 = time.perf_counter()
    rows = await _prompt_logprobs(client, ids, reference.k, model_name, timeout)
    positions = [p for text in rows for p in text]
    if len(positions) != reference.tokens:
        raise HealthError(f"vLLM scored {len(positions)} canary positions, the reference has {reference.tokens}")
    kl_sum, mass_sum, missing, token_lps = 0.0, 0.0, 0, []
    for (token_lp, table), b_ids, b_lps in zip(positions, reference.top_ids, reference.top_logprobs):
        live = {tok: lp for tok, (lp, _) in table.items()}
        top = [lp for lp, rank in table.values() if rank <= reference.k]
        kl, miss = kl_top_k(b_ids, b_lps, live, min(top) if top else min(live.values()))
        kl_sum += kl
        missing += miss
        mass_sum += sum(math.exp(b) for b in b_lps)
        token_lps.append(token_lp)
    n = max(len(positions), 1)
    ppl = _perplexity(token_lps)
    return Drift(kl_per_token=kl_sum / n, perplexity=ppl, perplexity_vs_base=ppl / reference.perplexity - 1.0,
                 tokens=len(positions), top_k_mass=mass_sum / n,
                 missing_share=missing / max(sum(len(r) for r in reference.top_ids), 1),
                 ms=(time.perf_counter() - t0) * 1000)


@dataclass
class DriftLimits:
    max_perplexity_vs_base: float = field(default=0.05, metadata={
        "help": "roll back when the canary perplexity exceeds the base model's by more than this share"})
    max_kl_per_token: float = field(default=0.05, metadata={
        "help": "roll back when the estimated KL(base || live) on the canary exceeds this many nats per token"})

    def __post_init__(self) -> None:
        for name in ("max_perplexity_vs_base", "max_kl_per_token"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def drift_verdict(drift: Drift, limits: DriftLimits) -> str | None:
    """Why the live weights drifted too far from the base, or None."""
    reasons = []
    if not math.isfinite(drift.perplexity_vs_base) or drift.perplexity_vs_base > limits.max_perplexity_vs_base + 1e-9:
        reasons.append(f"canary perplexity is {drift.perplexity_vs_base * 100:+.1f} % against the base model "
                       f"(limit +{limits.max_perplexity_vs_base * 100:.1f} %)")
    if not math.isfinite(drift.kl_per_token) or drift.kl_per_token > limits.max_kl_per_token + 1e-9:
        reasons.append(f"the weights drifted from the base model: KL(base || live) on the canary is "
                       f"{drift.kl_per_token:.4f} nats per token (limit {limits.max_kl_per_token:.4f})")
    return "; ".join(reasons) or None


# ---------------------------------------------------------------------------------------------- generation
_WORD = re.compile(r"\w+(?:['’]\w+)*")
# Stutter, on the lowercased answer. MARKER_RUN: three or more list markers ("1.", "2)", "-", "•") in a row with
# nothing but spaces and markdown emphasis between them: "1. **1. **1.", "1. 2. 3." or "- **- **-" (markers
# without items; "1.2.3" has no space between, so a version number is not one).
# PHRASE_RUN: a phrase of one to four words said three or more times in a row, separated only by spaces,
# punctuation or emphasis: "the the the", "i am i am i am". A normal numbered list has words between its markers
# and repeats no phrase back to back, so it matches neither.
_MARKER = r"(?:\d{1,3}[.)]|[-•])"
MARKER_RUN = re.compile(rf"(?<![\w.])(?:{_MARKER}[\s*_]+){{2,}}{_MARKER}(?![\w])")
_SEP = r"[\s*_.,;:!?\-]+"
PHRASE_RUN = re.compile(rf"(?<!\w)(\w+(?:{_SEP}\w+){{0,3}})(?:{_SEP}\1(?!\w)){{2,}}")
_LIST_OPENING = re.compile(r"^\s*(?:#+\s*)?[*_]*\s*(?:\d{1,3}[.)]|[-*•])(?=\s)")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def is_stutter(text: str) -> bool:
    low = text.lower()
    return bool(MARKER_RUN.search(low) or PHRASE_RUN.search(low))


def repeated_ngram_rate(text: str, n: int = 3) -> float | None:
    """Share of the answer's word n-grams that already occurred earlier in it (None: fewer than n words)."""
    ws = words(text)
    grams = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
    if not grams:
        return None
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def opening(text: str) -> str:
    """The answer's first two words, lowercased without punctuation or markdown; an answer that opens with a list
    marker ("1.", "-", "*", "## 1.") opens with the format "<list>", whatever its first item says."""
    if _LIST_OPENING.match(text):
        return "<list>"
    return " ".join(words(text)[:2])


@dataclass
class Answer:
    text: str
    tokens: int  # completion tokens, as vLLM counted them
    finish_reason: str


@dataclass
class Health:
    answers: int
    repeated_3gram_rate: float  # mean over answers (of 3 words or more) of repeated_ngram_rate
    stutter_rate: float  # share of answers where is_stutter
    distinct_1: float  # distinct words / words, over all answers together
    distinct_2: float  # distinct word pairs / word pairs, within answers, over all answers together
    mean_tokens: float
    unfinished_rate: float  # share cut by max_tokens (finish_reason "length")
    collapse_share: float  # largest share of answers with the same opening()
    collapse_opening: str  # that opening
    ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def health_figures(answers: Sequence[Answer], ms: float = 0.0) -> Health:
    if not answers:
        raise HealthError("no answers to judge: the probe needs at least one canary prompt")
    n = len(answers)
    rates = [r for r in (repeated_ngram_rate(a.text) for a in answers) if r is not None]
    unigrams: list[str] = []
    bigrams: list[tuple[str, str]] = []
    for a in answers:
        ws = words(a.text)
        unigrams += ws
        bigrams += list(zip(ws, ws[1:]))
    openings = Counter(opening(a.text) for a in answers)
    top, count = openings.most_common(1)[0]
    return Health(answers=n, repeated_3gram_rate=sum(rates) / len(rates) if rates else 0.0,
                  stutter_rate=sum(is_stutter(a.text) for a in answers) / n,
                  distinct_1=len(set(unigrams)) / len(unigrams) if unigrams else 0.0,
                  distinct_2=len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
                  mean_tokens=sum(a.tokens for a in answers) / n,
                  unfinished_rate=sum(a.finish_reason == "length" for a in answers) / n,
                  collapse_share=count / n, collapse_opening=top, ms=ms)


def load_prompts(path: Path = CANARY_PROMPTS_PATH) -> list[list[dict[str, str]]]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                prompts.append(json.loads(line)["messages"])
    if not prompts:
        raise HealthError(f"the canary prompt file {path} is empty")
    return prompts


class HealthProbe:
    """Samples the live model on the canary prompts through `/v1/chat/completions` (all at once: vLLM batches
    them) and computes `Health`. Prompt i is sampled with seed `seed + i`, so two probes of the same weights draw
    the same answers."""

    def __init__(self, client: PostClient, *, prompts: Sequence[list[dict[str, str]]] | None = None,
                 model_name: str | None = None, temperature: float = 0.7, max_tokens: int = 128, seed: int = 0,
                 timeout: float = 300.0) -> None:
        self.client = client
        self.prompts = list(prompts) if prompts is not None else load_prompts()
        self.model_name = model_name
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.seed = seed
        self.timeout = timeout

    async def _answer(self, model: str, i: int, messages: list[dict[str, str]]) -> Answer:
        body = {"model": model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "seed": self.seed + i}
        data = await _post(self.client, "/v1/chat/completions", body, self.timeout, "health probe")
        try:
            choice = data["choices"][0]
            return Answer(text=choice["message"]["content"] or "", tokens=int(data["usage"]["completion_tokens"]),
                          finish_reason=str(choice["finish_reason"]))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise HealthError(f"vLLM's chat answer has an unexpected shape ({exc!r}): {str(data)[:300]}") from exc

    async def answers(self) -> list[Answer]:
        self.model_name = await _served_name(self.client, self.model_name)
        results = await asyncio.gather(*(self._answer(self.model_name, i, m) for i, m in enumerate(self.prompts)),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return list(results)  # type: ignore[arg-type]

    async def measure(self) -> Health:
        t0 = time.perf_counter()
        answers = await self.answers()
        return health_figures(answers, ms=(time.perf_counter() - t0) * 1000)


@dataclass
class HealthLimits:
    """How much worse than the base's the live model's canary answers may get. The probe draws one answer per
    prompt, so a share moves in steps of 1/len(prompts) and two probes of equally good weights differ by a step or
    more: the defaults leave room for that sampling noise (see the measurements document)."""

    max_stutter_rise: float = field(default=0.10, metadata={
        "help": "roll back when the share of stuttering answers exceeds the base model's by more than this"})
    max_collapse_rise: float = field(default=0.15, metadata={
        "help": "roll back when the largest share of answers with the same opening exceeds the base's by more"})
    max_unfinished_rise: float = field(default=0.20, metadata={
        "help": "roll back when the share of answers cut by max_tokens exceeds the base's by more than this"})
    max_distinct_2_drop: float = field(default=0.10, metadata={
        "help": "roll back when distinct-2 (distinct word pairs / word pairs) falls below the base's by more"})

    def __post_init__(self) -> None:
        for name in ("max_stutter_rise", "max_collapse_rise", "max_unfinished_rise", "max_distinct_2_drop"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= 1):
                raise ValueError(f"{name} must be a share between 0 and 1, got {value!r}")


def compare(base: Health, live: Health, limits: HealthLimits) -> str | None:
    """Why the live model's answers got worse than the base's past the limits, or None."""
    reasons = []
    eps = 1e-9
    if live.stutter_rate > base.stutter_rate + limits.max_stutter_rise + eps:
        reasons.append(f"{live.stutter_rate:.0%} of the canary answers stutter (base {base.stutter_rate:.0%}, limit "
                       f"+{limits.max_stutter_rise:.0%})")
    if live.collapse_share > base.collapse_share + limits.max_collapse_rise + eps:
        reasons.append(f"{live.collapse_share:.0%} of the canary answers open with {live.collapse_opening!r} (base's "
                       f"most common opening {base.collapse_share:.0%}, limit +{limits.max_collapse_rise:.0%})")
    if live.unfinished_rate > base.unfinished_rate + limits.max_unfinished_rise + eps:
        reasons.append(f"{live.unfinished_rate:.0%} of the canary answers hit max_tokens (base "
                       f"{base.unfinished_rate:.0%}, limit +{limits.max_unfinished_rise:.0%})")
    if live.distinct_2 < base.distinct_2 - limits.max_distinct_2_drop - eps:
        reasons.append(f"distinct-2 of the canary answers fell to {live.distinct_2:.3f} (base {base.distinct_2:.3f}, "
                       f"limit -{limits.max_distinct_2_drop:.3f})")
    return "; ".join(reasons) or None


if __name__ == "__main__":  # manual check against a running vLLM: figures and timings of both probes
    import sys

    from loop.scheduler.guard import load_tokenizer
    from loop.vllm.client import VLLMClient

    async def _main() -> None:
        client = VLLMClient(sys.argv[1], timeout=300.0)
        ids = canary_token_ids(load_tokenizer(sys.argv[2]))
        t0 = time.perf_counter()
        ref = await measure_reference(client, ids, model=sys.argv[2])
        print(f"reference: {ref.tokens} positions, perplexity {ref.perplexity:.4f}, "
              f"{(time.perf_counter() - t0) * 1000:.0f} ms")
        print("drift:", json.dumps((await measure_drift(client, ref, ids, model=sys.argv[2])).to_dict()))
        print("health:", json.dumps((await HealthProbe(client).measure()).to_dict()))
        await client.aclose()

    asyncio.run(_main())
