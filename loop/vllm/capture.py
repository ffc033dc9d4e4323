"""What the proxy asks vLLM for, what it records from vLLM's answers, and what it hands back to the client.

Pure functions and one small accumulator, no I/O, so they are unit-tested without a server:
- `augment(body, endpoint)` adds what loop needs to the request (token ids, the rendered prompt and, when
  asked to, per-token log-probs) and returns `Wants`: what the client itself asked for, so `strip_*` can remove the rest again.
- `prompt_hash(...)` is the identity of "the conversation before the answer" (sha256 of canonical JSON):
  two answers with the same hash are answers to the same prompt, so they can be compared and paired.
- `Capture` collects one choice (from a whole reply or from stream chunks); `row_values` turns it into a
  `responses` row (column values: what loop.feedback.responses journals and inserts), `to_row` into an ORM object.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from loop.db.models import Response, utcnow


def new_response_id() -> str:
    return "resp-" + uuid.uuid4().hex


def _content_text(content: Any) -> str:
    """Message content as plain text: a string as is, OpenAI content parts joined by their text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def normalise_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": str(m.get("role", "")), "content": _content_text(m.get("content"))} for m in messages]


def prompt_hash(prompt: list[dict[str, Any]] | str | list[int]) -> str:
    """sha256 of canonical JSON: chat → messages as [{role, content}], completions → the prompt string."""
    canonical = normalise_messages(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict) \
        else prompt
    text = json.dumps(canonical, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Wants:
    """What the client asked for itself (so loop's extra fields can be stripped from the reply)."""

    logprobs: bool
    token_ids: bool
    prompt_text: bool


def augment(body: dict[str, Any], endpoint: str, *, logprobs: bool = True) -> Wants:
    """Add token ids, (chat) the rendered prompt and, with `logprobs`, per-token log-probs to `body`, in place.

    Token ids and the prompt text cost vLLM next to nothing; log-probs cost it work for every generated token, on
    the reply's path, which is why the proxy asks for them only when the capture_logprobs setting says so (a
    client that asks for log-probs itself gets them, and they are stored)."""
    if endpoint == "chat":
        wants = Wants(bool(body.get("logprobs")), bool(body.get("return_token_ids")),
                      bool(body.get("return_prompt_text")))
        if logprobs:
            body["logprobs"] = True
        body["return_prompt_text"] = True
    else:
        wants = Wants(body.get("logprobs") is not None, bool(body.get("return_token_ids")), False)
        if logprobs and body.get("logprobs") is None:
            body["logprobs"] = 0  # the sampled token's log-prob only
    body["return_token_ids"] = True
    return wants


def strip_choice(choice: dict[str, Any], wants: Wants, *, stream: bool) -> None:
    """Remove from one choice what loop asked for and the client did not."""
    if not wants.logprobs and "logprobs" in choice:
        choice["logprobs"] = None
    if not wants.token_ids:
        for key in ("token_ids", "prompt_token_ids"):
            if key in choice:
                if stream:
                    del choice[key]
                else:
                    choice[key] = None


def strip_top(data: dict[str, Any], wants: Wants, *, stream: bool) -> None:
    """Same for the reply's top level (chat puts prompt_token_ids / prompt_text there)."""
    for key, wanted in (("prompt_token_ids", wants.token_ids), ("prompt_text", wants.prompt_text)):
        if not wanted and key in data:
            if stream:
                del data[key]
            else:
                data[key] = None


def choice_logprobs(choice: dict[str, Any]) -> list[float] | None:
    """The sampled tokens' log-probs from a chat or completions choice (or stream chunk choice)."""
    lp = choice.get("logprobs")
    if not lp:
        return None
    if "content" in lp:  # chat
        return [float(t["logprob"]) for t in (lp.get("content") or [])]
    if "token_logprobs" in lp:  # completions
        return [float(x) if x is not None else 0.0 for x in lp["token_logprobs"]]
    return None


@dataclass
class Capture:
    """One choice being recorded."""

    response_id: str
    index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    prompt_token_ids: list[int] | None = None
    finish_reason: str | None = None
    has_logprobs: bool = False

    def add(self, choice: dict[str, Any], endpoint: str) -> None:
        """Take in a stream chunk's choice (a delta) or a whole reply's choice."""
        if endpoint == "chat":
            part = choice.get("delta") or choice.get("message") or {}
            content = part.get("content")
        else:
            content = choice.get("text")
        if content:
            self.text.append(content)
        if choice.get("token_ids"):
            self.token_ids.extend(choice["token_ids"])
        if choice.get("prompt_token_ids") and self.prompt_token_ids is None:
            self.prompt_token_ids = list(choice["prompt_token_ids"])
        lps = choice_logprobs(choice)
        if lps is not None:
            self.has_logprobs = True
            self.logprobs.extend(lps)
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]


@dataclass
class RequestInfo:
    """What every choice of one upstream request shares."""

    endpoint: str  # "chat" | "completion"
    request: dict[str, Any]  # as the client sent it
    model: str
    group_id: str
    stream: bool
    messages: list[Any] | None = None
    prompts: list[Any] = field(default_factory=list)  # completions: one entry per prompt
    n: int = 1
    prompt_text: str | None = None  # chat: rendered by vLLM's chat template
    _chat_hash: str | None = field(default=None, repr=False)  # every choice of a chat request shares it

    def prompt_for(self, index: int) -> tuple[str | None, str]:
        """(prompt_text, prompt_hash) for choice `index`."""
        if self.endpoint == "chat":
            if self._chat_hash is None:
                self._chat_hash = prompt_hash(self.messages or [])
            return self.prompt_text, self._chat_hash
        prompt = self.prompts[min(index // max(self.n, 1), len(self.prompts) - 1)] if self.prompts else ""
        text = prompt if isinstance(prompt, str) else None
        return text, prompt_hash(prompt)


def row_values(info: RequestInfo, cap: Capture, *, weight_version: int, latency_ms: float, ttft_ms: float | None,
               truncated: bool = False, error: str | None = None, prompt_token_ids: list[int] | None = None,
               weight_version_last: int | None = None) -> dict[str, Any]:
    """One `responses` row as column values (what the response writer journals and inserts). `weight_version` is
    the first version that generated it, `weight_version_last` the last (the same when left out)."""
    prompt_text, phash = info.prompt_for(cap.index)
    ptids = cap.prompt_token_ids if cap.prompt_token_ids is not None else prompt_token_ids
    return {
        "id": cap.response_id, "group_id": info.group_id, "choice_index": cap.index, "created_at": utcnow(),
        "endpoint": info.endpoint, "model": info.model, "weight_version": weight_version,
        "weight_version_last": weight_version if weight_version_last is None else weight_version_last, "request": info.request,
        "messages": info.messages, "prompt_text": prompt_text, "prompt_hash": phash, "completion": "".join(cap.text),
        "prompt_token_ids": ptids, "completion_token_ids": list(cap.token_ids),
        "completion_logprobs": list(cap.logprobs) if cap.has_logprobs else None,
        "finish_reason": cap.finish_reason, "prompt_tokens": len(ptids or []), "completion_tokens": len(cap.token_ids),
        "latency_ms": latency_ms, "ttft_ms": ttft_ms, "stream": info.stream, "truncated": truncated, "error": error}


def to_row(info: RequestInfo, cap: Capture, *, weight_version: int, latency_ms: float, ttft_ms: float | None,
           truncated: bool = False, error: str | None = None,
           prompt_token_ids: list[int] | None = None) -> Response:
    """The same row as an ORM object."""
    return Response(**row_values(info, cap, weight_version=weight_version, latency_ms=latency_ms, ttft_ms=ttft_ms,
                                 truncated=truncated, error=error, prompt_token_ids=prompt_token_ids))
