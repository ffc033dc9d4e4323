"""The proxy's upstream connection to vLLM (`loop.vllm.http1`, through `VLLMClient.post` / `stream`) against a
scripted HTTP/1.1 server on a real Unix socket (and one on TCP): keep-alive reuse, streamed lines however the
bytes are cut, a connection vLLM closed while idle, vLLM gone before or during an answer, an answer left half-read.
Run: .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/api/test_proxy_upstream.py
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from loop.vllm import http1
from loop.vllm.client import VLLMClient, VLLMUnreachable

Answer = Callable[[asyncio.StreamWriter, bytes], Awaitable[bool]]  # False: close the connection after it


def whole(body: bytes, status: bytes = b"200 OK") -> bytes:
    return b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (status, len(body), body)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


class Upstream:
    """Answers each request with the next scripted answer (the last one repeats); records what it was sent."""

    def __init__(self, *answers: Answer) -> None:
        self.answers, self.connections, self.requests = list(answers), 0, []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
                if not await answer(writer, body):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def send(data: bytes, *, keep: bool = True) -> Answer:
    async def answer(writer: asyncio.StreamWriter, body: bytes) -> bool:
        writer.write(data)
        await writer.drain()
        return keep
    return answer


async def in_pieces(writer: asyncio.StreamWriter, body: bytes) -> bool:
    """A stream whose events and lines are cut across writes, with \\r\\n line ends in one of them."""
    for piece in (SSE_HEAD + chunk(b"data: {\"a\""), chunk(b": 1}\n\ndata: {\"b\": 2}\r\n\r\n"),
                  chunk(b"data: [DONE]\n\n"), b"0\r\n\r\n"):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.005)
    return True


async def hang_up(writer: asyncio.StreamWriter, body: bytes) -> bool:
    return False  # reads the request, closes without a byte of answer


@pytest.fixture
async def sock() -> AsyncIterator[str]:
    where = tempfile.mkdtemp(prefix="lpu-", dir="/tmp")  # a Unix socket path must stay short
    yield f"{where}/v.sock"
    shutil.rmtree(where, ignore_errors=True)


async def serving(upstream: Upstream, path: str) -> asyncio.AbstractServer:
    return await asyncio.start_unix_server(upstream.serve, path)


async def test_whole_answers_reuse_one_connection_and_carry_status_and_body(sock: str) -> None:
    up = Upstream(send(whole(b'{"ok": 1}')), send(whole(b'{"error": {"message": "no"}}', b"404 Not Found")))
    async with await serving(up, sock):
        client = VLLMClient(f"unix:{sock}", 5.0, api_key="k")
        first = await client.post("/v1/completions", b'{"prompt": "a"}')
        second = await client.post("/v1/completions", b'{"prompt": "b"}')
        third = await client.post("/v1/completions", b'{"prompt": "c"}')
        await client.aclose()
    assert (first.status_code, first.json()) == (200, {"ok": 1})
    assert (second.status_code, second.reason_phrase, third.status_code) == (404, "Not Found", 404)
    assert up.connections == 1
    head, body = up.requests[0]
    assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n") and body == b'{"prompt": "a"}'
    assert b"authorization: Bearer k\r\n" in head and b"content-type: application/json\r\n" in head


async def test_streamed_lines_come_out_whole_however_the_bytes_are_cut(sock: str) -> None:
    up = Upstream(in_pieces)
    async with await serving(up, sock):
        client = VLLMClient(f"unix:{sock}", 5.0)
        for _ in range(2):
            async with client.stream("/v1/chat/completions", b"{}") as reply:
                assert reply.status_code == 200
                lines = [line async for line in reply.aiter_lines()]
            assert [x for x in lines if x] == ['data: {"a": 1}', 'data: {"b": 2}', "data: [DONE]"]
        await client.aclose()
    assert up.connections == 1  # read to its end, the stream's connection served the next one


async def test_a_stream_left_half_read_closes_its_connection(sock: str) -> None:
    up = Upstream(in_pieces)
    async with await serving(up, sock):
        client = VLLMClient(f"unix:{sock}", 5.0)
        async with client.stream("/v1/chat/completions", b"{}") as reply:
            lines = reply.aiter_lines()
            assert await anext(lines) == 'data: {"a": 1}'
            await lines.aclose()
        async with client.stream("/v1/chat/completions", b"{}") as reply:
            assert "data: [DONE]" in [line async for line in reply.aiter_lines()]
        await client.aclose()
    assert up.connections == 2  # the rest of the first answer would have been read as the second's


async def test_a_connection_vllm_closed_while_idle_is_replaced_once(sock: str) -> None:
    up = Upstream(send(whole(b"{}")), hang_up, send(whole(b'{"n": 2}')))
    async with await serving(up, sock):
        client = VLLMClient(f"unix:{sock}", 5.0)
        await client.post("/v1/completions", b"{}")
        retried = await client.post("/v1/completions", b"{}")
        await client.aclose()
    assert retried.json() == {"n": 2}
    assert up.connections == 2 and len(up.requests) == 3


async def test_a_new_connection_closed_without_an_answer_is_vllm_unreachable(sock: str) -> None:
    up = Upstream(hang_up)
    async with await serving(up, sock):
        client = VLLMClient(f"unix:{sock}", 5.0)
        with pytest.raises(VLLMUnreachable, match="closed the connection"):
            await client.post("/v1/completions", b"{}")
        with pytest.raises(VLLMUnreachable):
            async with client.stream("/v1/completions", b"{}"):
                pass
        await client.aclose()
    assert len(up.requests) == 2  # no retry on a connection that was new


async def test_nothing_listening_is_vllm_unreachable(sock: str) -> None:
    client = VLLMClient(f"unix:{sock}", 5.0)
    with pytest.raises(VLLMUnreachable, match="cannot connect"):
        await client.post("/v1/completions", b"{}")
    await client.aclose()


async def test_vllm_gone_mid_stream_is_an_http_error_for_the_proxy(sock: str) -> None:
    up = Upstream(send(SSE_HEAD + chunk(b"data: {\"a\": 1}\n\n"), keep=False))
    async with await serving(up, sock):
        client = VLLMClient(f"unix:{sock}", 5.0)
        async with client.stream("/v1/completions", b"{}") as reply:
            lines = reply.aiter_lines()
            assert await anext(lines) == 'data: {"a": 1}'
            with pytest.raises(httpx.HTTPError, match="before its answer ended"):
                async for _ in lines:
                    pass
        await client.aclose()


async def test_an_answer_that_is_not_http_is_refused(sock: str) -> None:
    up = Upstream(send(b"SSH-2.0-OpenSSH\r\n\r\n"))
    async with await serving(up, sock):
        client = VLLMClient(f"unix:{sock}", 5.0)
        with pytest.raises(VLLMUnreachable, match="not valid HTTP"):
            await client.post("/v1/completions", b"{}")
        await client.aclose()


async def test_post_timeout_bounds_the_whole_call(sock: str) -> None:
    async def slow(writer: asyncio.StreamWriter, body: bytes) -> bool:
        await asyncio.sleep(1)
        return await send(whole(b"{}"))(writer, body)

    up = Upstream(slow)
    async with await serving(up, sock):
        client = VLLMClient(f"unix:{sock}", 5.0)
        with pytest.raises(httpx.TimeoutException):
            await client.post("/v1/completions", b"{}", timeout=0.1)
        await client.aclose()


async def test_tcp_addresses_keep_their_path_prefix_and_host() -> None:
    up = Upstream(send(whole(json.dumps({"ok": True}).encode())))
    server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        client = VLLMClient(f"http://127.0.0.1:{port}/vllm", 5.0)
        assert (await client.post("/v1/completions", b"{}")).json() == {"ok": True}
        await client.aclose()
    head = up.requests[0][0]
    assert head.startswith(b"POST /vllm/v1/completions HTTP/1.1\r\n") and f"host: 127.0.0.1:{port}".encode() in head


def test_https_and_test_transports_stay_on_httpx() -> None:
    assert VLLMClient("https://vllm.example", 5.0)._fast is None
    assert VLLMClient("http://fake", 5.0, transport=httpx.MockTransport(lambda r: httpx.Response(200)))._fast is None
    with pytest.raises(ValueError, match="plain http"):
        http1.Http1Pool("https://vllm.example", None, {})


async def test_an_answer_read_slowly_pauses_reading_from_vllm_and_arrives_whole(sock: str, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(http1, "HIGH_WATER", 64)
    lines = [b"data: %d %s\n\n" % (i, b"x" * 40) for i in range(200)]
    up = Upstream(send(SSE_HEAD + b"".join(chunk(line) for line in lines) + b"0\r\n\r\n"))
    async with await serving(up, sock):
        client = VLLMClient(f"unix:{sock}", 5.0)
        paused = []
        async with client.stream("/v1/completions", b"{}") as reply:
            got = []
            async for line in reply.aiter_lines():
                paused.append(reply._conn is not None and reply._conn.paused)
                got.append(line)
                await asyncio.sleep(0)
        await client.aclose()
    assert [x for x in got if x] == [line.decode().strip() for line in lines]
    assert any(paused)
