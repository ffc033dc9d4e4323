"""Tensor-parallel training worker pieces (loop/worker/tp.py) against the unsplit model: two real gloo ranks.

Two spawned processes each build their slices of a tiny Llama (tests/unit/worker/tp_ranks.py) and run the same
scenario the test runs here on the whole model: a DPO-like loss, APOLLO-Mini / AdamW / APOLLO staged updates, the
update check, an applied step. Each rank must see exactly its slice of the single-device numbers.

Run: .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/worker/test_tp.py
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.multiprocessing import start_processes

from tests.unit.worker import tp_ranks

LAYOUTS = ["tied", "untied"]
RANKS = range(tp_ranks.WORLD)


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """The ranks, started (they take a while to import): the reference is computed meanwhile."""
    folder = tmp_path_factory.mktemp("tp")
    ctx = start_processes(tp_ranks.main, args=(tp_ranks.WORLD, str(folder)), nprocs=tp_ranks.WORLD, join=False,
                          start_method="spawn")
    return ctx, folder


@pytest.fixture(scope="module")
def ranks(launched, reference) -> list[dict[str, Any]]:
    ctx, folder = launched
    tp_ranks.join_ranks(ctx)
    return [torch.load(Path(folder) / f"rank{r}.pt") for r in RANKS]


@pytest.fixture(scope="module")
def reference(launched) -> dict[str, dict[str, Any]]:
    """The same scenario on the unsplit model, and its initial weights."""
    out = {}
    for layout in LAYOUTS:
        tied = layout == "tied"
        out[layout] = tp_ranks.scenario(tied, None)
        out[layout]["weights"] = tp_ranks.full_model(tied).state_dict()
    return out


def piece(whole: torch.Tensor, shards: dict[str, tuple[int, int, int]], name: str) -> torch.Tensor:
    """This rank's part of `whole` (all of it for a replicated tensor)."""
    if name not in shards:
        return whole
    dim, start, n = shards[name]
    return whole.narrow(dim, start, n)


def close(got: torch.Tensor, want: torch.Tensor, what: str, rel: float = 1e-5) -> None:
    """Equal up to fp32 reassociation (the ranks sum partial products in another order): within `rel` of the
    largest magnitude of the tensor."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, want {tuple(want.shape)}"
    scale = float(want.abs().max()) or 1.0
    err = float((got - want).abs().max())
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:g} x {scale:.3g}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_rank_holds_the_expected_slices_in_the_models_parameter_order(ranks, reference, layout) -> None:
    ref = reference[layout]
    for r in RANKS:
        got = ranks[r][layout]
        assert got["names"] == ref["names"]
        for key in tp_ranks.RUNS:
            assert got[key]["order"] == ref[key]["order"]  # APOLLO seeds each projection by this position
        want = {n: tp_ranks.split(n, tuple(ref["weights"][n].shape), r, layout == "tied") for n in ref["names"]}
        assert got["shards"] == {n: cut for n, cut in want.items() if cut is not None}
    vocab = [ranks[r][layout]["shards"]["model.embed_tokens.weight"] for r in RANKS]
    assert [n for _, _, n in vocab] == ([52, 48] if layout == "tied" else [50, 50])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", RANKS)
def test_logits_equal_the_unsplit_models(ranks, reference, layout, rank) -> None:
    got = ranks[rank][layout]["dpo"]["logits"][0]
    want = reference[layout]["dpo"]["logits"][0]
    assert got.shape == (2, 11, tp_ranks.VOCAB)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert float(want.std()) > 0.1  # logits far from flat: a misplaced vocabulary slice would show


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", RANKS)
def test_grads_are_this_ranks_slices_of_the_whole_grads(ranks, reference, layout, rank) -> None:
    got = ranks[rank][layout]
    for step in range(2):  # the second after the first update was applied to the slices
        want = reference[layout]["dpo"]["grads"][step]
        grads = got["dpo"]["grads"][step]
        assert sorted(grads) == sorted(want)
        for name, g in grads.items():
            close(g, piece(want[name], got["shards"], name), f"rank {rank} step {step} grad of {name}")


@pytest.mark.parametrize("run", sorted(tp_ranks.RUNS))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", RANKS)
def test_staged_updates_are_slices_of_the_single_device_update(ranks, reference, run, layout, rank) -> None:
    got, want = ranks[rank][layout][run], reference[layout][run]
    shards = ranks[rank][layout]["shards"]
    # fixed gradients: the same numbers in, the same update out; backprop's differ in their last bits, which
    # Adam's normalisation of small entries (the norms' vectors) enlarges
    rel = 1e-4 if run == "dpo" else 1e-6
    for step in range(2):  # the second from the committed state of the first, after the first was applied
        assert sorted(got["deltas"][step]) == sorted(want["deltas"][step])
        for name, d in got["deltas"][step].items():
            close(d, piece(want["deltas"][step][name], shards, name), f"rank {rank} step {step} delta of {name}",
                  rel=rel)
    # the applied slices moved the split model exactly as the whole update moved the whole one
    moved = want["logits"][1] - want["logits"][0]
    assert float(moved.abs().max()) > 1e-3
    torch.testing.assert_close(got["logits"][1], want["logits"][1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("run", sorted(tp_ranks.RUNS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_update_check_measures_whole_tensors(ranks, reference, run, layout) -> None:
    ok, reason, global_ratio, max_ratio, worst = reference[layout][run]["check"]
    assert ok and reason is None and 0 < global_ratio <= max_ratio
    for r in RANKS:
        got = ranks[r][layout][run]
        assert got["check"][:2] == (True, None)
        assert got["check"][2] == pytest.approx(global_ratio, rel=1e-5)
        assert got["check"][3] == pytest.approx(max_ratio, rel=1e-5)
        assert got["check"][4] == worst
        # a cap under the largest ratio: every rank refuses the same tensor the single device refuses
        capped_ok, capped_reason, capped_worst = got["capped"]
        assert not capped_ok and "exceeds the cap" in capped_reason
        assert capped_worst == reference[layout][run]["capped"][2]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_non_finite_delta_on_one_rank_makes_every_rank_refuse(ranks, layout) -> None:
    replicated, sharded = "model.norm.weight", "model.layers.1.self_attn.o_proj.weight"
    for run in tp_ranks.RUNS:
        rank0, rank1 = (ranks[r][layout][run]["nan"] for r in RANKS)
        # a replicated weight: only rank 1 sees the NaN; rank 0 refuses because rank 1 did
        assert rank1[replicated][0] is False and replicated in rank1[replicated][1]
        assert "non-finite" in rank1[replicated][1]
        assert rank0[replicated][0] is False and "rank(s) [1]" in rank0[replicated][1]
        # a split weight: the whole tensor's norm is not finite on every rank
        for got in (rank0, rank1):
            assert got[sharded][0] is False and sharded in got[sharded][1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_full_gathers_every_slice_into_the_whole_weight(ranks, reference, layout) -> None:
    weights = reference[layout]["weights"]
    for r in RANKS:
        full = ranks[r][layout]["full"]
        assert sorted(full) == sorted(reference[layout]["names"])
        for name, t in full.items():
            assert torch.equal(t, weights[name]), f"rank {r}: the gathered {name} is not the whole weight"


@pytest.mark.parametrize("case", ["same half", "whole on each", "different names"])
def test_exchange_ranges_refuses_slices_that_do_not_split_a_weight_once(ranks, case) -> None:
    for r in RANKS:
        message = ranks[r]["refused"][case]
        assert message, f"rank {r} accepted {case!r}"
        if case == "different names":
            assert "shard different weights" in message
        else:
            assert "model.layers.0.self_attn.k_proj.weight" in message and "replicates" in message


def test_send_hands_rank_0s_bytes_to_every_rank(ranks) -> None:
    for r in RANKS:
        assert ranks[r]["sent"] == [b"\x00loop\xff", None]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_screen_measures_the_whole_models_pulls_on_every_rank(ranks, reference, layout) -> None:
    """A budget that holds every tensor: the learned direction and the per-row pulls summed over ranks are the
    single-device ones. A budget that holds some (each rank spends it on its own slices, so more fit than on one
    device): every rank chooses the same tensors, by their whole change, and reads the same pulls."""
    want = reference[layout]["screen"]
    got = [ranks[r][layout]["screen"] for r in RANKS]
    for budget, (names, fraction, pulls) in want.items():
        if budget > 1 << 20:
            for r in RANKS:
                g_names, g_fraction, g_pulls = got[r][budget]
                assert g_names == names and abs(g_fraction - fraction) < 1e-9 and fraction == 1.0
                close(torch.tensor(g_pulls), torch.tensor(pulls), f"rank {r} pulls")
        else:
            (names0, fraction0, pulls0), (names1, fraction1, pulls1) = got[0][budget], got[1][budget]
            assert names0 == names1 and fraction0 == fraction1 and pulls0 == pulls1
            assert 0 < len(names0) < len(want[1 << 30][0]) and 0 < fraction0 < 1.0


def test_the_rendezvous_store_still_serves_a_group_made_after_the_join(ranks) -> None:
    for r in RANKS:
        assert ranks[r]["late group"] == sum(range(1, tp_ranks.WORLD + 1))


def test_only_rendezvous_files_of_dead_workers_are_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    from loop.worker.tp import remove_stale_rendezvous, rendezvous_file

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = rendezvous_file(tmp_path, int(gone.stdout))
    alive = rendezvous_file(tmp_path, os.getpid())
    other = tmp_path / "worker-dist-notapid"
    for f in (dead, alive, other):
        f.write_bytes(b"")
    assert remove_stale_rendezvous(tmp_path) == [dead]
    assert not dead.exists() and alive.exists() and other.exists()
