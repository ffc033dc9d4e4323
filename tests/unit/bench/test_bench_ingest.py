"""`loop bench ingest` end to end at a small size: it starts the API, posts over real HTTP, counts the rows."""

from __future__ import annotations

import pytest

from loop.bench.ingest import report, run
from loop.cli import main


def test_small_run_loses_nothing() -> None:
    r = run(300, concurrency=8, warmup=20)
    assert (r["sent"], r["created"], r["stored"], r["lost"], r["errors"]) == (300, 300, 300, 0, {})
    assert r["rate"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] and r["raw_rate"] > 0 and r["server_cpu_ms"] > 0
    text = report(r, 8)
    assert "300 ratings over HTTP" in text and "lost 0" in text and "loop / raw" in text


def test_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "ingest", "-n", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
