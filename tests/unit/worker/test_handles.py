"""Handle files between two real processes, without vLLM: export in a child, attach here, no copy.

The child exports a tiny module with plugin.export.export_module (the same code the vLLM plugin runs after
load_model), then waits; this process reads and validates the file and maps the weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from loop.worker.handles import HandleError, attach, read_handles

CHILD = r"""
import sys, torch
from plugin.export import export_module
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 6), torch.nn.Linear(4, 10, bias=False))
m[2].weight = m[0].weight  # tied, like an LM head
export_module(m, sys.argv[1], meta={"model_path": "tiny", "architectures": ["Tiny"]})
print("ready", flush=True)
for line in sys.stdin:  # each line: print the sum the child sees, so the test can check aliasing both ways
    print(repr(m[0].weight.sum().item()) + " " + repr(m[1].weight.sum().item()), flush=True)
"""


class Child:
    def __init__(self, runtime_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(runtime_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def sums(self) -> tuple[float, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        a, b = self.proc.stdout.readline().split()
        return float(a), float(b)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


@pytest.fixture
def child(tmp_path: Path) -> Iterator[tuple[Child, Path]]:
    rd = tmp_path / "run"
    c = Child(rd)
    try:
        yield c, rd
    finally:
        c.stop()


def _shm_files(rd: Path) -> list[Path]:
    doc = json.loads((rd / "weights-tp0.json").read_text())
    return [Path("/dev/shm") / s["cpu"]["filename"].lstrip("/") for s in doc["storages"]]


def test_private_file_and_dir(child) -> None:
    _, rd = child
    assert (rd.stat().st_mode & 0o777) == 0o700
    assert ((rd / "weights-tp0.json").stat().st_mode & 0o777) == 0o600


def test_attach_aliases_both_ways(child) -> None:
    c, rd = child
    hs = read_handles(rd)
    assert hs.meta["model_path"] == "tiny" and hs.meta["architecture"] == "Tiny" and hs.meta["device"] == "cpu"
    assert hs.meta["tp_size"] == 1 and len(hs.ranks) == 1 and hs.meta["load_id"]
    ts = attach(hs)
    assert set(ts) == {"0.weight", "1.weight", "1.bias", "2.weight"}
    assert ts["0.weight"].data_ptr() == ts["2.weight"].data_ptr()  # the tied pair is one mapping
    assert len(hs.ranks[0].storages) == 3
    assert c.sums()[0] == pytest.approx(ts["0.weight"].sum().item())
    ts["0.weight"].fill_(0.5)
    ts["1.weight"].fill_(2.0)
    assert c.sums() == (0.5 * 40, 2.0 * 24)  # the child sees our writes: same memory, no copy


def test_refuses_group_readable_file(child) -> None:
    _, rd = child
    os.chmod(rd / "weights-tp0.json", 0o640)
    with pytest.raises(HandleError, match="chmod 0600"):
        read_handles(rd)


def test_refuses_world_readable_dir(child) -> None:
    _, rd = child
    os.chmod(rd, 0o755)
    with pytest.raises(HandleError, match="chmod 0700"):
        read_handles(rd)


def test_refuses_bad_format(child) -> None:
    _, rd = child
    path = rd / "weights-tp0.json"
    doc = json.loads(path.read_text())
    doc["version"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(HandleError, match="v99"):
        read_handles(rd)
    path.write_text("{not json")
    with pytest.raises(HandleError, match="not a valid"):
        read_handles(rd)


def test_missing_file_waits_then_explains(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(HandleError, match="LOOP_RUNTIME_DIR"):
        read_handles(tmp_path, wait_s=0.5)
    assert time.monotonic() - t0 >= 0.5


def test_files_removed_when_exporter_is_killed(child) -> None:
    c, rd = child
    shm = _shm_files(rd)
    assert shm and all(p.exists() for p in shm)
    c.proc.kill()  # SIGKILL: no atexit; the reaper must clean up
    c.proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (any(p.exists() for p in shm) or (rd / "weights-tp0.json").exists()):
        time.sleep(0.1)
    assert not any(p.exists() for p in shm)
    assert not (rd / "weights-tp0.json").exists()
    with pytest.raises(HandleError, match="no weight-handle file"):
        read_handles(rd)


def test_stale_file_of_dead_process_is_refused(child) -> None:
    c, rd = child
    stale = (rd / "weights-tp0.json").read_text()
    c.stop()
    time.sleep(0.5)
    path = rd / "weights-tp0.json"
    path.write_text(stale)  # as if the reaper had not run
    os.chmod(path, 0o600)
    with pytest.raises(HandleError, match="stale"):
        read_handles(rd)
    path.unlink()


def test_attached_tensors_survive_exporter_exit(child) -> None:
    c, rd = child
    ts = attach(read_handles(rd))
    expected = ts["1.weight"].clone()
    c.stop()
    time.sleep(0.5)
    assert torch.equal(ts["1.weight"], expected)  # the mapping outlives the unlinked file


def test_export_refuses_a_shared_runtime_dir(tmp_path: Path) -> None:
    from plugin.export import export_module

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o1777)  # like /tmp
    with pytest.raises(PermissionError, match="LOOP_RUNTIME_DIR"):
        export_module(torch.nn.Linear(2, 2), shared)
    assert (shared.stat().st_mode & 0o7777) == 0o1777 and not list(shared.iterdir())
