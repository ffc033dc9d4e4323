"""The proxy's streamed answers against a fake vLLM on a real Unix socket (HTTP/1.1, keep-alive, chunked, as
vLLM's uvicorn sends them): one pooled upstream connection serves stream after stream, vLLM's refusal or silence
before the first chunk still gets a proper status, and a client that leaves mid-stream leaves a truncated row.
The ASGI fakes of test_proxy.py cannot show these: httpx's ASGI transport has no connections and buffers bodies.
Run: .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/api/test_proxy_stream.py
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from loop.api.app import create_app
from loop.config import Settings
from loop.vllm.client import VLLMClient
from tests.unit.api.test_proxy import stored

# The tests run on the fixtures' event loop: the pooled upstream connections they open are closed at teardown.
pytestmark = pytest.mark.asyncio(loop_scope="session")

CHAT = {"messages": [{"role": "user", "content": "hi"}], "stream": True}


def _chunk(payload: bytes) -> bytes:
    event = b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def _token(text: str, tid: int, finish: str | None) -> bytes:
    return _chunk(json.dumps({"id": "x", "choices": [{"index": 0, "delta": {"content": text}, "token_ids": [tid],
                                                      "finish_reason": finish}]}).encode())


class FakeVLLM:
    """Answers every POST on a Unix socket like vLLM's streamed chat; `mode` picks how. Counts connections. It runs
    its own event loop in a thread, as vLLM runs in its own process."""

    def __init__(self, path: str) -> None:
        self.path, self.mode, self.connections = path, "ok", 0
        self.release = threading.Event()  # "hang": the rest of the stream waits for this
        self._stop = threading.Event()

    def __enter__(self) -> FakeVLLM:
        ready = threading.Event()

        async def main() -> None:
            server = await asyncio.start_unix_server(self._serve, self.path)
            ready.set()
            while not self._stop.is_set():
                await asyncio.sleep(0.02)
            server.close()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        self._thread.start()
        ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._stop.set()
        self._thread.join(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:  # keep-alive: one request after another on this connection
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                await self._answer(writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter) -> None:
        if self.mode == "refuse":
            body = b'{"error": {"message": "The model `m` does not exist.", "type": "NotFoundError", "code": 404}}'
            writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(body), body))
            return await writer.drain()
        if self.mode == "silent":
            await asyncio.sleep(2)  # past the proxy's request timeout
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     + _chunk(b'{"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],'
                              b' "prompt_token_ids": [1, 2], "prompt_text": "P"}') + _token("a", 7, None))
        await writer.drain()
        if self.mode == "hang":
            while not self.release.is_set():
                await asyncio.sleep(0.01)
        writer.write(_token("b", 8, "stop") + _chunk(b"[DONE]"))
        await writer.drain()
        writer.write(b"0\r\n\r\n")  # the chunked terminator comes in a write of its own, as uvicorn sends it
        await writer.drain()


@pytest.fixture
async def streamed(tmp_path: Path) -> AsyncIterator[SimpleNamespace]:
    sock_dir = tempfile.mkdtemp(prefix="lp-", dir="/tmp")  # a Unix socket path must stay short
    sock = f"{sock_dir}/v.sock"
    settings = Settings(data_dir=tmp_path, served_model_name="m", request_timeout_s=0.5, vllm_url=f"unix:{sock}")
    app = create_app(settings, manage=False)
    try:
        with FakeVLLM(sock) as fake:
            async with app.router.lifespan_context(app):
                state = app.state.loop
                await state.vllm.aclose()
                state.vllm = VLLMClient(f"unix:{sock}", 0.5)
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://127.0.0.1") as c:
                    yield SimpleNamespace(client=c, state=state, fake=fake, app=app)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


async def test_streams_one_after_another_share_one_upstream_connection(streamed) -> None:  # noqa: ANN001
    for _ in range(3):
        r = await streamed.client.post("/v1/chat/completions", json=CHAT)
        assert r.text.rstrip().endswith("data: [DONE]")
    assert streamed.fake.connections == 1  # a stream left half-read would have cost a new connection each time
    row = await stored(streamed.state, r.headers["x-loop-response-id"])
    assert (row.completion, row.completion_token_ids, row.truncated) == ("ab", [7, 8], False)


async def test_a_stream_vllm_refuses_before_its_first_chunk_gets_vllms_status(streamed) -> None:  # noqa: ANN001
    streamed.fake.mode = "refuse"
    r = await streamed.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
    assert "x-loop-response-id" not in r.headers


async def test_a_stream_whose_first_chunk_is_late_gets_504(streamed) -> None:  # noqa: ANN001
    streamed.fake.mode = "silent"
    r = await streamed.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"


async def _post_and_leave(app, body: bytes) -> list[dict]:  # noqa: ANN001
    """Drive the app as a server would for a client that disconnects after the first streamed chunk."""
    sent: list[dict] = []
    first_body = asyncio.Event()
    asked = False

    async def receive() -> dict:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": body, "more_body": False}
        await first_body.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            first_body.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80),
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    await asyncio.wait_for(app(scope, receive, send), 5)
    return sent


async def test_a_client_that_leaves_mid_stream_leaves_one_truncated_row(streamed) -> None:  # noqa: ANN001
    streamed.fake.mode = "hang"
    sent = await _post_and_leave(streamed.app, json.dumps(CHAT).encode())
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 200
    rid = dict(start["headers"])[b"x-loop-response-id"].decode()
    assert b"[DONE]" not in b"".join(m.get("body", b"") for m in sent)
    await streamed.state.stream_stores.close(5)  # the store runs after the response, in the background
    row = await stored(streamed.state, rid)
    assert row.truncated and row.stream and row.completion == "a" and row.completion_token_ids == [7]
