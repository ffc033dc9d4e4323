"""What the proxy adds to requests, strips from replies, and records per choice."""

from __future__ import annotations

import hashlib
import json

from loop.vllm.capture import Capture, RequestInfo, augment, normalise_messages, prompt_hash, strip_choice, \
    strip_top, to_row


def test_augment_chat_asks_for_logprobs_ids_and_prompt_but_remembers_what_client_wanted() -> None:
    body = {"messages": [], "logprobs": False}
    wants = augment(body, "chat")
    assert body["logprobs"] is True and body["return_token_ids"] is True and body["return_prompt_text"] is True
    assert not wants.logprobs and not wants.token_ids and not wants.prompt_text
    body2 = {"messages": [], "logprobs": True, "top_logprobs": 3, "return_token_ids": True}
    wants2 = augment(body2, "chat")
    assert wants2.logprobs and wants2.token_ids and body2["top_logprobs"] == 3


def test_augment_without_logprobs_capture_asks_only_for_ids_and_prompt_and_keeps_the_clients_own() -> None:
    body = {"messages": []}
    wants = augment(body, "chat", logprobs=False)
    assert "logprobs" not in body and body["return_token_ids"] is True and body["return_prompt_text"] is True
    assert not wants.logprobs
    body = {"messages": [], "logprobs": True}
    assert augment(body, "chat", logprobs=False).logprobs and body["logprobs"] is True
    body = {"prompt": "x"}
    assert not augment(body, "completion", logprobs=False).logprobs and "logprobs" not in body
    body = {"prompt": "x", "logprobs": 1}
    assert augment(body, "completion", logprobs=False).logprobs and body["logprobs"] == 1


def test_augment_completions_keeps_client_logprobs_count() -> None:
    body = {"prompt": "x"}
    assert not augment(body, "completion").logprobs and body["logprobs"] == 0
    body = {"prompt": "x", "logprobs": 2}
    assert augment(body, "completion").logprobs and body["logprobs"] == 2


def test_strip_removes_only_unrequested_fields() -> None:
    wants = augment({"messages": []}, "chat")
    choice = {"index": 0, "logprobs": {"content": []}, "token_ids": [1], "message": {}}
    strip_choice(choice, wants, stream=True)
    assert choice["logprobs"] is None and "token_ids" not in choice
    choice = {"index": 0, "logprobs": {"content": []}, "token_ids": [1]}
    strip_choice(choice, wants, stream=False)
    assert choice["token_ids"] is None  # non-stream keeps vLLM's shape: the field is there, null
    top = {"prompt_token_ids": [1, 2], "prompt_text": "t"}
    strip_top(top, wants, stream=False)
    assert top == {"prompt_token_ids": None, "prompt_text": None}


def test_prompt_hash_is_canonical_over_role_and_text() -> None:
    a = [{"role": "user", "content": "hi", "name": "bob"}]
    b = [{"content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}], "role": "user"}]
    assert prompt_hash(a) == prompt_hash(b)
    assert normalise_messages(a) == [{"role": "user", "content": "hi"}]
    expected = hashlib.sha256(json.dumps([{"content": "hi", "role": "user"}], separators=(",", ":"))
                              .encode()).hexdigest()
    assert prompt_hash(a) == expected
    assert prompt_hash("hi") != prompt_hash([{"role": "user", "content": "hi"}])
    assert prompt_hash(a) != prompt_hash([{"role": "system", "content": "hi"}])


def test_capture_from_stream_chunks_builds_one_row() -> None:
    cap = Capture("resp-1", 0)
    cap.add({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}, "chat")
    cap.add({"index": 0, "delta": {"content": "Hel"}, "token_ids": [5],
             "logprobs": {"content": [{"token": "Hel", "logprob": -0.5}]}}, "chat")
    cap.add({"index": 0, "delta": {"content": "lo"}, "token_ids": [6], "finish_reason": "stop",
             "logprobs": {"content": [{"token": "lo", "logprob": -0.25}]}}, "chat")
    info = RequestInfo(endpoint="chat", request={"messages": []}, model="m", group_id="g", stream=True,
                       messages=[{"role": "user", "content": "hi"}], prompt_text="<s>hi")
    row = to_row(info, cap, weight_version=3, latency_ms=10.0, ttft_ms=2.0, prompt_token_ids=[1, 2, 3])
    assert (row.completion, row.completion_token_ids, row.completion_logprobs) == ("Hello", [5, 6], [-0.5, -0.25])
    assert (row.prompt_tokens, row.completion_tokens, row.finish_reason) == (3, 2, "stop")
    assert row.weight_version == 3 and row.prompt_hash == prompt_hash(info.messages) and row.prompt_text == "<s>hi"


def test_completions_with_several_prompts_map_choices_to_their_prompt() -> None:
    info = RequestInfo(endpoint="completion", request={}, model="m", group_id="g", stream=False,
                       prompts=["a", "b"], n=2)
    assert info.prompt_for(1) == ("a", prompt_hash("a"))
    assert info.prompt_for(2) == ("b", prompt_hash("b"))
    cap = Capture("r", 0)
    cap.add({"index": 0, "text": "x", "token_ids": [9], "prompt_token_ids": [1],
             "logprobs": {"token_logprobs": [-1.0]}}, "completion")
    row = to_row(info, cap, weight_version=0, latency_ms=1, ttft_ms=None)
    assert row.prompt_token_ids == [1] and row.completion_logprobs == [-1.0]
