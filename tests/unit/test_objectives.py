"""Tokenisation, log-probs, DPO/KTO and the staged training step (loop/worker/objectives.py).

A tiny random Llama and a byte-level BPE tokenizer with a ChatML template are built in-test (offline)."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

from loop.worker.apollo import make_optimizer, trainable_parameters
from loop.worker.objectives import (
    KTOBatch,
    PairBatch,
    dpo_loss,
    enable_gradient_checkpointing,
    encode_examples,
    encode_pairs,
    kto_kl_estimate,
    kto_loss,
    sequence_logps,
    train_step,
)
from loop.worker.update import apply_updates_, check_updates, weights_checksum

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["The capital of France is Paris.", "What is two plus two? Four. Five.", "Be brief and kind.",
          "system user assistant", "London, probably. I think so.", "Tell me a long story about the sea."]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, show_progress=False, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


def _model(tokenizer: Any, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(cfg).to(dtype)


PAIRS = [
    ("What is two plus two?", "Four.", "Five."),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The capital of France?"}],
     "Paris.", "London, probably. I think so."),
]


def _answer_text(tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor) -> str:
    return str(tokenizer.decode(ids[mask].tolist()))


def test_loss_mask_covers_exactly_the_answer_and_eos(tokenizer: Any) -> None:
    b = encode_pairs(tokenizer, PAIRS, max_len=128)
    assert b.input_ids.shape[0] == 4 and b.n_pairs == 2 and b.truncated == [False, False]
    texts = [_answer_text(tokenizer, b.input_ids[i], b.loss_mask[i]) for i in range(4)]
    assert texts == ["Four.<|im_end|>", "Paris.<|im_end|>", "Five.<|im_end|>", "London, probably. I think so.<|im_end|>"]
    prompt = tokenizer.decode(b.input_ids[1][b.attention_mask[1].bool() & ~b.loss_mask[1]].tolist())
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nThe capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert not bool((b.loss_mask & ~b.attention_mask.bool()).any())  # padding is never scored


def test_long_prompt_is_cut_from_the_left_keeping_system_and_answer(tokenizer: Any) -> None:
    history = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        history += [{"role": "user", "content": f"Tell me a long story about the sea. {i}"},
                    {"role": "assistant", "content": "The sea is long. " * 5}]
    history.append({"role": "user", "content": "Tell me a long story about the sea. " * 3 + "What is two plus two?"})
    max_len = 48
    b = encode_pairs(tokenizer, [(history, "Four.", "Five.")], max_len=max_len)
    assert b.input_ids.shape[1] <= max_len and b.truncated == [True]
    for row in (0, 1):
        seq = tokenizer.decode(b.input_ids[row][b.attention_mask[row].bool()].tolist())
        assert seq.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
        assert "two plus two?<|im_end|>\n<|im_start|>assistant\n" in seq
    assert _answer_text(tokenizer, b.input_ids[0], b.loss_mask[0]) == "Four.<|im_end|>"
    assert _answer_text(tokenizer, b.input_ids[1], b.loss_mask[1]) == "Five.<|im_end|>"
    # whole earlier turns go first: a looser budget keeps the last turns complete
    last_two = tokenizer.apply_chat_template(history[:1] + history[-3:], tokenize=False, add_generation_prompt=True)
    fit = len(tokenizer(last_two + "Five.<|im_end|>", add_special_tokens=False)["input_ids"]) + 2
    roomy = encode_pairs(tokenizer, [(history, "Four.", "Five.")], max_len=fit)
    text = tokenizer.decode(roomy.input_ids[0][roomy.attention_mask[0].bool()].tolist())
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nTell me a long story about the sea. 5")
    assert "sea. 4" not in text


def test_kto_examples_and_mismatched_kl_rows(tokenizer: Any) -> None:
    ex = [("What is two plus two?", "Four.", True), ("The capital of France?", "London.", False)]
    b = encode_examples(tokenizer, ex, max_len=64)
    assert b.labels.tolist() == [True, False]
    assert _answer_text(tokenizer, b.input_ids[0], b.loss_mask[0]) == "Four.<|im_end|>"
    kl0 = tokenizer.decode(b.kl_input_ids[0][b.kl_attention_mask[0].bool()].tolist())
    assert "two plus two?" in kl0 and kl0.endswith("London.<|im_end|>")  # prompt 0 with completion 1
    with pytest.raises(ValueError, match="at least one"):
        encode_examples(tokenizer, [], max_len=64)


def test_sequence_logps_match_full_logits(tokenizer: Any) -> None:
    model = _model(tokenizer)
    b = encode_pairs(tokenizer, PAIRS, max_len=128)
    with torch.no_grad():
        chunked = sequence_logps(model, b.input_ids, b.attention_mask, b.loss_mask, chunk=3)
        logp = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float().log_softmax(-1)
        ref = (logp[:, :-1].gather(-1, b.input_ids[:, 1:, None])[..., 0] * b.loss_mask[:, 1:]).sum(1)
    torch.testing.assert_close(chunked, ref, rtol=1e-5, atol=1e-4)


def test_dpo_and_kto_losses_by_hand() -> None:
    z = torch.zeros(3)
    loss, m = dpo_loss(z, z, z, z, beta=0.1)
    assert m["loss"] == pytest.approx(math.log(2)) and m["reward_accuracy"] == 0.0
    loss, m = dpo_loss(torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-2.0]), torch.tensor([-4.0]), beta=0.5)
    assert m["reward_margin"] == pytest.approx(1.0) and m["chosen_reward"] == pytest.approx(0.5)
    assert float(loss) == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))
    labels = torch.tensor([True, False])
    loss, m = kto_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]), labels, kl_ref=0.0, beta=1.0)
    assert float(loss) == pytest.approx(1 - 1 / (1 + math.exp(-1.0)), rel=1e-6)  # both on the right side by 1
    assert m["reward_accuracy"] == 1.0
    assert float(kto_kl_estimate(torch.tensor([-3.0, -3.0]), torch.tensor([-1.0, -1.0]))) == 0.0  # clamped at 0
    assert float(kto_kl_estimate(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0]))) == pytest.approx(0.5)


@pytest.mark.parametrize("name,lr", [("apollo", 1e-3), ("apollo-mini", 1e-3), ("adamw", 1e-3), ("sgd", 0.5)])
def test_dpo_steps_raise_the_chosen_margin(tokenizer: Any, name: str, lr: float) -> None:
    model = _model(tokenizer)
    params = [p for _, p in trainable_parameters(model)]
    opt = make_optimizer(name, params, lr=lr, **({"rank": 4} if name == "apollo" else {}))
    b = encode_pairs(tokenizer, PAIRS, max_len=128)
    margins = []
    for _ in range(4):
        before = weights_checksum(model.parameters())
        r = train_step(model, opt, b, objective="dpo", beta=0.1)
        assert weights_checksum(model.parameters()) == before  # the step stages, never writes
        assert all(p.grad is None for p in params)
        check = check_updates(r.deltas, max_ratio=0.5)
        assert check.ok, check.reason
        apply_updates_(r.deltas)
        opt.commit()
        margins.append(r.metrics["logp_margin"])
        assert r.metrics["loss"] == pytest.approx(math.log(2), abs=1e-5)  # ref = this step's pre-update weights
    with torch.no_grad():
        lp = sequence_logps(model, b.input_ids, b.attention_mask, b.loss_mask)
    final = float((lp[:2] - lp[2:]).mean())
    assert final > margins[0] + 0.5, (margins, final)


def test_bf16_model_trains_with_stochastic_rounding(tokenizer: Any) -> None:
    model = _model(tokenizer, dtype=torch.bfloat16)
    opt = make_optimizer("apollo-mini", [p for _, p in trainable_parameters(model)], lr=2e-3)
    b = encode_pairs(tokenizer, PAIRS, max_len=128)
    first = None
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        r = train_step(model, opt, b, objective="dpo", beta=0.1)
        first = r.metrics["logp_margin"] if first is None else first
        apply_updates_(r.deltas, generator=gen)
        opt.commit()
    with torch.no_grad():
        lp = sequence_logps(model, b.input_ids, b.attention_mask, b.loss_mask)
    assert float((lp[:2] - lp[2:]).mean()) > first + 0.5


def test_per_layer_step_equals_full_step(tokenizer: Any) -> None:
    a = _model(tokenizer)
    b_model = copy.deepcopy(a)
    opt_a = make_optimizer("apollo", [p for _, p in trainable_parameters(a)], lr=1e-3, rank=4, seed=1)
    opt_b = make_optimizer("apollo", [p for _, p in trainable_parameters(b_model)], lr=1e-3, rank=4, seed=1)
    batch = encode_pairs(tokenizer, PAIRS, max_len=128)
    full = train_step(a, opt_a, batch, objective="dpo", beta=0.1)
    layer = train_step(b_model, opt_b, batch, objective="dpo", beta=0.1, per_layer=True)
    assert len(full.deltas) == len(layer.deltas) > 0
    for (na, pa), (nb, pb) in zip(trainable_parameters(a), trainable_parameters(b_model)):
        torch.testing.assert_close(full.deltas[pa], layer.deltas[pb], rtol=1e-5, atol=1e-8, msg=na)
    applied: list[torch.Tensor] = []
    streamed = train_step(b_model, opt_b, batch, objective="dpo", beta=0.1, per_layer=True,
                          on_update=lambda p, d: applied.append(p))
    assert streamed.deltas == {} and len(applied) == len(full.deltas)


def test_gradient_checkpointing_gives_the_same_deltas(tokenizer: Any) -> None:
    a = _model(tokenizer)
    b_model = copy.deepcopy(a)
    enable_gradient_checkpointing(b_model)
    batch = encode_pairs(tokenizer, PAIRS, max_len=128)
    opt_a = make_optimizer("adamw", [p for _, p in trainable_parameters(a)], lr=1e-3)
    opt_b = make_optimizer("adamw", [p for _, p in trainable_parameters(b_model)], lr=1e-3)
    da = train_step(a, opt_a, batch, objective="dpo", beta=0.1).deltas
    db = train_step(b_model, opt_b, batch, objective="dpo", beta=0.1).deltas
    for pa, pb in zip(trainable_parameters(a), trainable_parameters(b_model)):
        torch.testing.assert_close(da[pa[1]], db[pb[1]], rtol=1e-4, atol=1e-7)


def test_kto_step_moves_thumbs_up_up_and_thumbs_down_down(tokenizer: Any) -> None:
    model = _model(tokenizer)
    opt = make_optimizer("adamw", [p for _, p in trainable_parameters(model)], lr=2e-3)
    ex = [("What is two plus two?", "Four.", True), ("The capital of France?", "London, probably.", False),
          ("Be brief.", "The sea is long.", True)]
    batch = encode_examples(tokenizer, ex, max_len=64)
    with torch.no_grad():
        start = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
    for _ in range(3):
        r = train_step(model, opt, batch, objective="kto", beta=0.1)
        apply_updates_(r.deltas)
        opt.commit()
    with torch.no_grad():
        end = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
    moved = end - start
    assert float(moved[0]) > 0 and float(moved[2]) > 0 and float(moved[1]) < 0, moved
    assert set(r.metrics) >= {"loss", "kl", "reward_accuracy"}


def test_train_step_refuses_the_wrong_batch(tokenizer: Any) -> None:
    model = _model(tokenizer)
    opt = make_optimizer("sgd", [p for _, p in trainable_parameters(model)], lr=0.1)
    pairs = encode_pairs(tokenizer, PAIRS, max_len=64)
    with pytest.raises(ValueError, match="KTOBatch"):
        train_step(model, opt, pairs, objective="kto", beta=0.1)
    with pytest.raises(ValueError, match="'dpo' or 'kto'"):
        train_step(model, opt, pairs, objective="ipo", beta=0.1)
    assert isinstance(pairs, PairBatch) and not isinstance(pairs, KTOBatch)


def test_an_answer_longer_than_the_budget_is_cut_at_its_end(tokenizer: Any) -> None:
    long_answer = "The sea is long. " * 40
    b = encode_pairs(tokenizer, [("Tell me a long story about the sea.", long_answer, "Five.")], max_len=40)
    assert b.input_ids.shape[1] <= 40 and b.truncated == [True]
    kept = _answer_text(tokenizer, b.input_ids[0], b.loss_mask[0])
    assert long_answer.startswith(kept) and len(kept) > 20  # the start of the answer, scored
    prompt = tokenizer.decode(b.input_ids[0][b.attention_mask[0].bool() & ~b.loss_mask[0]].tolist())
    assert prompt.endswith("<|im_start|>assistant\n")  # the prompt keeps its end: the answer stays attached


def test_an_answer_cut_off_by_max_tokens_gets_no_end_token(tokenizer: Any) -> None:
    """A cut-off answer did not end there: an EOS after it would teach the model to stop at that length (or, as
    the rejected side, never to stop after such text)."""
    eos = tokenizer.eos_token_id
    whole = encode_pairs(tokenizer, [("Be brief.", "Paris.", "The capital of France is")], 64)
    cut = encode_pairs(tokenizer, [("Be brief.", "Paris.", "The capital of France is", False, True)], 64)

    def last_answer_token(b: PairBatch, row: int) -> int:
        return int(b.input_ids[row][b.loss_mask[row]][-1])

    assert last_answer_token(whole, 0) == eos and last_answer_token(whole, 1) == eos
    assert last_answer_token(cut, 0) == eos and last_answer_token(cut, 1) != eos
    assert int(cut.loss_mask[1].sum()) == int(whole.loss_mask[1].sum()) - 1
    kto = encode_examples(tokenizer, [("Be brief.", "The capital of", False, True), ("Hi", "Paris.", True)], 64)
    assert int(kto.input_ids[0][kto.loss_mask[0]][-1]) != eos and int(kto.input_ids[1][kto.loss_mask[1]][-1]) == eos
