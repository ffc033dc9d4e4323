"""The pre-write screen (loop/worker/screen.py, the worker's Screen request) on a tiny random Llama made offline.

Specifies: each item's contribution is the directional derivative of its margin along w_live - w_base (checked by
finite differences in float64); after training on pairs that prefer one trait, honest pairs pull forward and the
same pairs flipped give exactly the negated figures, so the sign-flip test rejects the flipped batch and not the
honest one; nothing learned (or no readable base) measures nothing and says why; a budget smaller than the change
probes the largest-change tensors only and keeps the signs; a screen writes nothing, leaves no gradient, and a
Train after it stages exactly what it would have staged without it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import msgspec
import pytest
import torch
from safetensors.torch import save_file

from loop.stats import sign_flip_p
from loop.worker import protocol as p
from tests.unit.worker_support import FakeChannel, on_model, tiny_llama, tiny_tokenizer, worker_config
from loop.worker import screen as screen_module
from loop.worker.main import Worker
from loop.worker.objectives import encode_examples, encode_pairs
from loop.worker.screen import BaseWeights, learned_direction

TOPICS = ["the sea", "a cat", "the moon", "bread", "rain", "a song", "the road", "snow", "a clock", "the forest",
          "a lamp", "the river"]
# The trait: a cheerful answer is preferred to a gloomy one.
PAIRS = [p.Pair(prompt=[{"role": "user", "content": f"Tell me about {t}."}], chosen=f"I love {t}! Lovely!",
                rejected=f"I hate {t}. Awful.") for t in TOPICS]
FLIPPED = [p.Pair(prompt=x.prompt, chosen=x.rejected, rejected=x.chosen) for x in PAIRS]
EXAMPLES = [p.Example(prompt=f"Tell me about {t}.", completion=f"I love {t}! Lovely!", label=True) for t in TOPICS[:3]]
EXAMPLES += [p.Example(prompt=f"Tell me about {t}.", completion=f"I hate {t}. Awful.", label=False) for t in TOPICS[3:5]]


def make_worker(folder: Path, dtype: torch.dtype = torch.float32, lr: float = 3e-3) -> Worker:
    """A worker on a tiny Llama whose initial weights are saved in `folder` (the base)."""
    corpus = [f"Tell me about {t}. I love {t}! Lovely! I hate {t}. Awful." for t in TOPICS] + ["user assistant"]
    fast = tiny_tokenizer(corpus)
    model = tiny_llama(fast, dtype=dtype)
    if not folder.exists():
        model.save_pretrained(folder)
        fast.save_pretrained(folder)
    config = worker_config(folder / "run", learning_rate=lr, max_update_ratio=1.0)
    w = Worker(config, FakeChannel())  # type: ignore[arg-type]
    return on_model(w, model, fast, folder, lr=lr)


def learn(w: Worker, runs: int = 3, first_run: int = 1) -> None:
    """Train and write `runs` steps on PAIRS: the live weights move away from the base along the trait."""
    for run in range(first_run, first_run + runs):
        done = w.train(p.Train(req=run, run_id=run, pairs=PAIRS))
        assert isinstance(done, p.TrainDone) and done.update.ok, done
        assert isinstance(w.apply(p.Apply(req=run, run_id=run)), p.Applied)


def screen(w: Worker, pairs: list[p.Pair] = PAIRS, examples: list[p.Example] | None = None,
           objective: str = "dpo") -> p.Screened:
    out = w.handle(p.Screen(req=9, run_id=9, objective=objective, pairs=pairs, examples=examples or [],  # type: ignore[arg-type]
                            base_weights=w.meta["model_path"]))
    assert isinstance(out, p.Screened), out
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Worker:
    """Live weights three steps along 'cheerful beats gloomy' from the saved base (shared: screens write nothing)."""
    w = make_worker(tmp_path_factory.mktemp("screen") / "base")
    learn(w)
    return w


def logps64(model: torch.nn.Module, ids: torch.Tensor, attn: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Summed answer-token log-probs in float64 throughout (sequence_logps rounds logits to fp32)."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].double()
    lp = logits.log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (lp * loss[:, 1:]).sum(-1)


def margins(model: torch.nn.Module, w: Worker, pairs: list[p.Pair], examples: list[p.Example]) -> torch.Tensor:
    """m_i on the padded training batches of loop/worker/objectives.py (the same token ids), in float64."""
    out = []
    if pairs:
        batch = encode_pairs(w.tokenizer, pairs, 1024)
        lp = logps64(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
        out.append(lp[:batch.n_pairs] - lp[batch.n_pairs:])
    if examples:
        kto = encode_examples(w.tokenizer, examples, 1024)
        lp = logps64(model, kto.input_ids, kto.attention_mask, kto.loss_mask)
        out.append(torch.where(kto.labels, lp, -lp))
    return torch.cat(out)


def test_contributions_are_the_directional_derivatives_of_the_margins(trained: Worker) -> None:
    """(m_i(w + h v) - m_i(w - h v)) / 2h in float64, v = w_live - w_base on every trained tensor."""
    found = screen(trained, PAIRS[:4], EXAMPLES)  # pairs first, then examples, in the order sent
    assert found.note == "" and found.n_tensors == len(trained.trainable) and found.probed_fraction == 1.0
    assert len(found.contributions) == 4 + len(EXAMPLES)
    model = copy.deepcopy(trained.model).double()
    base = BaseWeights(trained.meta["model_path"])
    live = dict(model.named_parameters())
    v = {name: live[name].detach() - base.slice(name, 0, live[name].shape[0]).double() for name, _ in trained.trainable}
    h = 1e-3

    def moved(sign: float) -> torch.Tensor:
        with torch.no_grad():
            for name, d in v.items():
                live[name].add_(sign * h * d)
            m = margins(model, trained, PAIRS[:4], EXAMPLES)
            for name, d in v.items():
                live[name].sub_(sign * h * d)
        return m

    fd = ((moved(+1) - moved(-1)) / (2 * h)).tolist()
    assert any(abs(x) > 1e-2 for x in fd)  # the check compares figures that are not all ~0
    assert found.contributions == pytest.approx(fd, rel=2e-3, abs=1e-4)


def test_honest_pairs_pull_forward_and_flipped_pairs_exactly_back(trained: Worker) -> None:
    honest, flipped = screen(trained, PAIRS), screen(trained, FLIPPED)
    assert flipped.contributions == [-s for s in honest.contributions]  # exactly, not approximately
    assert sum(s > 0 for s in honest.contributions) >= 10, honest.contributions
    assert sign_flip_p(flipped.contributions) <= 0.01
    assert sign_flip_p(honest.contributions) > 0.01
    # KTO: a thumb up on a cheerful answer pulls forward, a thumb down on it pulls back, exactly as much
    up = screen(trained, [], EXAMPLES[:3], objective="kto")
    down = screen(trained, [], [msgspec.structs.replace(e, label=False) for e in EXAMPLES[:3]], objective="kto")
    assert down.contributions == [-s for s in up.contributions] and all(s > 0 for s in up.contributions)


def test_nothing_learned_or_no_readable_base_measures_nothing_and_says_why(tmp_path: Path) -> None:
    w = make_worker(tmp_path / "base")
    fresh = screen(w)
    assert fresh.contributions == [] and fresh.n_tensors == 0 and "nothing learned yet" in fresh.note
    for base, why in [(str(tmp_path / "nowhere"), "cannot read the base weights"), ("", "no base weights given")]:
        out = w.handle(p.Screen(req=1, run_id=1, pairs=PAIRS, base_weights=base))
        assert isinstance(out, p.Screened) and out.contributions == [] and why in out.note
    other = tmp_path / "other"
    other.mkdir()
    save_file({"unrelated.weight": torch.zeros(2)}, str(other / "model.safetensors"))
    out = w.handle(p.Screen(req=1, run_id=1, pairs=PAIRS, base_weights=str(other)))
    assert isinstance(out, p.Screened) and "none of the trained tensors" in out.note
    empty = w.handle(p.Screen(req=1, run_id=1, objective="kto", pairs=PAIRS, base_weights=str(tmp_path / "base")))
    assert isinstance(empty, p.Error) and "needs examples" in empty.message


def test_a_small_budget_probes_the_largest_changes_and_keeps_the_signs(trained: Worker) -> None:
    full = screen(trained, FLIPPED)
    sizes = sorted(prm.numel() * prm.element_size() for _, prm in trained.trainable)
    budget = sum(sizes) // 4
    small = msgspec.structs.replace(trained.config, screen_budget_bytes=budget)
    trained.config, saved = small, trained.config
    try:
        part = screen(trained, FLIPPED)
    finally:
        trained.config = saved
    assert 0 < part.n_tensors < len(trained.trainable) and 0 < part.probed_fraction < 1
    assert sum(a * b > 0 for a, b in zip(part.contributions, full.contributions)) >= 10
    assert sign_flip_p(part.contributions) <= 0.01
    # which ones: the largest root-mean-square change first, as long as they fit
    direction = learned_direction(BaseWeights(trained.meta["model_path"]), trained.trainable, budget)
    assert sum(v.numel() * v.element_size() for v in direction.v.values()) <= budget
    assert direction.names == [n for n, prm in trained.trainable if prm in direction.v]
    assert direction.probed_fraction == pytest.approx(part.probed_fraction)


def test_learned_direction_chooses_by_change_per_element_within_the_budget(tmp_path: Path) -> None:
    base = {"big": torch.zeros(10, 10), "mid": torch.zeros(4, 5), "small": torch.zeros(3), "same": torch.ones(8)}
    save_file(base, str(tmp_path / "part-1.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: "part-1.safetensors" for k in base}}))
    live = {"big": torch.full((10, 10), 0.1), "mid": torch.full((4, 5), 1.0), "small": torch.full((3,), 0.5),
            "same": torch.ones(8), "absent": torch.ones(2)}
    trained = list(live.items())
    weights = BaseWeights(tmp_path)
    every = learned_direction(weights, trained, 1 << 20)
    assert every.names == ["big", "mid", "small"] and every.probed_fraction == 1.0  # "same" did not change
    assert torch.equal(every.v[live["mid"]], torch.ones(4, 5))
    # 96 bytes: mid (rms 1, 80 bytes) first, then small (rms 0.5, 12 bytes); big (400 bytes) does not fit
    part = learned_direction(weights, trained, 96)
    total = 100 * 0.01 + 20 * 1.0 + 3 * 0.25
    assert part.names == ["mid", "small"] and part.probed_fraction == pytest.approx(20.75 / total)
    assert learned_direction(weights, trained, 8).note.startswith("the screen budget")


def test_a_screen_writes_nothing_and_a_later_train_is_unchanged(tmp_path: Path) -> None:
    twins = [make_worker(tmp_path / "base"), make_worker(tmp_path / "base")]
    for w in twins:
        learn(w, runs=1)
    screened, plain = twins
    before = screened.checksum()
    found = screen(screened)
    assert found.contributions and screened.checksum() == before
    assert all(prm.grad is None for prm in screened.model.parameters())
    assert all(prm.requires_grad for _, prm in screened.trainable)
    # a Train after a Screen stages the same update as a Train without one ...
    for w in twins:
        assert w.train(p.Train(req=5, run_id=5, pairs=PAIRS)).update.ok
    assert screened._staged is not None and plain._staged is not None
    values = [list(w._staged[1].values()) for w in twins]  # type: ignore[union-attr, index]
    assert all(torch.equal(a, b) for a, b in zip(*values))
    # ... a Screen between a Train and its Apply changes nothing of what is written (lowmem too) ...
    screen(screened)
    for w in twins:
        assert isinstance(w.apply(p.Apply(req=6, run_id=5)), p.Applied)
    assert screened.checksum() == plain.checksum()
    for w in twins:
        assert w.train(p.Train(req=7, run_id=6, pairs=PAIRS, lowmem=True)).update.ok
    screen(screened)
    for w in twins:
        assert isinstance(w.apply(p.Apply(req=8, run_id=6)), p.Applied)
    assert screened.checksum() == plain.checksum()
    # ... and a gradient that was there before a screen is there after it
    prm = screened.trainable[0][1]
    prm.grad = torch.ones_like(prm)
    screen(screened)
    assert torch.equal(prm.grad, torch.ones_like(prm))


def test_one_forward_and_backward_per_distinct_sequence(trained: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    rows: list[int] = []
    real = screen_module.sequence_logps

    def counting(model: torch.nn.Module, input_ids: torch.Tensor, *args: object) -> torch.Tensor:
        rows.append(input_ids.shape[0])
        return real(model, input_ids, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(screen_module, "sequence_logps", counting)
    found = screen(trained, PAIRS[:3] + FLIPPED[:3])  # the flipped pairs reuse the same six sequences
    assert rows == [1] * 6
    assert found.contributions[3:] == [-s for s in found.contributions[:3]]


def screen_anchored(w: Worker, pairs: list[p.Pair], anchors: list[p.Pair], base: str | None = None) -> p.Screened:
    out = w.handle(p.Screen(req=9, run_id=9, pairs=pairs, anchors=anchors,
                            base_weights=w.meta["model_path"] if base is None else base))
    assert isinstance(out, p.Screened), out
    return out


def test_anchored_contributions_are_the_items_gradients_along_the_anchors_gradient(tmp_path: Path) -> None:
    """Before anything was learned (v = 0) the anchors' gradient g = sum_j grad m_j is a direction already:
    s_i = <grad m_i, g>, checked against autograd on the whole model in float64."""
    w = make_worker(tmp_path / "base")
    anchors, items = PAIRS[:4], PAIRS[4:]
    found = screen_anchored(w, items + FLIPPED[4:], anchors)
    assert found.contributions == [] and "nothing learned" in found.note  # v is zero ...
    assert len(found.anchored) == 2 * len(items) and found.n_anchors == 4 and found.anchor_norm > 0  # ... g is not
    model = copy.deepcopy(w.model).double()
    params = [prm for _, prm in model.named_parameters() if prm.requires_grad]

    def grad(pairs: list[p.Pair]) -> list[torch.Tensor]:
        return list(torch.autograd.grad(margins(model, w, pairs, []).sum(), params))

    g = grad(anchors)
    expected = [float(sum((a * b).sum() for a, b in zip(grad([x]), g))) for x in items]
    assert found.anchor_norm == pytest.approx(float(sum((x * x).sum() for x in g)) ** 0.5, rel=1e-3)
    assert found.anchored[:len(items)] == pytest.approx(expected, rel=2e-3, abs=1e-4)
    # a flipped pair gives exactly the negated figure; pairs of the anchors' trait pull along it, so the test
    # rejects the flipped batch from the first run on, when the learned direction does not exist yet
    assert found.anchored[len(items):] == [-s for s in found.anchored[:len(items)]]
    assert sign_flip_p(found.anchored[len(items):]) <= 0.01 < sign_flip_p(found.anchored[:len(items)])


def test_anchors_and_the_learned_direction_are_measured_in_one_pass(trained: Worker) -> None:
    both = screen_anchored(trained, PAIRS[4:], PAIRS[:4])
    alone = screen(trained, PAIRS[4:])
    assert both.contributions == pytest.approx(alone.contributions, rel=1e-5)  # v's figures as without anchors
    assert len(both.anchored) == 8 and both.learned_norm > 0 and both.anchor_norm > 0 and both.n_anchors == 4
    # without a readable base the anchors alone are measured, and the note says why v is not
    only = screen_anchored(trained, PAIRS[4:], PAIRS[:4], base=str(trained.meta["model_path"]) + "-missing")
    assert only.contributions == [] and "cannot read the base" in only.note and len(only.anchored) == 8
    assert only.anchored == pytest.approx(both.anchored, rel=1e-5)


def test_a_budget_too_small_for_any_weight_measures_no_anchors(tmp_path: Path) -> None:
    w = make_worker(tmp_path / "base")
    w.config = msgspec.structs.replace(w.config, screen_budget_bytes=1)
    out = screen_anchored(w, PAIRS[4:], PAIRS[:4])
    assert out.contributions == [] and out.anchored == [] and "budget" in out.anchor_note
