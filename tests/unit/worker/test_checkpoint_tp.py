"""A tensor-parallel worker's checkpoint, written shard file by shard file (loop/worker/checkpoint.py `Lazy`): two real
gloo ranks against the single-device checkpoint of the same weights.

Each spawned rank builds its slices of the tiny Llama of tests/unit/worker/tp_ranks.py and runs the worker's own
`Worker.write_checkpoint` (on a stand-in for the rest of the worker) with small shard files: a checkpoint, the same
path again (it exists), one whose second file fails on rank 0 (disk full), then one more. Specified here: the files
equal the single-device ones byte for byte; rank 0 never held more than one shard file's tensors; every rank made
the same gathers in the same order; a failed write leaves nothing, the other rank returns, and the group goes on.
Then every live weight moves and `Worker.restore` reads the first checkpoint back: each rank's weights equal the
ones before byte for byte, and each rank read only its slice of every split tensor (the safetensors handles are
wrapped and count what each read returned), the replicated ones whole.

Run: .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/worker/test_checkpoint_tp.py
"""

from __future__ import annotations

import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import torch
from torch.multiprocessing import start_processes

from tests.unit.worker import tp_ranks

SHARD = 16_000  # bytes: the tiny Llama's checkpoint in several files
LAYOUTS = ["tied", "untied"]
RANKS = range(tp_ranks.WORLD)


def source(folder: Path, tied: bool) -> Path:
    src = folder / f"src-{'tied' if tied else 'untied'}"
    src.mkdir()
    tp_ranks.config(tied).to_json_file(str(src / "config.json"))
    (src / "tokenizer.json").write_text("{}")
    return src


class _Opt:
    def save(self, path: Path) -> None:
        path.write_bytes(b"optimizer state")

    def load(self, path: Path) -> None:
        self.loaded = path.read_bytes()


def _stand_in(model: Any, tp: Any, src: Path, record: dict[str, Any]) -> Any:
    """What `Worker.write_checkpoint` reads of a worker; `hf_state` the worker's own, its loads counted."""
    from loop.worker.main import Worker

    me = SimpleNamespace(model=model, tp=tp, rank=tp.rank, opt=_Opt(), config=SimpleNamespace(optimizer="adamw"),
                         meta={"model_path": str(src), "load_id": "test"})

    def hf_state() -> Any:
        lazy = Worker.hf_state(me)
        inner = lazy.load
        calls: list[list[str]] = []
        record.setdefault("calls", []).append(calls)

        def load(names: list[str]) -> dict[str, torch.Tensor]:
            record["held"] = max(record.get("held", 0), record["alive"])  # earlier files' tensors still alive
            calls.append(list(names))
            out = inner(names)
            for t in out.values():
                n = t.numel() * t.element_size()
                record["alive"] += n
                weakref.finalize(t, lambda n=n: record.__setitem__("alive", record["alive"] - n))
            record["most"] = max(record.get("most", 0), record["alive"])
            return out

        lazy.load = load
        return lazy

    me.hf_state = hf_state
    return me


def _reply(msg: Any) -> dict[str, Any]:
    return {"type": type(msg).__name__, "message": getattr(msg, "message", ""), "files": getattr(msg, "files", [])}


def _disk_full_on_the_second_file() -> Any:
    import safetensors.torch

    real, saved = safetensors.torch.save_file, []

    def save(*args: Any, **kw: Any) -> None:
        saved.append(args[1])
        if len(saved) == 2:
            raise OSError(28, "No space left on device")
        real(*args, **kw)

    return save


class _Counted:
    """A safetensors file handle that records what each read returned: (name, "whole" or "slice", bytes)."""

    def __init__(self, f: Any, reads: list[tuple[str, str, int]]) -> None:
        self.f, self.reads = f, reads

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.f, attr)

    def __enter__(self) -> _Counted:
        self.f.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self.f.__exit__(*exc)

    def get_tensor(self, name: str) -> torch.Tensor:
        t = self.f.get_tensor(name)
        self.reads.append((name, "whole", t.numel() * t.element_size()))
        return t

    def get_slice(self, name: str) -> Any:
        reads, inner = self.reads, self.f.get_slice(name)

        class Slice:
            def get_shape(self) -> Any:
                return inner.get_shape()

            def __getitem__(self, index: Any) -> torch.Tensor:
                t = inner[index]
                reads.append((name, "slice", t.numel() * t.element_size()))
                return t

        return Slice()


def _restore(me: Any, path: Path) -> dict[str, Any]:
    """Restore `path` after every live weight moved: this rank's weights before and after as bytes, and its reads."""
    import safetensors

    from loop.worker import protocol as p
    from loop.worker.main import Worker

    params = dict(me.model.named_parameters())
    before = {n: t.detach().clone() for n, t in params.items()}
    with torch.no_grad():
        for t in params.values():
            t.add_(1.0)
    moved = {n: t.detach().clone() for n, t in params.items()}
    reads: list[tuple[str, str, int]] = []
    real = safetensors.safe_open
    with mock.patch.object(safetensors, "safe_open", lambda *a, **kw: _Counted(real(*a, **kw), reads)):
        reply = _reply(Worker.restore(me, p.Restore(req=9, path=str(path))))
    by_id = {id(t): n for n, t in params.items()}
    return {"reply": reply, "optimizer": getattr(me.opt, "loaded", None), "before": before, "moved": moved, "reads": reads,
            "after": {n: t.detach().clone() for n, t in params.items()},
            "shards": {by_id[k]: (s.dim, *s.ranges[me.tp.rank], s.full) for k, s in me.tp.shards.items()}}


def rank_main(rank: int, world: int, folder: str) -> None:
    import safetensors.torch

    from loop.worker import protocol as p
    from loop.worker.main import Worker
    from loop.worker.tp import init_group

    torch.set_num_threads(1)
    root = Path(folder)
    group = init_group(rank, world, root / "rdv", "cpu")
    results: dict[str, Any] = {}
    with mock.patch("loop.worker.checkpoint.SHARD_BYTES", SHARD):
        for layout in LAYOUTS:
            model, tp = tp_ranks.rank_model(layout == "tied", group)
            record: dict[str, Any] = {"alive": 0}
            me = _stand_in(model, tp, root / f"src-{layout}", record)
            out = root / layout

            def write(version: int, me: Any = me, out: Path = out) -> dict[str, Any]:
                return _reply(Worker.write_checkpoint(me, p.Checkpoint(req=version, path=str(out / f"v{version}"),
                                                                       version=version)))

            results[layout] = {"first": write(1), "exists": write(1)}
            with mock.patch.object(safetensors.torch, "save_file", _disk_full_on_the_second_file() if rank == 0
                                   else safetensors.torch.save_file):
                results[layout]["disk full"] = write(2)
            results[layout]["after"] = write(3)
            results[layout]["record"] = {k: v for k, v in record.items() if k != "alive"}
            me.ch, me.vllm_tensors, me._staged = SimpleNamespace(state="idle"), {}, None
            me.mirrors = mock.Mock(leave=lambda _: [], dirs=[])
            me.remotes = mock.Mock(resync=lambda _: [], leave=lambda _: [], urls=[])
            me.agreed_lost = lambda lost: Worker.agreed_lost(me, lost)
            me._drop_staged = lambda: None
            results[layout]["restore"] = _restore(me, out / "v1")
    results["in step"] = group.every(b"done")
    torch.save(results, root / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    folder = tmp_path_factory.mktemp("tpckpt")
    for tied in (True, False):
        source(folder, tied)
    ctx = start_processes(rank_main, args=(tp_ranks.WORLD, str(folder)), nprocs=tp_ranks.WORLD, join=False,
                          start_method="spawn")
    tp_ranks.join_ranks(ctx)
    return folder, [torch.load(folder / f"rank{r}.pt") for r in RANKS]


def weight_files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.name.startswith("model")}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_checkpoint_equals_the_single_device_one_byte_for_byte(run, tmp_path: Path, layout) -> None:
    from loop.worker.checkpoint import INDEX, checkpoint_tensors, write_folder

    folder, ranks = run
    tied = layout == "tied"
    want = tmp_path / "single"
    write_folder(want, folder / f"src-{layout}", checkpoint_tensors(tp_ranks.full_model(tied)), shard_bytes=SHARD)
    files = weight_files(want)
    assert INDEX in files and len(files) >= 4  # the index and at least three shard files
    for version in ("v1", "v3"):
        assert weight_files(folder / layout / version) == files
    done = ranks[0][layout]["first"]
    assert done["type"] == "CheckpointDone" and {"config.json", "loop.json", INDEX} <= set(done["files"])
    assert (b"lm_head.weight" in files[INDEX]) is (not tied)  # a tied head is the embedding, written once


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rank_0_holds_one_shard_file_at_a_time_and_every_rank_gathers_alike(run, layout) -> None:
    from loop.worker.checkpoint import checkpoint_tensors, shards

    _, ranks = run
    state = checkpoint_tensors(tp_ranks.full_model(layout == "tied"))
    groups = shards(state, SHARD)
    largest = max(sum(state[k].numel() * state[k].element_size() for k in g) for g in groups)
    total = sum(t.numel() * t.element_size() for t in state.values())
    record = ranks[0][layout]["record"]
    assert record["held"] == 0  # each file's tensors were freed before the next file's were gathered
    assert 0 < record["most"] <= largest < total / 2
    calls = record["calls"]
    assert calls == ranks[1][layout]["record"]["calls"]  # the same gathers, in the same order, on every rank
    assert calls[0] == groups and calls[1] == groups  # the existing folder: rank 0 still took part in every gather
    assert calls[2] == groups and calls[3] == groups  # the disk full half-way: rank 0 drained the rest


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_failed_write_leaves_nothing_and_the_group_goes_on(run, layout) -> None:
    folder, ranks = run
    exists, full = ranks[0][layout]["exists"], ranks[0][layout]["disk full"]
    assert exists["type"] == "Error" and "already exists" in exists["message"]
    assert full["type"] == "Error" and "No space left on device" in full["message"]
    assert sorted(p.name for p in (folder / layout).iterdir()) == ["v1", "v3"]  # no v2, no temporary folder
    for key in ("first", "exists", "disk full", "after"):
        assert ranks[1][layout][key] == {"type": "CheckpointDone", "message": "", "files": []}
    assert ranks[0][layout]["after"]["type"] == "CheckpointDone"
    assert all(r["in step"] == [b"done"] * tp_ranks.WORLD for r in ranks)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_restore_puts_back_every_ranks_weights_byte_for_byte(run, layout) -> None:
    _, ranks = run
    for rank in ranks:
        got = rank[layout]["restore"]
        assert got["reply"]["type"] == "Restored", got["reply"]
        assert got["optimizer"] == b"optimizer state"
        assert got["shards"]  # split weights are there to restore
        for name, want in got["before"].items():
            assert _bits(got["moved"][name]) != _bits(want), name  # the live weight had moved
            assert _bits(got["after"][name]) == _bits(want), name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_restore_reads_only_each_ranks_slice_of_a_split_tensor(run, layout) -> None:
    """Each split tensor: one read of this rank's slice, never the whole; a replicated one: read whole, once."""
    import math

    folder, ranks = run
    files = [f for f in (folder / layout / "v1").iterdir() if f.name.endswith(".safetensors")]
    assert len(files) >= 3  # the restore read several shard files
    on_disk = sum(f.stat().st_size for f in files)
    for rank in ranks:
        got = rank[layout]["restore"]
        reads: dict[str, list[tuple[str, int]]] = {}
        for name, kind, size in got["reads"]:
            reads.setdefault(name, []).append((kind, size))
        assert set(reads) == set(got["before"]) - ({"lm_head.weight"} if layout == "tied" else set())
        for name, t in got["before"].items():
            if name in got["shards"]:
                dim, _, n, full = got["shards"][name]
                mine = n * math.prod(full) // full[dim] * t.element_size()
                assert n < full[dim] and mine == t.numel() * t.element_size()
                assert reads[name] == [("slice", mine)], name
            elif name in reads:
                assert reads[name] == [("whole", t.numel() * t.element_size())], name
        assert sum(size for _, _, size in got["reads"]) < on_disk * 0.75  # split tensors are most of the model
