"""Replicas following replica 0 (loop/worker/mirrors.py) between real processes, without vLLM: each replica is a
child exporting a tiny module with the plugin's own export code (tests/unit/worker/test_handles.py's Child);
"replica 0" is a module of the same shapes in this process, written the way the worker writes the live weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loop.worker.handles import attach, read_handles
from loop.worker.mirrors import MirrorError, Mirrors
from loop.worker.update import weights_checksum
from tests.unit.worker.test_handles import Child


def primary() -> dict[str, torch.Tensor]:
    """Replica 0's tensors by vLLM name: the child's module, other values."""
    torch.manual_seed(1)
    m = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 6), torch.nn.Linear(4, 10, bias=False))
    m[2].weight = m[0].weight
    return {n: t.detach() for n, t in m.named_parameters(remove_duplicate=False)}  # a tied weight under both names


def sums(t: dict[str, torch.Tensor]) -> tuple[float, float]:
    return float(t["0.weight"].sum()), float(t["1.weight"].sum())


def test_a_sync_then_every_write_lands_in_the_replicas_own_memory(tmp_path: Path) -> None:
    one, two = Child(tmp_path / "r1"), Child(tmp_path / "r2")
    try:
        live = primary()
        mirrors = Mirrors([str(tmp_path / "r1"), str(tmp_path / "r2")])
        assert one.sums() != pytest.approx(sums(live))
        assert mirrors.copy(live) == []  # nothing attached yet: a replica serves only after its sync
        load_id, _ = mirrors.sync(1, live)
        assert load_id == read_handles(tmp_path / "r1").meta["load_id"]
        assert one.sums() == pytest.approx(sums(live), abs=1e-5)  # replica 1's process sees replica 0's weights
        assert two.sums() != pytest.approx(sums(live), abs=1e-5)  # replica 2 not synced yet
        mirrors.sync(2, live)

        with torch.no_grad():  # an Apply: replica 0 written in place, then copied
            live["1.weight"].add_(0.5)
        assert mirrors.copy(live) == [1, 2]
        assert one.sums() == pytest.approx(sums(live), abs=1e-5) and two.sums() == pytest.approx(sums(live), abs=1e-5)
        want = weights_checksum(sorted(live.items()))
        assert mirrors.checksums(live) == [want, want, want]
    finally:
        one.stop()
        two.stop()


def test_a_replica_left_out_of_a_pause_is_not_written_until_it_is_synced_again(tmp_path: Path) -> None:
    one, two = Child(tmp_path / "r1"), Child(tmp_path / "r2")
    try:
        live = primary()
        mirrors = Mirrors([str(tmp_path / "r1"), str(tmp_path / "r2")])
        mirrors.sync(1, live)
        mirrors.sync(2, live)
        before = two.sums()
        assert mirrors.leave([2, 5]) == [2]  # replica 2 still serves (its pause failed): hands off its memory
        with torch.no_grad():
            live["1.weight"].add_(0.5)
        assert mirrors.copy(live) == [1]
        assert one.sums() == pytest.approx(sums(live), abs=1e-5) and two.sums() == pytest.approx(before)
        assert mirrors.checksums(live)[2] == ""
        mirrors.sync(2, live)
        assert two.sums() == pytest.approx(sums(live), abs=1e-5)
    finally:
        one.stop()
        two.stop()


def test_a_restarted_replica_is_left_alone_until_it_is_synced_again(tmp_path: Path) -> None:
    live = primary()
    mirrors = Mirrors([str(tmp_path / "r1")])
    first = Child(tmp_path / "r1")
    mirrors.sync(1, live)
    first.stop()
    second = Child(tmp_path / "r1")  # the replica restarted: a new load, its own weights again
    try:
        before = second.sums()
        with torch.no_grad():
            live["0.weight"].mul_(2)
        assert mirrors.copy(live) == [] and mirrors.checksums(live)[1:] == [""]
        assert second.sums() == pytest.approx(before)  # nothing written into the new process's memory
        mirrors.sync(1, live)
        assert second.sums() == pytest.approx(sums(live), abs=1e-5)
    finally:
        second.stop()


def test_a_replica_that_is_not_there_or_serves_another_model_is_refused(tmp_path: Path) -> None:
    live = primary()
    mirrors = Mirrors([str(tmp_path / "r1")])
    with pytest.raises(MirrorError, match="replica 1 has no weights to sync"):
        mirrors.sync(1, live)
    with pytest.raises(MirrorError, match="no replica 2"):
        mirrors.sync(2, live)
    other = subprocess.Popen([sys.executable, "-c", (
        "import sys, torch\nfrom plugin.export import export_module\n"
        "m = torch.nn.Linear(3, 3)\nexport_module(m, sys.argv[1], meta={'model_path': 'x', 'architectures': ['X']})\n"
        "print('ready', flush=True)\nsys.stdin.read()\n"), str(tmp_path / "r1")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "ready"
        before = {n: t.clone() for n, t in attach(read_handles(tmp_path / "r1"), 0).items()}
        with pytest.raises(MirrorError, match="does not hold the same model"):
            mirrors.sync(1, live)
        after = attach(read_handles(tmp_path / "r1"), 0)
        assert all(torch.equal(before[n], after[n]) for n in before)  # refused before anything was written
        assert mirrors.attached == {}
    finally:
        other.kill()
        other.wait()


def test_a_card_is_found_by_its_uuid_and_an_unseen_one_is_refused() -> None:
    from loop.worker.handles import HandleError, local_device

    assert local_device(3, "") == 3  # a handle file from before UUIDs: the index as vLLM saw it
    if not torch.cuda.is_available():
        with pytest.raises(HandleError, match="does not see"):
            local_device(0, "GPU-00000000-0000-0000-0000-000000000000")
        return
    for i in range(torch.cuda.device_count()):
        assert local_device(0, str(torch.cuda.get_device_properties(i).uuid)) == i


def test_a_rank_the_replica_does_not_have_is_refused_by_name(tmp_path: Path) -> None:
    """A tensor-parallel worker's rank r mirrors rank r of each replica: a replica started with fewer ranks (here
    one) cannot follow rank 1's shards, and the sync says so instead of copying another rank's tensors."""
    child = Child(tmp_path / "r1")
    try:
        with pytest.raises(MirrorError, match="runs with tensor parallel 1: it has no rank 1"):
            Mirrors([str(tmp_path / "r1")], rank=1).sync(1, primary())
        assert Mirrors([str(tmp_path / "r1")], rank=0).sync(1, primary())[0]
    finally:
        child.stop()
