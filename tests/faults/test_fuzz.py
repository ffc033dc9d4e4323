"""Schema fuzzing: every operation in `/openapi.json`, fed valid and invalid input by schemathesis, never answers
5xx, and every error it answers is in the documented shape `{"error": {"message", "type", "code", "param"}}`.

The app is `create_app(settings, manage=False)` with a real scheduler object (no loop task) and the vLLM client
pointed at an in-process fake vLLM (tests/unit/api/test_errors.py's `fake_vllm`, through `VLLMClient(transport=...)`);
the /v1 routes, which take raw JSON, also get bodies from a JSON strategy of their own. Training itself is not
running (manage=False): its routes answer the documented 503 `training_disabled`, the one 5xx allowed here.
Runs on SQLite and PostgreSQL (marker `postgres`), with and without the admin token; seeded (derandomized) and
bounded by MAX_EXAMPLES.
Run: `.venv/bin/python -m pytest -q tests/faults/test_fuzz.py` (export LOOP_TEST_POSTGRES_URL for PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode
from starlette.testclient import TestClient

from tests.unit.feedback_support import ADMIN, add_response, db_url  # noqa: F401 - fixture (tests/unit, via conftest)
from loop.api.app import create_app
from loop.config import Settings
from loop.scheduler import Scheduler
from loop.vllm.client import VLLMClient
from tests.unit.api.test_errors import MODEL, fake_vllm

MAX_EXAMPLES = 150  # per backend and token: the whole file stays well under two minutes on 2 cores
ALLOWED_5XX = {(503, "training_disabled")}  # documented: manage=False starts no worker


@pytest.fixture
def client(db_url: str, tmp_path: Path) -> Iterator[TestClient]:  # noqa: F811
    settings = Settings(data_dir=tmp_path, database_url=db_url, served_model_name=MODEL, vllm_url="http://fake",
                        admin_token=ADMIN)
    app = create_app(settings, manage=False)
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        state = app.state.loop
        state.vllm = VLLMClient("http://fake", 5.0, transport=httpx.ASGITransport(fake_vllm()))
        state.scheduler = Scheduler(state)
        add_response(state.sessions)  # something for the read routes to find
        yield c


def check(r: Any, what: str) -> None:
    assert r.status_code < 500 or (r.status_code, _code(r)) in ALLOWED_5XX, f"{what} -> {r.status_code} {r.text[:500]}"
    assert r.headers.get("x-request-id"), what
    if r.status_code >= 400:
        err = r.json().get("error")
        assert isinstance(err, dict) and set(err) == {"message", "type", "code", "param"}, f"{what} -> {r.text[:500]}"
        assert isinstance(err["message"], str) and err["message"], what


def _code(r: Any) -> str | None:
    try:
        return r.json()["error"]["code"]
    except Exception:  # noqa: BLE001 - not JSON: the assertion above reports it
        return None


def _operations(app_schema: dict[str, Any]) -> list[Any]:
    schema = schemathesis.openapi.from_dict(app_schema)
    return [result.ok() for result in schema.get_all_operations()]


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=3), max_leaves=8)
CHAT_BODIES = st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                                  "content": st.text()}), min_size=1, max_size=2)},
    optional={"model": st.sampled_from([MODEL, "other", ""]), "n": JSON_VALUES | st.integers(),
              "best_of": st.integers(), "stream": st.booleans(), "max_tokens": JSON_VALUES, "extra": JSON_VALUES})
COMPLETION_BODIES = st.fixed_dictionaries({"prompt": JSON_VALUES | st.text()},
                                          optional={"model": st.just(MODEL), "n": st.integers()})


NASTY_INTEGERS = [2**63, 2**63 - 1, -(2**63) - 1, 2**64, 10**30, 2**31, -1]


def _overflow(case: Any, value: int) -> bool:
    """Every integer in the case's query, path and body (top level, and lists of them) becomes `value`;
    False when it has none."""
    changed = False
    for params in (case.query, case.path_parameters):
        for key, v in list((params or {}).items()):
            if _is_int(v) or (isinstance(v, str) and v.lstrip("-").isdigit()):
                params[key], changed = value, True
    if isinstance(case.body, dict):
        for key, v in case.body.items():
            if _is_int(v):
                case.body[key], changed = value, True
            elif isinstance(v, list) and v and all(_is_int(x) for x in v):
                case.body[key], changed = [value] * len(v), True
    return changed


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def send(client: TestClient, case: Any, headers: dict[str, str]) -> None:
    kwargs = case.as_transport_kwargs(base_url="http://127.0.0.1", headers=headers)
    r = client.request(**{k: v for k, v in kwargs.items() if k in ("method", "url", "headers", "params", "json",
                                                                     "content", "data", "cookies")})
    check(r, f"{case.method} {case.formatted_path} {kwargs.get('params')} {kwargs.get('json')!r:.300}")


def _fuzz(client: TestClient, token: bool) -> None:
    headers = {"Authorization": f"Bearer {ADMIN}"} if token else {}
    operations = _operations(client.get("/openapi.json").json())
    strategies = [op.as_strategy(generation_mode=mode) for op in operations
                  for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]

    @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        kind = data.draw(st.sampled_from(["schema"] * 4 + ["chat", "completion"]))
        if kind == "schema":
            case = data.draw(st.sampled_from(strategies).flatmap(lambda s: s))
            if data.draw(st.booleans()):  # integers past 64 bits, which generators seldom reach by themselves
                _overflow(case, data.draw(st.sampled_from(NASTY_INTEGERS)))
            send(client, case, headers)
        else:
            path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
            body = data.draw(CHAT_BODIES if kind == "chat" else COMPLETION_BODIES | JSON_VALUES)
            check(client.post(path, json=body, headers=headers), f"POST {path} {body!r:.300}")

    run()


@pytest.mark.parametrize("token", [True, False], ids=["admin", "anonymous"])
def test_no_operation_answers_5xx_and_every_error_has_the_documented_shape(client: TestClient, token: bool) -> None:
    _fuzz(client, token)


def test_every_boundary_case_of_every_operation_is_answered_without_5xx(client: TestClient) -> None:
    """schemathesis's coverage cases: each parameter at and just past its bounds, missing, of the wrong type."""
    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    headers = {"Authorization": f"Bearer {ADMIN}"}
    sent = 0
    for result in schema.get_all_operations():
        op = result.ok()
        for case in schema.iter_coverage_cases(op, generation_modes=list(GenerationMode),
                                               generation_config=schema.config.generation):
            send(client, case, headers)
            if _overflow(case, NASTY_INTEGERS[sent % len(NASTY_INTEGERS)]):
                send(client, case, headers)
            sent += 1
    assert sent > 500  # the schema is the whole API, not a stub
