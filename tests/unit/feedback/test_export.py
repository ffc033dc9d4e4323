"""Export: streamed JSONL in TRL's documented dataset formats, and the stats that count it.

TRL (https://huggingface.co/docs/trl/dataset_formats): a *preference* row has exactly "prompt", "chosen",
"rejected"; an *unpaired preference* row exactly "prompt", "completion", "label" (bool). Conversational rows hold
lists of {"role", "content"} messages, with the answers as assistant messages; standard rows hold strings.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.unit.feedback_support import add_response, app, client, db_url, sessions  # noqa: F401 - fixtures


def is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and set(m) == {"role", "content"}
                                           and isinstance(m["content"], str) for m in value)


async def jsonl(client: httpx.AsyncClient, path: str, **params: Any) -> list[dict[str, Any]]:
    async with client.stream("GET", path, params=params) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [line async for line in r.aiter_lines() if line]
    return [json.loads(line) for line in lines]


async def seed(client: httpx.AsyncClient, sessions) -> dict[str, str]:
    ids = {"good": add_response(sessions, prompt="Capital of France?", completion="Paris."),
           "bad": add_response(sessions, prompt="Capital of France?", completion="Lyon, I think."),
           "raw": add_response(sessions, prompt="Once upon a time", completion=" there was a fox.",
                               endpoint="completion"),
           "raw2": add_response(sessions, prompt="Once upon a time", completion=" the end.", endpoint="completion")}
    for body in ({"response_id": ids["good"], "thumb": "up", "score": 9}, {"response_id": ids["bad"], "score": 2},
                 {"response_id": ids["raw"], "score": 5}):
        assert (await client.post("/api/ratings", json=body)).status_code == 201
    r = await client.post("/api/comparisons", json={"response_a_id": ids["raw"], "response_b_id": ids["raw2"],
                                                    "winner": "a"})
    assert r.status_code == 201
    return ids


async def test_preference_conversational(client: httpx.AsyncClient, sessions) -> None:
    await seed(client, sessions)
    rows = await jsonl(client, "/api/export/preference.jsonl")
    assert len(rows) == 2
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert is_messages(row["prompt"]) and is_messages(row["chosen"]) and is_messages(row["rejected"])
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
    # comparisons first, then rating pairs
    assert rows[0] == {"prompt": [{"role": "user", "content": "Once upon a time"}],
                       "chosen": [{"role": "assistant", "content": " there was a fox."}],
                       "rejected": [{"role": "assistant", "content": " the end."}]}
    assert rows[1]["prompt"] == [{"role": "user", "content": "Capital of France?"}]
    assert rows[1]["chosen"][0]["content"] == "Paris." and rows[1]["rejected"][0]["content"] == "Lyon, I think."


async def test_preference_standard(client: httpx.AsyncClient, sessions) -> None:
    await seed(client, sessions)
    rows = await jsonl(client, "/api/export/preference.jsonl", format="standard")
    assert rows == [{"prompt": "Once upon a time", "chosen": " there was a fox.", "rejected": " the end."},
                    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon, I think."}]


async def test_unpaired(client: httpx.AsyncClient, sessions) -> None:
    await seed(client, sessions)
    rows = await jsonl(client, "/api/export/unpaired.jsonl")
    for row in rows:
        assert set(row) == {"prompt", "completion", "label"}
        assert is_messages(row["prompt"]) and is_messages(row["completion"]) and isinstance(row["label"], bool)
    # thumb up (+score 9) → True; score 2 → False; score 5 → skipped
    assert [(r["completion"][0]["content"], r["label"]) for r in rows] == [("Paris.", True), ("Lyon, I think.", False)]
    standard = await jsonl(client, "/api/export/unpaired.jsonl", format="standard")
    assert standard[0] == {"prompt": "Capital of France?", "completion": "Paris.", "label": True}


async def test_export_filters_and_bad_format(client: httpx.AsyncClient, sessions) -> None:
    await seed(client, sessions)
    assert await jsonl(client, "/api/export/unpaired.jsonl", rater="nobody") == []
    assert len(await jsonl(client, "/api/export/unpaired.jsonl", rater="anonymous")) == 2
    r = await client.get("/api/export/preference.jsonl", params={"format": "csv"})
    assert r.status_code == 422 and "format" in r.json()["error"]["message"]


async def test_stats_count_what_export_writes(client: httpx.AsyncClient, sessions) -> None:
    await seed(client, sessions)
    stats = (await client.get("/api/stats")).json()
    assert stats["responses_total"] == 4 and stats["ratings_total"] == 3 and stats["comparisons_total"] == 1
    assert stats["thumbs"] == {"up": 1, "down": 0}
    assert stats["scores"]["9"] == 1 and stats["scores"]["2"] == 1 and stats["scores"]["5"] == 1
    assert sum(stats["scores"].values()) == 3
    assert stats["pairs_available"] == len(await jsonl(client, "/api/export/preference.jsonl")) == 2
    assert stats["unpaired_available"] == len(await jsonl(client, "/api/export/unpaired.jsonl")) == 2
    assert stats["untrained_pairs"] == 2 and stats["untrained_unpaired"] == 2
    (today,) = stats["by_day"]
    assert today == {"day": today["day"], "responses": 4, "ratings": 3, "comparisons": 1}
    assert len(today["day"]) == 10
