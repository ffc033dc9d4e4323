"""`loop feedback export|stats` against the feedback routes served by a real uvicorn on a free port (SQLite)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from tests.unit.feedback_support import add_response, feedback_app
from loop.cli import main
from loop.config import Settings
from loop.db.session import make_engine, make_sessionmaker, migrate


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, object]]:
    url = f"sqlite:///{tmp_path / 'loop.db'}"
    migrate(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    app = feedback_app(Settings(data_dir=tmp_path, database_url=url), sessions)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", sessions
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.dispose()


def seed(url: str, sessions) -> None:  # noqa: ANN001
    good = add_response(sessions, prompt="Capital of France?", completion="Paris.")
    bad = add_response(sessions, prompt="Capital of France?", completion="Rome.")
    for body in ({"response_id": good, "thumb": "up"}, {"response_id": bad, "thumb": "down"}):
        assert httpx.post(f"{url}/api/ratings", json=body).status_code == 201


def test_export_both_formats(served, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url, sessions = served
    seed(url, sessions)
    out = tmp_path / "pairs.jsonl"
    assert main(["feedback", "export", "--format", "preference", "--out", str(out), "--url", url]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"prompt": [{"role": "user", "content": "Capital of France?"}],
                     "chosen": [{"role": "assistant", "content": "Paris."}],
                     "rejected": [{"role": "assistant", "content": "Rome."}]}]
    assert "wrote 1 preference rows" in capsys.readouterr().err
    out2 = tmp_path / "thumbs.jsonl"
    assert main(["feedback", "export", "--format", "unpaired", "--standard", "--out", str(out2), "--url", url,
                 "--quiet"]) == 0
    rows = [json.loads(line) for line in out2.read_text().splitlines()]
    assert rows == [{"prompt": "Capital of France?", "completion": "Paris.", "label": True},
                    {"prompt": "Capital of France?", "completion": "Rome.", "label": False}]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_export_errors_are_clear(served, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = served
    assert main(["feedback", "export", "--format", "unpaired", "--out", str(tmp_path / "x.jsonl"), "--url", url,
                 "--since", "not-a-time"]) == 1
    err = capsys.readouterr().err
    assert "since" in err and not (tmp_path / "x.jsonl").exists()
    assert main(["feedback", "export", "--format", "unpaired", "--out", str(tmp_path / "nope" / "x.jsonl"),
                 "--url", url]) == 1
    assert "does not exist" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert main(["feedback", "stats", "--url", dead]) == 1
    assert "cannot read stats" in capsys.readouterr().err


def test_stats(served, capsys: pytest.CaptureFixture[str]) -> None:
    url, sessions = served
    seed(url, sessions)
    assert main(["feedback", "stats", "--url", url]) == 0
    text = capsys.readouterr().out
    assert "responses 2" in text and "up 1   down 1" in text and "1 preference pairs" in text
    assert main(["feedback", "stats", "--url", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unpaired_available"] == 2
