"""Metrics, JSON logs, the CLI's settings precedence and the vLLM client: its control calls (against a fake),
vLLM's address (`unix:/path` for a socket, or a URL) and talking over a Unix socket."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Query

from loop.cli import build_parser
from loop.cli.serve import settings_from_args
from loop.logs import JsonFormatter
from loop.metrics import Metrics
from loop.vllm.client import VLLMClient, VLLMError, VLLMUnreachable, parse_address, sync_client
from tests.support import fake_vllm_command, wait_for_socket


def test_metrics_have_their_own_registry_and_render() -> None:
    a, b = Metrics(), Metrics()  # two apps in one process must not clash
    a.request("/v1/chat/completions", 200)
    a.stored(10, 5)
    a.rating()
    a.train_step(0.69)
    a.set_weight_version(3)
    text = a.render()[0].decode()
    assert 'loop_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    assert "loop_completion_tokens_total 5.0" in text and "loop_weight_version 3.0" in text
    assert "loop_ratings_total 1.0" in text and "loop_training_loss 0.69" in text
    assert "loop_ratings_total 0.0" in b.render()[0].decode()


def test_json_log_lines_carry_extra_fields() -> None:
    record = logging.LogRecord("loop.api", logging.INFO, __file__, 1, "stored %d rows", (2,), None)
    record.response_id = "resp-1"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "stored 2 rows" and line["level"] == "info" and line["response_id"] == "resp-1"
    assert line["ts"].endswith("Z")


def test_flags_override_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.setenv("LOOP_PORT", "7000")
    monkeypatch.setenv("LOOP_VLLM_RESTART_WINDOW_S", "60")
    args = build_parser().parse_args(["serve", "--port", "9000", "--data-dir", str(tmp_path)])
    s = settings_from_args(args)
    assert s.port == 9000 and s.vllm_restart_window_s == 60 and s.data_dir == tmp_path
    assert s.vllm_address == f"unix:{tmp_path / 'run' / 'vllm.sock'}"  # the managed vLLM: no TCP port
    args = build_parser().parse_args(["serve", "--vllm-restart-window-s", "30", "--vllm-url", "unix:/s/v.sock"])
    assert settings_from_args(args).vllm_restart_window_s == 30 and settings_from_args(args).vllm_address == "unix:/s/v.sock"
    assert s.train_mode == "atomic"
    monkeypatch.setenv("LOOP_TRAIN_MODE", "hogwild")
    assert settings_from_args(build_parser().parse_args(["serve", "--train-mode", "lowmem"])).train_mode == "lowmem"
    assert settings_from_args(build_parser().parse_args(["serve"])).train_mode == "hogwild"


def test_bad_flag_value_exits_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(vllm_url="localhost:8001")
    with pytest.raises(SystemExit) as exc:
        settings_from_args(args)
    assert exc.value.code == 2 and "must start with http://, https:// or unix:/" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--vllm-port", "8001"])  # gone: the managed vLLM has no port


def test_vllm_addresses() -> None:
    assert parse_address("unix:/run/loop/vllm.sock") == ("http://vllm", "/run/loop/vllm.sock")
    assert parse_address("unix:///run/x.sock") == ("http://vllm", "/run/x.sock")
    assert parse_address("http://127.0.0.1:8001/") == ("http://127.0.0.1:8001", None)
    for bad in ("unix:relative.sock", "127.0.0.1:8001"):
        with pytest.raises(ValueError, match="unix:/path/to/sock"):
            parse_address(bad)


async def test_client_talks_to_vllm_over_a_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "v.sock"
    proc = subprocess.Popen(fake_vllm_command(tmp_path, sock))
    try:
        wait_for_socket(sock, 20)
        client = VLLMClient(f"unix:{sock}", 5)
        assert client.socket_path == str(sock) and await client.health() is True
        assert await client.is_paused() is False
        (tmp_path / "v.sock.paused").touch()
        assert await client.is_paused() is True
        (tmp_path / "v.sock.sick").touch()
        problem = await client.health_problem()
        assert problem is not None and "answered 503" in problem and "EngineCore died (fake)" in problem
        await client.aclose()
        with sync_client(f"unix:{sock}") as direct:
            assert direct.get("/is_paused").json() == {"is_paused": True}
    finally:
        proc.kill()
        proc.wait()
    gone = VLLMClient(f"unix:{sock}", 2)
    assert await gone.health() is False and "no answer" in (await gone.health_problem() or "")
    with pytest.raises(VLLMUnreachable, match=f"unix:{sock}"):
        await gone.resume()
    await gone.aclose()


def test_cli_lists_its_commands() -> None:
    parser = build_parser()
    assert parser.parse_args(["db", "current"]).func is not None
    assert parser.parse_args(["bench", "proxy", "-n", "3"]).requests == 3


async def test_client_control_calls() -> None:
    fake = FastAPI()
    calls: list[str] = []

    @fake.post("/pause")
    async def pause(mode: str = Query(), clear_cache: bool = Query(True)) -> dict:
        calls.append(f"pause {mode} {clear_cache}")
        return {"status": "paused"}

    @fake.post("/resume")
    async def resume() -> dict:
        calls.append("resume")
        return {"status": "resumed"}

    @fake.get("/is_paused")
    async def is_paused() -> dict:
        return {"is_paused": True}

    client = VLLMClient("http://fake", 5, transport=httpx.ASGITransport(fake))
    await client.pause("keep")
    await client.resume()
    assert await client.is_paused() is True
    assert calls == ["pause keep False", "resume"]
    with pytest.raises(VLLMError, match="VLLM_SERVER_DEV_MODE"):
        await client.reset_prefix_cache()  # not routed by the fake: a 404
    with pytest.raises(ValueError):
        await client.pause("later")
    await client.aclose()
    closed = VLLMClient("http://127.0.0.1:9", 2)
    assert await closed.health() is False
    with pytest.raises(VLLMUnreachable):
        await closed.resume()
    await closed.aclose()


async def test_prefix_reset_preempts_frozen_requests_and_a_refused_reset_is_an_error() -> None:
    """After a keep pause the frozen requests hold KV blocks: the reset must preempt them (so they are recomputed on
    the new weights), and vLLM's `{"success": false}` must not pass for a reset (the stale cache would be served)."""
    fake = FastAPI()
    calls: list[str] = []
    answer = {"success": True}

    @fake.post("/reset_prefix_cache")
    async def reset(reset_running_requests: bool = Query(False)) -> dict:
        calls.append(f"reset running={reset_running_requests}")
        return answer

    client = VLLMClient("http://fake", 5, transport=httpx.ASGITransport(fake))
    await client.reset_prefix_cache()
    assert calls == ["reset running=True"]
    answer["success"] = False
    with pytest.raises(VLLMError, match="could not reset its prefix cache"):
        await client.reset_prefix_cache()
    await client.aclose()


def test_bench_stats_and_report() -> None:
    from loop.bench.proxy import Stats, report

    s = Stats.of([0.1, 0.2, 0.3, 0.4])
    assert s.p50 == pytest.approx(0.25) and s.p99 == pytest.approx(0.4) and s.mean == pytest.approx(0.25)
    text = report({"vllm": Stats(0.1, 0.2, 0.1), "loop": Stats(0.102, 0.2, 0.103),
                   "diff": Stats(0.002, 0.003, 0.002)}, 10, 8)
    assert "added latency: p50 +2.0 ms (+2.00 %), mean +3.0 ms (+3.00 %)" in text
    assert "median +2.0 ms" in text and "TTFT" not in text  # whole replies only (--no-stream)
    text = report({"vllm": Stats(0.1, 0.2, 0.1), "loop": Stats(0.102, 0.2, 0.103), "diff": Stats(0.002, 0.003, 0.002),
                   "vllm_ttft": Stats(0.05, 0.06, 0.05), "loop_ttft": Stats(0.0515, 0.06, 0.052),
                   "ttft_diff": Stats(0.001, 0.002, 0.001)}, 10, 8)
    assert "added TTFT: p50 +1.5 ms (+3.00 %); paired median +1.0 ms (+2.00 % of vLLM's TTFT p50)" in text


async def test_an_attached_vllm_with_an_api_key_gets_it_on_every_request() -> None:
    import httpx

    from loop.vllm.client import VLLMClient

    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={})

    client = VLLMClient("http://vllm.internal:8001", 5.0, transport=httpx.MockTransport(handler), api_key="k" * 20)
    try:
        await client.post("/v1/chat/completions", b"{}")
        await client.get("/health")
    finally:
        await client.aclose()
    assert seen == [f"Bearer {'k' * 20}"] * 2


async def test_control_calls_never_reuse_a_connection_vllm_is_closing(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's server closes a connection idle for its keep-alive timeout; a request written on it at that moment
    is dropped unanswered ("Server disconnected"). The stand-in drops every request that arrives on a connection
    idle longer than 0.3 s: the client must have let such a connection go (its own limit is below the server's)."""
    import asyncio

    from loop.vllm import client as client_mod

    monkeypatch.setattr(client_mod, "KEEPALIVE_S", 0.15)
    sock = str(tmp_path / "k.sock")
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        loop = asyncio.get_running_loop()
        idle_since = loop.time()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                if loop.time() - idle_since > 0.3:
                    return  # the close that raced the request
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
                await writer.drain()
                idle_since = loop.time()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(serve, sock)
    client = VLLMClient(f"unix:{sock}", 5)
    try:
        await client.pause(mode="keep")
        await asyncio.sleep(0.4)  # idle past the server's limit: the connection is dropped, a new one made
        await client.resume()
        assert len(connections) == 2
    finally:
        await client.aclose()
        server.close()
