"""Rater identity over real HTTP (uvicorn, a real database): every rating is attributed to the token that sent it,
nobody rates as an account without its token, a loop that requires tokens answers nothing to a caller without one
(health aside), and admins manage accounts through /api/raters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from loop import raters
from loop.api.app import create_app
from loop.config import Settings
from loop.db.session import migrate
from tests.support import ServedApp
from tests.unit.feedback_support import ADMIN, add_response, db_url  # noqa: F401 - fixture


def _serve(db_url: str, tmp_path: Path, **settings: Any) -> ServedApp:  # noqa: F811
    s = Settings(data_dir=tmp_path, database_url=db_url, admin_token=ADMIN, vllm_url="http://fake",
                 worker_enabled=False, scheduler_enabled=False, **settings)
    s.ensure_dirs()
    migrate(s.db_url)
    return ServedApp(create_app(s, manage=False))


@pytest.fixture
def open_loop(db_url: str, tmp_path: Path) -> Iterator[ServedApp]:  # noqa: F811
    with _serve(db_url, tmp_path) as server:
        yield server


@pytest.fixture
def locked_loop(db_url: str, tmp_path: Path) -> Iterator[ServedApp]:  # noqa: F811
    with _serve(db_url, tmp_path, rater_auth="tokens") as server:
        yield server


def _sessions(server: ServedApp) -> sessionmaker[Session]:
    return server.app.state.loop.sessions


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _rate(server: ServedApp, rid: str, token: str | None = None, **body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/api/ratings", json={"response_id": rid, "thumb": "up", **body},
                      headers=_bearer(token) if token else {})


def _error(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


def test_open_loop_a_rating_is_attributed_to_its_token_or_to_the_name_given(open_loop: ServedApp) -> None:
    rid = add_response(_sessions(open_loop))
    _, alice = raters.add(_sessions(open_loop), "alice")
    assert _rate(open_loop, rid).json()["rater"] == "anonymous"
    assert _rate(open_loop, rid, rater="bob").json()["rater"] == "bob"
    signed = _rate(open_loop, rid, alice)
    assert signed.status_code == 201 and signed.json()["rater"] == "alice"
    assert _rate(open_loop, rid, alice, rater="alice").status_code == 201
    assert _error(_rate(open_loop, rid, alice, rater="bob")) == (403, "rater_mismatch")
    assert _error(_rate(open_loop, rid, rater="alice")) == (403, "rater_is_account")  # alice's name, no token
    assert _error(_rate(open_loop, rid, rater="admin")) == (403, "rater_is_account")
    assert _error(_rate(open_loop, rid, "loopr_not-a-token")) == (401, "token_wrong")
    assert _rate(open_loop, rid, ADMIN).json()["rater"] == "admin"
    # an operator may file feedback for a named rater without an account (imports, the learning bench), not for one
    assert _rate(open_loop, rid, ADMIN, rater="zed").json()["rater"] == "zed"
    assert _error(_rate(open_loop, rid, ADMIN, rater="alice")) == (403, "rater_is_account")
    # OpenAI clients always send a key (often a dummy): an open loop's /v1 does not read it
    assert httpx.get(f"{open_loop.url}/v1/models", headers=_bearer("sk-dummy")).status_code != 401
    got = httpx.get(f"{open_loop.url}/api/ratings", params={"response_id": rid}).json()
    assert sorted(r["rater"] for r in got["items"] if r["is_current"]) == ["admin", "alice", "anonymous", "bob", "zed"]


def test_a_revoked_token_rates_no_more_and_nothing_it_gave_is_lost(open_loop: ServedApp) -> None:
    rid = add_response(_sessions(open_loop))
    _, token = raters.add(_sessions(open_loop), "carol")
    assert _rate(open_loop, rid, token).status_code == 201
    r = httpx.post(f"{open_loop.url}/api/raters/carol/revoke", headers=_bearer(ADMIN))
    assert r.status_code == 200 and r.json()["active"] is False
    assert _error(_rate(open_loop, rid, token, thumb="down")) == (401, "token_wrong")  # at once: the API revoked it
    got = httpx.get(f"{open_loop.url}/api/ratings", params={"rater": "carol"}).json()["items"]
    assert [(r["rater"], r["thumb"]) for r in got] == [("carol", "up")]


def test_comparisons_are_attributed_the_same_way(open_loop: ServedApp) -> None:
    s = _sessions(open_loop)
    a, b = add_response(s, completion="4"), add_response(s, completion="5")
    _, dan = raters.add(s, "dan")
    url = f"{open_loop.url}/api/comparisons"
    body = {"response_a_id": a, "response_b_id": b, "winner": "a"}
    assert httpx.post(url, json=body, headers=_bearer(dan)).json()["rater"] == "dan"
    assert _error(httpx.post(url, json={**body, "rater": "dan"})) == (403, "rater_is_account")
    assert _error(httpx.post(url, json={**body, "rater": "eve"}, headers=_bearer(dan))) == (403, "rater_mismatch")


def test_a_loop_that_requires_tokens_answers_nothing_without_one(locked_loop: ServedApp) -> None:
    rid = add_response(_sessions(locked_loop))
    _, frank = raters.add(_sessions(locked_loop), "frank")
    url = locked_loop.url
    for method, path in [("GET", "/api/responses"), ("GET", "/api/ratings"), ("GET", "/api/stats"),
                         ("GET", "/api/export/preference.jsonl"), ("GET", "/v1/models"), ("GET", "/api/me")]:
        r = httpx.request(method, url + path)
        assert _error(r) == (401, "token_missing"), path
        assert r.headers["www-authenticate"] == "Bearer"
    assert _error(_rate(locked_loop, rid)) == (401, "token_missing")
    assert _error(_rate(locked_loop, rid, rater="frank")) == (401, "token_missing")
    assert httpx.get(f"{url}/health").status_code in (200, 503)  # probes need no token
    assert httpx.get(f"{url}/api/responses", headers=_bearer(frank)).status_code == 200
    assert _rate(locked_loop, rid, frank).json()["rater"] == "frank"
    assert httpx.get(f"{url}/api/me", headers=_bearer(frank)).json() == {
        "rater": "frank", "role": "rater", "tokens_required": True}
    assert _error(httpx.get(f"{url}/api/responses", headers=_bearer("wrong"))) == (401, "token_wrong")


def test_admins_manage_accounts_and_raters_cannot(locked_loop: ServedApp) -> None:
    url = f"{locked_loop.url}/api/raters"
    made = httpx.post(url, json={"name": "grace", "role": "admin"}, headers=_bearer(ADMIN))
    assert made.status_code == 201 and made.json()["role"] == "admin"
    grace = made.json()["token"]
    heidi = httpx.post(url, json={"name": "heidi"}, headers=_bearer(grace)).json()["token"]  # an admin account
    assert _error(httpx.post(url, json={"name": "ivan"}, headers=_bearer(heidi))) == (403, "admin_token_wrong")
    assert _error(httpx.get(url, headers=_bearer(heidi))) == (403, "admin_token_wrong")
    assert _error(httpx.post(url, json={"name": "heidi"}, headers=_bearer(ADMIN))) == (409, "rater_exists")
    assert _error(httpx.post(url, json={"name": "anonymous"}, headers=_bearer(ADMIN))) == (422, "invalid_rater_name")
    assert httpx.post(url, json={"name": "x", "role": "owner"}, headers=_bearer(ADMIN)).status_code == 422
    listed = httpx.get(url, headers=_bearer(grace)).json()["raters"]
    assert [(a["name"], a["role"], a["active"]) for a in listed] == [("grace", "admin", True), ("heidi", "rater", True)]
    assert all("token" not in a for a in listed)
    renewed = httpx.post(f"{url}/heidi/token", headers=_bearer(ADMIN)).json()["token"]
    assert _error(httpx.get(f"{locked_loop.url}/api/me", headers=_bearer(heidi))) == (401, "token_wrong")
    assert httpx.get(f"{locked_loop.url}/api/me", headers=_bearer(renewed)).json()["rater"] == "heidi"
    assert _error(httpx.post(f"{url}/nobody/revoke", headers=_bearer(ADMIN))) == (404, "rater_not_found")


def test_who_must_sign_in(tmp_path: Path) -> None:
    def required(**kw: Any) -> bool:
        return Settings(data_dir=tmp_path, **kw).tokens_required

    assert not required() and not required(host="localhost") and not required(host="::1")
    assert not required(host="127.0.0.2")
    assert required(host="0.0.0.0") and required(host="::") and required(host="192.168.1.5")
    assert required(host="loop.lan") and required(rater_auth="tokens")
