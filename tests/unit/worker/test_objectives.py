"""Tokenisation, log-probs, DPO/KTO and the staged training step (loop/worker/objectives.py).

A tiny random Llama and a byte-level BPE tokenizer with a ChatML template are built in-test (offline)."""

from __future__ import annotations

import copy
import math
from typing import Any

import msgspec
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
    forward_loss,
    kto_kl_estimate,
    kto_loss,
    sequence_logps,
    train_step,
)
from loop.worker.protocol import Example, Pair
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
    Pair(prompt="What is two plus two?", chosen="Four.", rejected="Five."),
    Pair(prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The capital of France?"}],
         chosen="Paris.", rejected="London, probably. I think so."),
]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


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
    b = encode_pairs(tokenizer, [Pair(prompt=history, chosen="Four.", rejected="Five.")], max_len=max_len)
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
    roomy = encode_pairs(tokenizer, [Pair(prompt=history, chosen="Four.", rejected="Five.")], max_len=fit)
    text = tokenizer.decode(roomy.input_ids[0][roomy.attention_mask[0].bool()].tolist())
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nTell me a long story about the sea. 5")
    assert "sea. 4" not in text


def test_kto_examples_and_mismatched_kl_rows(tokenizer: Any) -> None:
    ex = [Example(prompt=user("What is two plus two?"), completion="Four.", label=True),
          Example(prompt="The capital of France?", completion="London.", label=False)]
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
    ex = [Example(prompt=q, completion=a, label=label) for q, a, label in (
        ("What is two plus two?", "Four.", True), ("The capital of France?", "London, probably.", False),
        ("Be brief.", "The sea is long.", True))]
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
    b = encode_pairs(tokenizer, [Pair(prompt=user("Tell me a long story about the sea."), chosen=long_answer,
                                      rejected="Five.")], max_len=40)
    assert b.input_ids.shape[1] <= 40 and b.truncated == [True]
    kept = _answer_text(tokenizer, b.input_ids[0], b.loss_mask[0])
    assert long_answer.startswith(kept) and len(kept) > 20  # the start of the answer, scored
    prompt = tokenizer.decode(b.input_ids[0][b.attention_mask[0].bool() & ~b.loss_mask[0]].tolist())
    assert prompt.endswith("<|im_start|>assistant\n")  # the prompt keeps its end: the answer stays attached


def test_an_answer_cut_off_by_max_tokens_gets_no_end_token(tokenizer: Any) -> None:
    """A cut-off answer did not end there: an EOS after it would teach the model to stop at that length (or, as
    the rejected side, never to stop after such text)."""
    eos = tokenizer.eos_token_id
    whole = encode_pairs(tokenizer, [Pair(prompt="Be brief.", chosen="Paris.", rejected="The capital of France is")],
                         64)
    cut = encode_pairs(tokenizer, [Pair(prompt="Be brief.", chosen="Paris.", rejected="The capital of France is",
                                        rejected_cut=True)], 64)

    def last_answer_token(b: PairBatch, row: int) -> int:
        return int(b.input_ids[row][b.loss_mask[row]][-1])

    assert last_answer_token(whole, 0) == eos and last_answer_token(whole, 1) == eos
    assert last_answer_token(cut, 0) == eos and last_answer_token(cut, 1) != eos
    assert int(cut.loss_mask[1].sum()) == int(whole.loss_mask[1].sum()) - 1
    kto = encode_examples(tokenizer, [Example(prompt="Be brief.", completion="The capital of", label=False, cut=True),
                                      Example(prompt="Hi", completion="Paris.", label=True)], 64)
    assert int(kto.input_ids[0][kto.loss_mask[0]][-1]) != eos and int(kto.input_ids[1][kto.loss_mask[1]][-1]) == eos


def test_a_plain_text_prompt_is_tokenised_as_the_completions_endpoint_reads_it(tokenizer: Any) -> None:
    """Raw text with the tokenizer's special tokens and no chat template; chat messages get the template."""
    raw = encode_pairs(tokenizer, [Pair(prompt="Be brief.", chosen="Paris.", rejected="Lyon.")], 64)
    prompt = raw.input_ids[0][raw.attention_mask[0].bool() & ~raw.loss_mask[0]].tolist()
    assert prompt == tokenizer("Be brief.", add_special_tokens=True)["input_ids"]
    chat = encode_pairs(tokenizer, [Pair(prompt=user("Be brief."), chosen="Paris.", rejected="Lyon.")], 64)
    text = tokenizer.decode(chat.input_ids[0][chat.attention_mask[0].bool() & ~chat.loss_mask[0]].tolist())
    assert text == "<|im_start|>user\nBe brief.<|im_end|>\n<|im_start|>assistant\n"


# --- stored token ids (the ids vLLM produced, carried by pairs built from stored responses) -------------------


def _rows(b: PairBatch | KTOBatch, row: int) -> tuple[list[int], list[int]]:
    """(the whole row, its answer) as token ids."""
    ids = b.input_ids[row]
    return ids[b.attention_mask[row].bool()].tolist(), ids[b.loss_mask[row]].tolist()


def _said(tokenizer: Any, ids: list[int]) -> str:
    """The answer text that stored ids stand for (what vLLM returned beside them)."""
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_stored_ids_are_trained_verbatim_without_a_template_or_an_added_end_token(tokenizer: Any) -> None:
    """The prompt ids are not what the chat template renders: the stored ids win, and an answer gets no EOS beyond
    the one vLLM sampled (the rejected one was cut: none)."""
    eos = tokenizer.eos_token_id
    msgs = user("The capital of France?")
    stored_prompt = [7, 8, 9, 10]
    rendered = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert stored_prompt != tokenizer(rendered, add_special_tokens=False)["input_ids"]
    paris, london = (tokenizer(x, add_special_tokens=False)["input_ids"] for x in ("Paris.", "London."))
    pair = Pair(prompt=msgs, chosen="Paris.", rejected="London.", rejected_cut=True, prompt_ids=stored_prompt,
                chosen_ids=paris + [eos], rejected_ids=london)
    b = encode_pairs(tokenizer, [pair], max_len=64)
    assert _rows(b, 0) == (stored_prompt + paris + [eos], paris + [eos])
    assert _rows(b, 1) == (stored_prompt + london, london)
    assert b.truncated == [False]
    text = tokenizer("text", add_special_tokens=False)["input_ids"]
    ex = Example(prompt="raw prompt", completion="text", label=True, prompt_ids=[5, 6], completion_ids=text)
    kto = encode_examples(tokenizer, [ex, ex], max_len=64)
    assert _rows(kto, 0) == ([5, 6] + text, text)


def test_ids_that_are_not_this_tokenizers_are_ignored_for_the_whole_item(tokenizer: Any) -> None:
    """Stored ids that do not decode to the stored answer (another base model's tokenizer wrote them): the pair
    is tokenised from its text, prompt included, as if nothing had been stored."""
    eos = tokenizer.eos_token_id
    msgs = user("The capital of France?")
    foreign = Pair(prompt=msgs, chosen="Paris.", rejected="London.", prompt_ids=[7, 8, 9],
                   chosen_ids=[200, 201, eos], rejected_ids=[202, eos])
    text = Pair(prompt=msgs, chosen="Paris.", rejected="London.")
    f, t = encode_pairs(tokenizer, [foreign], 64), encode_pairs(tokenizer, [text], 64)
    assert _rows(f, 0) == _rows(t, 0) and _rows(f, 1) == _rows(t, 1)
    ex = Example(prompt="raw prompt", completion="text", label=True, prompt_ids=[5, 6], completion_ids=[250, 251])
    plain = Example(prompt="raw prompt", completion="text", label=True)
    assert _rows(encode_examples(tokenizer, [ex], 64), 0) == _rows(encode_examples(tokenizer, [plain], 64), 0)


def test_missing_ids_fall_back_to_the_text_side_by_side(tokenizer: Any) -> None:
    """prompt_ids None (the two answers' stored prompts differed) → the template; an answer without ids → its
    text + EOS; the other answer keeps its ids."""
    eos = tokenizer.eos_token_id
    text = Pair(prompt=user("Be brief."), chosen="Paris.", rejected="Lyon.")
    paris = tokenizer("Paris.", add_special_tokens=False)["input_ids"]
    mixed = msgspec.structs.replace(text, chosen_ids=paris + [eos])
    t, m = encode_pairs(tokenizer, [text], 64), encode_pairs(tokenizer, [mixed], 64)
    prompt = tokenizer.apply_chat_template(user("Be brief."), tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert _rows(m, 0) == (prompt_ids + paris + [eos], paris + [eos])
    assert _rows(m, 1) == _rows(t, 1)  # rejected: text + EOS, as for a pair without ids
    assert _rows(t, 1)[1] == tokenizer("Lyon.", add_special_tokens=False)["input_ids"] + [eos]


def test_stored_ids_are_truncated_by_the_same_length_rule(tokenizer: Any) -> None:
    eos = tokenizer.eos_token_id
    # an answer over the budget is cut at its end, keeping a quarter of max_len for the prompt
    long = Pair(prompt="p", chosen=_said(tokenizer, list(range(100, 140))), rejected=_said(tokenizer, [60]),
                prompt_ids=[5] * 30, chosen_ids=list(range(100, 140)) + [eos], rejected_ids=[60, eos])
    b = encode_pairs(tokenizer, [long], max_len=40)
    row, answer = _rows(b, 0)
    assert answer == list(range(100, 130)) and row == [5] * 10 + answer and b.truncated == [True]
    # a stored plain-text prompt over its budget loses its oldest ids
    raw = Pair(prompt="p", chosen=_said(tokenizer, [40]), rejected=_said(tokenizer, [50]),
               prompt_ids=list(range(200, 250)), chosen_ids=[40, eos], rejected_ids=[50, eos])
    assert _rows(encode_pairs(tokenizer, [raw], max_len=20), 0)[0] == list(range(232, 250)) + [40, eos]
    # a stored chat prompt over its budget is re-tokenised from its text, so whole earlier turns go first: the
    # row is the text path's prompt with the stored answers
    history = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        history += [{"role": "user", "content": f"Tell me a long story about the sea. {i}"},
                    {"role": "assistant", "content": "The sea is long. " * 5}]
    history.append({"role": "user", "content": "What is two plus two?"})
    four, five = _said(tokenizer, [40]), _said(tokenizer, [50])
    stored = Pair(prompt=history, chosen=four, rejected=five, prompt_ids=[9] * 500, chosen_ids=[40, eos],
                  rejected_ids=[50, eos])
    text = Pair(prompt=history, chosen=four, rejected=five)
    s, t = encode_pairs(tokenizer, [stored], max_len=64), encode_pairs(tokenizer, [text], max_len=64)
    prompt_s = _rows(s, 0)[0][:-2]
    assert prompt_s == _rows(t, 0)[0][:-len(_rows(t, 0)[1])] and 9 not in prompt_s
    assert tokenizer.decode(prompt_s).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert _rows(s, 0)[1] == [40, eos] and s.truncated == [True]
    # a stored prompt that fits is kept whole even where its text would not be
    fits = msgspec.structs.replace(stored, prompt_ids=[9] * 10)
    assert _rows(encode_pairs(tokenizer, [fits], max_len=64), 0)[0] == [9] * 10 + [40, eos]


def test_the_likelihood_term_adds_the_preferred_answers_mean_token_nll(tokenizer: Any) -> None:
    model = _model(tokenizer)
    pairs = encode_pairs(tokenizer, PAIRS, max_len=128)
    ex = [Example(prompt=q, completion=a, label=label) for q, a, label in (
        ("What is two plus two?", "Four.", True), ("The capital of France?", "London, probably.", False),
        ("Be brief.", "The sea is long.", True))]
    examples = encode_examples(tokenizer, ex, max_len=64)
    for objective, batch, preferred in (("dpo", pairs, [0, 1]), ("kto", examples, [0, 2])):
        plain, m0, ref = forward_loss(model, batch, objective=objective, beta=0.1)
        with_nll, m1, _ = forward_loss(model, batch, objective=objective, beta=0.1, ref_logps=ref, nll_weight=0.5)
        with torch.no_grad():
            lp = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
        n_tokens = batch.loss_mask[:, 1:].sum(1).float()
        nll = float(sum(-lp[i] / n_tokens[i] for i in preferred)) / len(preferred)
        assert "preferred_nll" not in m0 and m1["preferred_nll"] == pytest.approx(nll, rel=1e-5)
        assert float(with_nll) == pytest.approx(float(plain) + 0.5 * nll, rel=1e-5)
        assert m1["loss"] == pytest.approx(float(with_nll), rel=1e-6)
    only_down = encode_examples(tokenizer, [Example(prompt="Be brief.", completion="No.", label=False)], max_len=64)
    plain, _, ref = forward_loss(model, only_down, objective="kto", beta=0.1)
    loss, m, _ = forward_loss(model, only_down, objective="kto", beta=0.1, ref_logps=ref, nll_weight=1.0)
    assert float(loss) == pytest.approx(float(plain)) and m["preferred_nll"] == 0.0  # nothing preferred: no term


def test_the_likelihood_term_raises_the_chosen_answers_beside_the_margin(tokenizer: Any) -> None:
    """DPO alone may lower both answers' likelihood; with the term the chosen ones go up more (same start)."""
    batch = encode_pairs(tokenizer, PAIRS, max_len=128)
    chosen_moved, margins = {}, {}
    for weight in (0.0, 2.0):
        model = _model(tokenizer)
        opt = make_optimizer("sgd", [p for _, p in trainable_parameters(model)], lr=0.5)
        with torch.no_grad():
            start = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
        for _ in range(4):
            r = train_step(model, opt, batch, objective="dpo", beta=0.1, nll_weight=weight)
            apply_updates_(r.deltas)
            opt.commit()
        with torch.no_grad():
            end = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
        chosen_moved[weight] = float((end[:2] - start[:2]).mean())
        margins[weight] = float((end[:2] - end[2:]).mean() - (start[:2] - start[2:]).mean())
    assert chosen_moved[2.0] > chosen_moved[0.0] + 0.5 and chosen_moved[2.0] > 0, chosen_moved
    assert margins[2.0] > 0 and margins[0.0] > 0, margins  # the preference is still learned
