"""The worker's request handling on a tiny random bf16 Llama (no vLLM: the model owns its weights here).

Specifies (staged and lowmem alike): Train stages an update without touching the weights; Apply writes it (and only then); a poisoned
update is refused with the weights and the optimizer state bit-identical; Apply without a staged update is an
error; Checkpoint writes a folder HF loads back to the same tensors (no temp folder left, never overwritten);
Restore writes it back in place exactly and refuses an incomplete checkpoint without writing anything.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from loop.worker import protocol as p
from tests.unit.worker_support import FakeChannel, on_model, tiny_llama, tiny_tokenizer, worker_config
from loop.worker.apollo import make_optimizer
from loop.worker.main import Worker

PAIR = p.Pair(prompt=[{"role": "user", "content": "What is two plus two?"}], chosen="Four.", rejected="Five.")


@pytest.fixture
def worker(tmp_path: Path) -> Worker:
    fast = tiny_tokenizer(["What is two plus two? Four. Five.", "user assistant"])
    model = tiny_llama(fast, dtype=torch.bfloat16)
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    config = worker_config(tmp_path / "run")
    w = Worker(config, FakeChannel())  # type: ignore[arg-type]
    return on_model(w, model, fast, folder)


@pytest.fixture(params=[False, True], ids=["staged", "lowmem"])
def lowmem(request: pytest.FixtureRequest) -> bool:
    """train_mode=atomic stages the new values; train_mode=lowmem measures in Train and writes in Apply."""
    return bool(request.param)


def opt_state(w: Worker) -> dict[str, Any]:
    return {f"{i}.{k}": v.clone() for i, st in w.opt.state_dict()["state"].items() for k, v in st.items()}


def test_train_stages_and_apply_writes(worker: Worker, lowmem: bool) -> None:
    before = worker.checksum()
    done = worker.train(p.Train(lowmem=lowmem, req=1, run_id=1, pairs=[PAIR], step=1, steps=2))
    assert isinstance(done, p.TrainDone) and done.update.ok and done.update.n_tensors > 0, done
    assert worker.checksum() == before  # staged only
    # the step's extra memory (P2) in every run's metrics: on the CPU the resident set's rise, in MB and weights
    assert done.metrics["mem_extra_mb"] >= 0 and done.metrics["mem_extra_x"] >= 0, done.metrics
    assert isinstance(worker.ch.sent[-1], p.Progress)
    applied = worker.apply(p.Apply(req=2, run_id=1))
    assert isinstance(applied, p.Applied)
    mid = worker.checksum()
    assert mid != before
    done2 = worker.train(p.Train(lowmem=lowmem, req=3, run_id=1, pairs=[PAIR], step=2, steps=2))
    assert isinstance(done2, p.TrainDone) and len(done2.history) == 2
    # on the CPU only a run's first step is measured (the figure costs a malloc_trim there)
    assert "mem_extra_mb" not in done2.metrics, done2.metrics
    assert isinstance(worker.apply(p.Apply(req=4, run_id=1)), p.Applied)
    # the margin log p(chosen) - log p(rejected) grew between the two steps' forward passes
    assert done2.metrics["logp_margin"] > done.metrics["logp_margin"]
    err = worker.apply(p.Apply(req=5, run_id=1))
    assert isinstance(err, p.Error) and "no staged update" in err.message


def test_the_likelihood_term_is_trained_in_both_write_modes(worker: Worker, lowmem: bool) -> None:
    plain = worker.train(p.Train(lowmem=lowmem, req=1, run_id=1, pairs=[PAIR]))
    assert isinstance(plain, p.TrainDone) and "preferred_nll" not in plain.metrics
    assert isinstance(worker.apply(p.Apply(req=2, run_id=1)), p.Applied)
    with_nll = worker.train(p.Train(lowmem=lowmem, req=3, run_id=2, pairs=[PAIR], nll_weight=1.0))
    assert isinstance(with_nll, p.TrainDone) and with_nll.update.ok, with_nll
    nll = with_nll.metrics["preferred_nll"]
    # a run's first step: the policy is its reference, so DPO's part is log 2 and the rest is the term
    assert nll > 0 and with_nll.metrics["loss"] == pytest.approx(math.log(2) + nll, abs=1e-3)


def test_poisoned_update_refused_bit_identical(worker: Worker, lowmem: bool) -> None:
    worker.train(p.Train(lowmem=lowmem, req=1, run_id=1, pairs=[PAIR]))
    worker.apply(p.Apply(req=2, run_id=1))
    weights, state = worker.checksum(), opt_state(worker)
    done = worker.train(p.Train(lowmem=lowmem, req=3, run_id=2, pairs=[PAIR], inject_nan=True))
    assert isinstance(done, p.TrainDone) and not done.update.ok and "non-finite" in done.update.reason
    refused = worker.apply(p.Apply(req=4, run_id=2))
    assert isinstance(refused, p.Refused) and "non-finite" in refused.reason
    assert worker.checksum() == weights
    after = opt_state(worker)
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_update_over_the_cap_refused(worker: Worker, lowmem: bool) -> None:
    before = worker.checksum()
    worker.train(p.Train(lowmem=lowmem, req=1, run_id=1, pairs=[PAIR]))
    refused = worker.apply(p.Apply(req=2, run_id=1, max_update_ratio=1e-9))
    assert isinstance(refused, p.Refused) and "exceeds the cap" in refused.reason
    assert worker.checksum() == before


def test_checkpoint_loads_in_hf_and_restores_in_place(worker: Worker, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = tmp_path / "ckpt" / "v000001"
    saved = worker.checksum()
    done = worker.write_checkpoint(p.Checkpoint(req=1, path=str(path), version=1))
    assert isinstance(done, p.CheckpointDone), done
    assert {"config.json", "model.safetensors", "loop.json", "optimizer/optimizer.safetensors"} <= set(done.files)
    assert [f.name for f in path.parent.iterdir()] == ["v000001"]  # no temporary folder left
    again = worker.write_checkpoint(p.Checkpoint(req=2, path=str(path), version=1))
    assert isinstance(again, p.Error) and "already exists" in again.message
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    live = dict(worker.model.named_parameters())
    for name, prm in hf.named_parameters():
        assert torch.equal(prm, live[name]), name
    worker.train(p.Train(req=3, run_id=1, pairs=[PAIR]))
    worker.apply(p.Apply(req=4, run_id=1))
    assert worker.checksum() != saved
    restored = worker.restore(p.Restore(req=5, path=str(path)))
    assert isinstance(restored, p.Restored), restored
    assert worker.checksum() == saved


def test_replicas_left_out_of_the_pause_are_not_written_and_reported_lost(worker: Worker, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Apply and Restore with `skip` (replicas whose pause failed, still serving): every other mirror is written,
    the skipped one not at all, and it comes back in `lost` so the API keeps it out until it is synced again."""
    from loop.worker.mirrors import Mirrors

    live = {n: prm.detach() for n, prm in worker.model.named_parameters()}
    worker.vllm_tensors = live
    copies = {k: {n: t.clone() for n, t in live.items()} for k in (1, 2)}
    worker.mirrors = Mirrors([str(tmp_path / "r1"), str(tmp_path / "r2")])
    worker.mirrors.attached = {k: ("L", copies[k]) for k in (1, 2)}
    monkeypatch.setattr(worker.mirrors, "load_id", lambda k: "L")
    path = tmp_path / "ckpt" / "v000001"
    assert isinstance(worker.write_checkpoint(p.Checkpoint(req=1, path=str(path), version=1)), p.CheckpointDone)

    def same(k: int) -> bool:
        return all(torch.equal(copies[k][n], live[n]) for n in live)

    worker.train(p.Train(req=2, run_id=1, pairs=[PAIR]))
    applied = worker.apply(p.Apply(req=3, run_id=1, skip=[2]))
    assert isinstance(applied, p.Applied) and applied.lost == [2]
    assert same(1) and not same(2) and sorted(worker.mirrors.attached) == [1]
    worker.mirrors.attached[2] = ("L", copies[2])  # synced again
    restored = worker.restore(p.Restore(req=4, path=str(path), skip=[1]))
    assert isinstance(restored, p.Restored) and restored.lost == [1]
    assert same(2) and not same(1)


def test_incomplete_checkpoint_refused_without_writing(worker: Worker, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    live = dict(worker.model.named_parameters())
    first = next(iter(live))
    save_file({first: torch.zeros_like(live[first])}, str(bad / "model.safetensors"))
    before = worker.checksum()
    err = worker.restore(p.Restore(req=1, path=str(bad)))
    assert isinstance(err, p.Error) and "lacks" in err.message and "nothing was written" in err.message
    assert worker.checksum() == before
    missing = worker.restore(p.Restore(req=2, path=str(tmp_path / "nowhere")))
    assert isinstance(missing, p.Error) and "not a loop checkpoint" in missing.message


def test_new_values_free_each_delta_as_its_value_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    """The staged apply costs ~1x the trained weights, not 2x: deltas and values never both exist in full."""
    import weakref

    import loop.worker.update as update

    params = [torch.zeros(64, dtype=torch.bfloat16) for _ in range(6)]
    deltas = {prm: torch.full((64,), 1e-2, dtype=torch.bfloat16) for prm in params}
    refs = [weakref.ref(d) for d in deltas.values()]
    alive_at_call: list[int] = []
    real = update.stochastic_round

    def counting(x: torch.Tensor, dtype: torch.dtype, generator: Any = None) -> torch.Tensor:
        alive_at_call.append(sum(r() is not None for r in refs))
        return real(x, dtype, generator)

    monkeypatch.setattr(update, "stochastic_round", counting)
    values = Worker._new_values(deltas)
    assert not deltas and len(values) == len(params)
    assert alive_at_call == [6, 5, 4, 3, 2, 1], alive_at_call  # the finished ones are gone
    assert all(r() is None for r in refs)
    assert all(torch.allclose(v.float(), torch.full((64,), 1e-2), rtol=1e-2) for v in values.values())


def test_restarted_worker_takes_the_optimizer_state_only(worker: Worker, tmp_path: Path) -> None:
    worker.train(p.Train(req=1, run_id=1, pairs=[PAIR]))
    worker.apply(p.Apply(req=2, run_id=1))
    path = tmp_path / "ckpt" / "v000001"
    worker.write_checkpoint(p.Checkpoint(req=3, path=str(path), version=1))
    state = opt_state(worker)
    worker.train(p.Train(req=4, run_id=2, pairs=[PAIR]))
    worker.apply(p.Apply(req=5, run_id=2))  # the live weights move on past the checkpoint
    weights = worker.checksum()
    worker.opt = make_optimizer("adamw", [prm for _, prm in worker.trainable], lr=1e-3)  # as after a restart
    assert isinstance(worker.restore(p.Restore(req=6, path=str(path), weights=False)), p.Restored)
    assert worker.checksum() == weights  # weights untouched
    loaded = opt_state(worker)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    worker.train(p.Train(req=7, run_id=3, pairs=[PAIR]))
    worker.apply(p.Apply(req=8, run_id=3))
    moved = opt_state(worker)
    worker.restore(p.Restore(req=9, path=str(path), weights=False))  # a live optimizer is never overwritten
    assert all(torch.equal(opt_state(worker)[k], moved[k]) for k in moved)


def test_a_mixture_of_experts_checkpoint_is_the_hub_layout_and_restores_into_the_fused_live_tensors(
        tmp_path: Path) -> None:
    """transformers keeps a MoE layer's experts fused in memory; a checkpoint holds them one per expert (what
    vLLM's loader and from_pretrained read). The worker writes that layout and restores it in place."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    fast = tiny_tokenizer(["What is two plus two? Four. Five.", "user assistant"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2))
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    w = on_model(Worker(worker_config(tmp_path / "run"), FakeChannel()), model, fast, folder)  # type: ignore[arg-type]
    assert any(".mlp.experts.gate_up_proj" in n for n, _ in model.named_parameters())  # fused in memory
    path = tmp_path / "ckpt" / "v000001"
    saved = w.checksum()
    assert isinstance(w.write_checkpoint(p.Checkpoint(req=1, path=str(path), version=1)), p.CheckpointDone)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in keys and not any("gate_up_proj" in k for k in keys)
    hf = AutoModelForCausalLM.from_pretrained(path)
    live = dict(model.named_parameters())
    assert all(torch.equal(prm, live[name]) for name, prm in hf.named_parameters())
    w.train(p.Train(req=2, run_id=1, pairs=[PAIR]))
    w.apply(p.Apply(req=3, run_id=1))
    assert w.checksum() != saved
    assert isinstance(w.restore(p.Restore(req=4, path=str(path))), p.Restored)
    assert w.checksum() == saved  # written back through views into the fused tensors


def test_apply_and_restore_write_rows_kept_as_copies_back_into_vllm(worker: Worker, lowmem: bool,
                                                                     tmp_path: Path) -> None:
    """A weight vLLM keeps as rows in another order (Llama 4's q/k) is a copy in the worker: every write (Apply in
    either mode, Restore) puts its rows back into vLLM's memory before replying, i.e. inside the pause."""
    q = "model.layers.0.self_attn.q_proj.weight"
    copy = worker.model.get_parameter(q)
    perm = torch.randperm(copy.shape[0], generator=torch.Generator().manual_seed(0))
    vllm_rows = copy.detach()[perm].clone()  # vLLM's region: its row j holds the copy's row perm[j]
    worker.model.loop_rows = {q: (vllm_rows, torch.argsort(perm))}
    path = tmp_path / "ckpt" / "v000001"
    assert isinstance(worker.write_checkpoint(p.Checkpoint(req=1, path=str(path), version=1)), p.CheckpointDone)
    saved = vllm_rows.clone()
    worker.train(p.Train(lowmem=lowmem, req=2, run_id=1, pairs=[PAIR]))
    assert torch.equal(vllm_rows, saved)  # training stages; nothing reaches vLLM before Apply
    assert isinstance(worker.apply(p.Apply(req=3, run_id=1)), p.Applied)
    assert not torch.equal(vllm_rows, saved) and torch.equal(vllm_rows, copy.detach()[perm])
    assert isinstance(worker.restore(p.Restore(req=4, path=str(path))), p.Restored)
    assert torch.equal(vllm_rows, saved)


def test_a_model_refused_on_re_attach_is_said_to_the_caller_and_ends_the_worker(worker: Worker,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM restarted on a model loop cannot train in place: the request that found it gets the refusal, and the
    worker stops (serve() then exits EXIT_REFUSED, so it is not restarted into the same refusal)."""
    from loop.worker.config import REFUSED_PREFIX
    from loop.worker.main import ModelRefused, _serve

    class Inbox(FakeChannel):
        def messages(self):  # noqa: ANN202
            yield p.Ping(req=1)
            yield p.Discard(req=2, run_id=7)

        def close(self) -> None:
            pass

    def refuse() -> None:
        raise ModelRefused("2 of 20 weights are not views of vLLM's weights")

    monkeypatch.setattr(worker, "ensure_attached", refuse)
    ch = Inbox()
    with pytest.raises(ModelRefused):
        _serve(worker, ch)  # type: ignore[arg-type]
    assert [type(m) for m in ch.sent] == [p.Status, p.Error]  # the ping needs no attach; the discard found it
    assert ch.sent[1].req == 2 and ch.sent[1].message == REFUSED_PREFIX + "2 of 20 weights are not views of vLLM's weights"


def test_a_big_checkpoint_is_sharded_as_hugging_face_does_and_restores_from_its_shards(
        worker: Worker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from transformers import AutoModelForCausalLM

    from loop.worker import checkpoint
    from loop.training.versions import is_durable

    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 64 << 10)  # this tiny model over several files
    path = tmp_path / "ckpt" / "v000001"
    saved = worker.checksum()
    done = worker.write_checkpoint(p.Checkpoint(req=1, path=str(path), version=1))
    assert isinstance(done, p.CheckpointDone), done
    files = sorted(f for f in done.files if f.startswith("model"))
    assert "model.safetensors" not in files and len(files) > 2 and files[-1] == "model.safetensors.index.json"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files[:-1]) and is_durable(str(path))
    assert all(f.endswith(f"-of-{len(files) - 1:05d}.safetensors") for f in files[:-1])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)  # transformers reads the shards
    live = dict(worker.model.named_parameters())
    for name, prm in hf.named_parameters():
        assert torch.equal(prm, live[name]), name
    worker.train(p.Train(req=2, run_id=1, pairs=[PAIR]))
    worker.apply(p.Apply(req=3, run_id=1))
    assert worker.checksum() != saved
    restored = worker.restore(p.Restore(req=4, path=str(path)))
    assert isinstance(restored, p.Restored), restored
    assert worker.checksum() == saved
