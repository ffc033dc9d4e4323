"""The pre-write agreement check (loop/worker/agreement.py): how a staged update would move trusted margins.

A tiny random Llama and the in-test tokenizer of test_objectives; the optimizer is plain SGD so the staged delta
is exactly -lr * gradient and the signs below follow from the maths, not from luck."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from test_objectives import _model, tokenizer  # noqa: F401 - tokenizer is a fixture

from loop.worker import agreement
from loop.worker.apollo import make_optimizer, trainable_parameters
from loop.worker.objectives import encode_pairs, train_step
from loop.worker.update import weights_checksum

PAIRS = [("Be brief.", "Paris.", "The capital of France is Paris, I think so."),
         ([{"role": "user", "content": "Two plus two?"}], "Four.", "What is two plus two? Four. Five."),
         ("Tell me.", "London.", "London, probably. I think so. Tell me a long story."),
         ("Be kind.", "Be brief.", "Be brief and kind, the capital of France is Paris."),
         ("Sea?", "Paris.", "Tell me a long story about the sea. Be kind."),
         ("Who?", "Four.", "system user assistant London, probably.")]


def _delta(model: Any, tokenizer: Any, pairs: list[tuple[Any, str, str]], lr: float = 1e-2) -> dict[Any, Any]:
    opt = make_optimizer("sgd", [p for _, p in trainable_parameters(model)], lr=lr)
    batch = encode_pairs(tokenizer, pairs, 128)
    result = train_step(model, opt, batch, objective="dpo", beta=0.1, per_layer=True)
    model.zero_grad(set_to_none=True)
    return result.deltas


def _flip(pairs: list[tuple[Any, str, str]]) -> list[tuple[Any, str, str]]:
    return [(p, r, c) for p, c, r in pairs]


def test_first_order_prediction_matches_the_written_update(tokenizer: Any) -> None:
    model = _model(tokenizer, seed=1)
    deltas = _delta(model, tokenizer, PAIRS[:3], lr=1e-3)
    ref = encode_pairs(tokenizer, PAIRS[3:], 128)
    predicted = agreement.predicted_change(model, deltas, ref)
    with torch.no_grad():
        before = agreement.per_token_margins(model, ref).mean().item()
        moved = copy.deepcopy(model)
        for (name, prm), (_, src) in zip(moved.named_parameters(), model.named_parameters()):
            if src in deltas:
                prm.add_(deltas[src])
        after = agreement.per_token_margins(moved, ref).mean().item()
    assert predicted != 0.0
    assert after - before == pytest.approx(predicted, rel=0.05, abs=1e-7)


def test_a_batch_agrees_with_itself_and_its_flipped_labels_disagree(tokenizer: Any) -> None:
    model = _model(tokenizer, seed=2)
    trusted = agreement.encode_groups(tokenizer, PAIRS, 128, max_groups=16, device="cpu")
    assert [g.n_pairs for g in trusted] == [1] * len(PAIRS)
    good = agreement.measure(model, _delta(model, tokenizer, PAIRS), trusted)
    bad = agreement.measure(model, _delta(model, tokenizer, _flip(PAIRS)), trusted)
    assert good.n_pairs == bad.n_pairs == len(PAIRS) and good.n_groups == len(PAIRS)
    assert good.mean > 0 > bad.mean
    assert good.t is not None and bad.t is not None and good.t > 0 > bad.t
    assert agreement.verdict(good, max_conflict_t=1.0, min_pairs=5) is None
    why = agreement.verdict(bad, max_conflict_t=min(1.0, -bad.t / 2), min_pairs=5)
    assert why is not None and "would undo trusted preferences" in why and f"{len(PAIRS)} trusted pairs" in why


def test_measuring_writes_nothing_and_leaves_no_gradients(tokenizer: Any) -> None:
    model = _model(tokenizer, seed=3)
    deltas = _delta(model, tokenizer, PAIRS[:2])
    before = weights_checksum(list(model.named_parameters()))
    found = agreement.measure(model, deltas, agreement.encode_groups(tokenizer, PAIRS, 128, 4, "cpu"))
    assert found.n_groups == 4 and found.n_pairs == len(PAIRS)
    assert weights_checksum(list(model.named_parameters())) == before
    assert all(p.grad is None for p in model.parameters())
    assert set(found.metrics()) >= {"agreement_pairs", "agreement_groups", "agreement_mean", "agreement_t"}


def test_groups_and_verdict_limits() -> None:
    assert agreement.groups_of(5, 16) == [[0], [1], [2], [3], [4]]
    assert agreement.groups_of(5, 2) == [[0, 2, 4], [1, 3]]
    assert agreement.groups_of(0, 16) == [[]]
    down = agreement.Agreement(n_pairs=10, n_groups=10, mean=-1e-3, t=-3.0, values=[-1e-3] * 10)
    assert agreement.verdict(down, max_conflict_t=2.0, min_pairs=5) is not None
    assert agreement.verdict(down, max_conflict_t=3.5, min_pairs=5) is None  # not far enough below zero
    assert agreement.verdict(down, max_conflict_t=2.0, min_pairs=11) is None  # too few trusted pairs to judge
    flat = agreement.Agreement(n_pairs=10, n_groups=1, mean=-1.0, t=None, values=[-1.0])
    assert agreement.verdict(flat, max_conflict_t=0.0, min_pairs=1) is None  # one group: no spread, no test
    assert math.isfinite(down.metrics()["agreement_t"])
