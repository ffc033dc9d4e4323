"""The one rule that turns a pair or an example into token ids: the worker trains on these ids and the eval guard
(loop/scheduler/guard.py) scores exactly these ids through vLLM, so what is judged is what was trained.

- Stored ids first: a pair or example built from stored responses carries the ids vLLM produced (`prompt_ids`,
  `chosen_ids`/`rejected_ids`, `completion_ids`; loop/worker/protocol.py). They are used as they are: no chat
  template is rendered and no EOS is appended (an answer that stopped by itself already ends with the end token
  vLLM sampled; one cut off by max_tokens has none; one stopped by a stop string keeps the tokens sampled through
  it). The text below is tokenised only where an id field is None (inline text pairs, rows stored without ids,
  two answers whose stored prompts differ) — or where the stored answer ids do not decode to the stored answer
  text with this tokenizer: ids from another tokenizer (the service was moved to another base model over the same
  database) would train nonsense, so then the whole pair or example is tokenised from text.
- Prompt text: chat messages are rendered with the tokenizer's chat template (add_generation_prompt=True) and
  tokenised without special tokens, as vLLM's chat endpoint does; a plain-text prompt is tokenised with special
  tokens, as vLLM's completions endpoint does. A tokenizer without a chat template renders "role: content" lines.
- Answer text: its tokens + EOS, except after an answer cut off by max_tokens (`*_cut`): it did not end there, and
  a preference for it must not teach the model to end answers at that length.
- Length: at most `max_len` tokens per row. Answers keep at least a quarter of `max_len` for the prompt (an
  answer longer than that is cut at its end); the prompt is cut from the LEFT: whole earlier turns first (the kept
  context starts at a user turn), then tokens, always keeping the system message. A stored chat prompt that does
  not fit is dropped for its re-tokenised text cut by that rule, so a long context keeps whole turns (the row then
  is no longer exactly what vLLM saw, and counts as truncated); a stored plain-text prompt loses its oldest ids.
  Chosen and rejected share one prompt cut, so DPO compares answers to the same context.

Tests: `.venv/bin/python -m pytest -q tests/unit/worker/test_objectives.py tests/unit/scheduler/test_guard.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from loop.worker.protocol import Example, Pair, Prompt

DEFAULT_MAX_LEN = 1024  # tokens per row of a run (POST /api/train's max_len default), and what the guard scores


@dataclass(frozen=True)
class Encoded:
    """A prompt's ids and the ids of the answers to it (chosen, rejected; or the one completion)."""

    prompt: list[int]
    answers: list[list[int]]
    truncated: bool  # the prompt or an answer was cut to fit max_len


def _ids(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], generation: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation))
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant: " if generation else "")


def prompt_ids(tokenizer: Any, prompt: Prompt, budget: int = 10**9) -> tuple[list[int], bool]:
    """Token ids of the prompt as vLLM saw it, cut from the left to <= budget; returns (ids, truncated)."""
    if isinstance(prompt, str):
        ids = _ids(tokenizer, prompt, special=True)
        return (ids, False) if len(ids) <= budget else (ids[-budget:], True)
    msgs = [dict(m) for m in prompt]
    if not msgs:
        raise ValueError("a prompt needs at least one message")
    ids = _ids(tokenizer, _render(tokenizer, msgs, True))
    if len(ids) <= budget:
        return ids, False
    kept = drop_turns(tokenizer, msgs, budget)
    ids = _ids(tokenizer, _render(tokenizer, kept, True))
    if len(ids) <= budget:
        return ids, True
    system = kept[:1] if kept[0].get("role") == "system" and len(kept) > 1 else []
    turns = kept[len(system):]
    text = _render(tokenizer, system + turns, True)
    sys_text = _render(tokenizer, system, False) if system else ""
    if not text.startswith(sys_text):
        sys_text = ""
    sys_ids = _ids(tokenizer, sys_text) if sys_text else []
    rest = _ids(tokenizer, text[len(sys_text):])
    keep = budget - len(sys_ids)
    if keep < 1:  # the system message alone is over budget: keep the end of the prompt
        return rest[-budget:], True
    return sys_ids + rest[-keep:], True


def drop_turns(tokenizer: Any, messages: Sequence[dict[str, str]], budget: int) -> list[dict[str, str]]:
    """The messages less their oldest turns until the rendered prompt fits `budget` tokens: a leading system
    message and the last turn are always kept, and the kept context starts at a user turn."""
    msgs = [dict(m) for m in messages]
    system = msgs[:1] if msgs and msgs[0].get("role") == "system" and len(msgs) > 1 else []
    turns = msgs[len(system):]
    while len(turns) > 1 and len(_ids(tokenizer, _render(tokenizer, system + turns, True))) > budget:
        turns = turns[1:]
        while len(turns) > 1 and turns[0].get("role") != "user":
            turns = turns[1:]
    return system + turns


def answer_ids(tokenizer: Any, answer: str, cut: bool = False, stored: Sequence[int] | None = None) -> list[int]:
    """The stored ids as they are; else the answer's tokens + EOS, unless it was cut off (max_tokens): it did not
    end there, so no EOS."""
    if stored is not None:
        return [int(t) for t in stored]
    ids = _ids(tokenizer, answer)
    if tokenizer.eos_token_id is not None and not cut:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def _decodes_to(tokenizer: Any, ids: Sequence[int] | None, text: str) -> bool:
    """Stored answer ids belong to this tokenizer: they decode to the stored text (which may stop short of them:
    a stop string's tokens are in the ids, not in the text)."""
    if ids is None:
        return True
    decoded = tokenizer.decode([int(t) for t in ids], skip_special_tokens=True)
    return decoded.strip().startswith(text.strip())


def _trusted(tokenizer: Any, item: Pair | Example) -> Pair | Example:
    """`item`, or — when a stored answer's ids are not this tokenizer's — `item` without any stored ids."""
    if isinstance(item, Pair):
        ok = _decodes_to(tokenizer, item.chosen_ids, item.chosen) and _decodes_to(tokenizer, item.rejected_ids,
                                                                                    item.rejected)
        none = {"prompt_ids": None, "chosen_ids": None, "rejected_ids": None}
    else:
        ok = _decodes_to(tokenizer, item.completion_ids, item.completion)
        none = {"prompt_ids": None, "completion_ids": None}
    return item if ok else msgspec.structs.replace(item, **none)


def _fit(tokenizer: Any, prompt: Prompt, stored: Sequence[int] | None, whole: list[list[int]],
         max_len: int) -> Encoded:
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 tokens, got {max_len}")
    full = [int(t) for t in stored] if stored is not None else prompt_ids(tokenizer, prompt)[0]
    min_prompt = min(len(full), max(1, max_len // 4))
    answers = [a[:max_len - min_prompt] for a in whole]
    budget = max_len - max(len(a) for a in answers)
    if len(full) <= budget:
        ids, cut = full, False
    elif stored is not None and isinstance(prompt, str):
        ids, cut = full[-budget:], True
    else:  # text, or a stored chat prompt re-tokenised so that whole turns are dropped
        ids, cut = prompt_ids(tokenizer, prompt, budget)
        cut = cut or stored is not None
    return Encoded(ids, answers, cut or answers != whole)


def encode_pair(tokenizer: Any, pair: Pair, max_len: int = DEFAULT_MAX_LEN) -> Encoded:
    """The prompt once, then the chosen and the rejected answer; each row (prompt + answer) <= max_len."""
    pair = _trusted(tokenizer, pair)
    return _fit(tokenizer, pair.prompt, pair.prompt_ids,
                [answer_ids(tokenizer, pair.chosen, pair.chosen_cut, pair.chosen_ids),
                 answer_ids(tokenizer, pair.rejected, pair.rejected_cut, pair.rejected_ids)], max_len)


def encode_example(tokenizer: Any, example: Example, max_len: int = DEFAULT_MAX_LEN) -> Encoded:
    """The prompt and the completion; prompt + completion <= max_len."""
    example = _trusted(tokenizer, example)
    return _fit(tokenizer, example.prompt, example.prompt_ids,
                [answer_ids(tokenizer, example.completion, example.cut, example.completion_ids)], max_len)
