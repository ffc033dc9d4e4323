"""A tiny chat model made offline for the worker's unit tests: a byte-level BPE tokenizer trained on a corpus, with
a ChatML template, and a 2-layer Llama over its vocabulary (random weights, seeded)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loop.worker import protocol as p
from loop.worker.config import WorkerConfig

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(corpus: Sequence[str], vocab_size: int = 300) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(corpus) * 4, trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


def tiny_llama(tokenizer: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **config)
    return LlamaForCausalLM(cfg).to(dtype)


def worker_config(runtime_dir: Path | str, **over: Any) -> WorkerConfig:
    """A worker's config for tests: adamw, no vLLM to read (the address leads nowhere), `over` changes fields."""
    fields: dict[str, Any] = {"endpoint": "ipc://unused", "runtime_dir": str(runtime_dir), "heartbeat_s": 1.0,
                              "optimizer": "adamw", "learning_rate": 1e-3, "max_update_ratio": 0.5,
                              "log_level": "info", "screen_budget_bytes": 1 << 30,
                              "vllm_address": "unix:/nonexistent/vllm.sock", "train_share": 1.0, "mirrors": [],
                              "remotes": [], "remote_min_mb_s": 20.0,
                              "cpu_nice": 0}  # an in-process worker must not renice the test process
    return WorkerConfig(**{**fields, **over})


def on_model(w: Any, model: Any, tokenizer: Any, folder: Path | str, lr: float = 1e-3) -> Any:
    """What attach leaves in a worker, on `model` itself instead of vLLM's views: tokenizer, meta naming `folder`
    as the model path, trainable parameters and an adamw optimizer. Returns `w`."""
    from loop.worker.apollo import make_optimizer, trainable_parameters

    w.model, w.tokenizer = model, tokenizer
    w.meta = {"model_path": str(folder), "load_id": "load-1"}
    w.trainable = trainable_parameters(model)
    w.names = {prm: name for name, prm in w.trainable}
    w.opt = make_optimizer("adamw", [prm for _, prm in w.trainable], lr=lr)
    return w


class FakeChannel:
    """What the worker sends on its channel, kept in a list."""

    def __init__(self) -> None:
        self.state, self.run_id, self.step, self.load_id = "idle", None, 0, "load-1"
        self.sent: list[p.Msg] = []

    def send(self, msg: p.Msg) -> None:
        self.sent.append(msg)
