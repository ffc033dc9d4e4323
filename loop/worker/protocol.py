"""The messages between the API (ZMQ ROUTER, `loop/training/worker.py`) and the training worker (DEALER, `main.py`).

Every message is a msgspec Struct in one tagged union (`Message`), encoded with msgpack: the tag field `"type"`
names the class, so the receiver decodes straight into the right Struct and rejects anything else. Nothing is
ever unpickled from the socket — a peer that sends garbage gets a decode error, not code execution.

Requests from the API carry a `req` number; the worker's reply carries the same `req`, so `WorkerControl.call`
can match replies to waiting callers. Unsolicited worker messages (`Hello`, `Heartbeat`, `Progress`) have `req=0`.

Conversation (docs/design.md, "The update, step by step"):
    API → Screen(run_id, …batch…, base_weights)   worker: each item's pull along w_live - w_base (screen.py)
    API ← Screened(contributions)             one s_i per pair then per example; nothing written
    API → Train(run_id, step, …batch…)       worker: reference log-probs, forward, backward, optimizer maths
    API ← TrainDone(metrics, update stats)    staged deltas wait in the worker; vLLM kept serving meanwhile
    API → Apply(run_id)   (vLLM paused)       worker: finite/ratio check → in-place write (stochastic rounding)
    API ← Applied(checksum, ms) | Refused(reason)
    API → Discard(run_id)                     drop a staged update (the API decided not to apply it)
    API → Checkpoint(path) / Restore(path)    HF folder out of / back into the live weights
    API → Ping → Status;  API → Shutdown → Bye;  any request may be answered by Error(message, traceback)
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class Msg(msgspec.Struct, tag_field="type", kw_only=True, forbid_unknown_fields=True):
    """Base: every message has a request number (0 for unsolicited worker messages)."""

    req: int = 0


# ---------------------------------------------------------------- data carried by Train
# The one shape of a pair and of an example, from loop/pairs.py (which wraps each in an `Item` with the feedback
# ids) through the scheduler and the eval guard to the worker.
# The `*_ids` fields are the token ids vLLM produced for a stored response (pairs.load_prompts fills them): when
# present they are trained and scored as they are (loop/worker/tokens.py); None (inline text pairs, rows stored
# without ids, two answers whose stored prompts differ) means the text is tokenised. Defaults are left off the
# wire, so a text pair encodes as it did before the ids existed.

Prompt = str | list[dict[str, str]]  # chat messages as {role, content} text (pairs.prompt_of), or a raw prompt


class Pair(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One preference: the prompt (plain text or chat messages) and two answers, the first preferred."""

    prompt: Prompt
    chosen: str
    rejected: str
    chosen_cut: bool = False  # cut off by max_tokens: encoded without the end-of-sequence token
    rejected_cut: bool = False
    prompt_ids: list[int] | None = None  # the prompt as vLLM tokenised it (identical for both answers)
    chosen_ids: list[int] | None = None  # the sampled ids, EOS included when the answer stopped by itself
    rejected_ids: list[int] | None = None


class Example(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One unpaired judgement (a thumb): KTO's input."""

    prompt: Prompt
    completion: str
    label: bool
    cut: bool = False
    prompt_ids: list[int] | None = None
    completion_ids: list[int] | None = None


# ---------------------------------------------------------------- worker → API, unsolicited


class Hello(Msg, tag="hello"):
    """Sent once the worker has attached to vLLM's weights and built its model (also after a re-attach)."""

    pid: int
    load_id: str = ""
    model_path: str = ""
    architecture: str = ""
    device: str = "cpu"
    n_params: int = 0
    n_trainable: int = 0
    optimizer: str = ""
    checksum: str = ""
    train_share: float = 1.0  # the pacer's share while vLLM has work (loop/worker/pacing.py), as resolved
    layout: dict[str, int] = {}  # HF weights per treatment, as vLLM's loader placed them (loop/layout.py)
    tensor_parallel: int = 1  # ranks of the worker, one per vLLM rank (loop/worker/tp.py)


class Heartbeat(Msg, tag="heartbeat"):
    """Sent every `worker_heartbeat_s` by the worker's I/O thread, also while a long backward runs."""

    pid: int
    state: str = "idle"  # "waiting" (for vLLM's handle file) | "idle" | "training" | "applying" | ...
    run_id: int | None = None
    step: int = 0
    load_id: str = ""


class Progress(Msg, tag="progress"):
    """One finished optimisation step (for /api/train/status while a run goes on)."""

    run_id: int
    step: int
    loss: float
    metrics: dict[str, float] = {}


# ---------------------------------------------------------------- API → worker requests


class Ping(Msg, tag="ping"):
    checksum: bool = False  # also hash every live weight (slow on big models; tests use it)


class Train(Msg, tag="train"):
    """Compute one staged update on this batch. `step` counts from 1 within a run: the worker keeps the
    reference log-probs of step 1 (the pre-run policy) for the later steps of the same run."""

    run_id: int
    objective: Literal["dpo", "kto"] = "dpo"
    pairs: list[Pair] = []
    examples: list[Example] = []
    step: int = 1
    steps: int = 1
    lr: float | None = None
    beta: float = 0.1
    nll_weight: float = 0.0  # weight of the preferred answers' likelihood term (loop/worker/objectives.py)
    max_len: int = 1024
    inject_nan: bool = False  # debug/test only: poison the staged update (the API allows it with the admin token)
    lowmem: bool = False  # train_mode=lowmem: measure the update now, write it in Apply by a second backward


class Screen(Msg, tag="screen"):
    """Measure, before training on it, how each item of a batch pulls along what the kept runs taught: the
    direction v = w_live - w_base, `base_weights` being the base model folder (loop/worker/screen.py), and along
    the gradient g of the `anchors`' margins (trusted pairs: what the guard judges the run by). Every pair and
    then every example is measured; `objective` names the list Train would use, which must not be empty.
    Reads the weights, writes nothing, leaves a staged update as it was."""

    run_id: int
    base_weights: str  # the base model folder (HF safetensors) whose weights w_base are
    objective: Literal["dpo", "kto"] = "dpo"
    pairs: list[Pair] = []
    examples: list[Example] = []
    max_len: int = 1024  # tokens per row, as Train's
    anchors: list[Pair] = []


class Apply(Msg, tag="apply"):
    run_id: int
    max_update_ratio: float | None = None  # None: the worker's configured cap
    skip: list[int] = []  # replicas left out of the pause (still serving): not written, reported lost, synced later


class Discard(Msg, tag="discard"):
    run_id: int


class Checkpoint(Msg, tag="checkpoint"):
    """Write an HF folder (config, tokenizer, model.safetensors, optimizer state) atomically to `path`."""

    path: str
    version: int = 0
    meta: dict[str, str] = {}


class Restore(Msg, tag="restore"):
    """Copy a checkpoint's weights into the live weights in place (the API has paused vLLM)."""

    path: str
    load_optimizer: bool = True
    weights: bool = True  # False: only the optimizer state, and only into a fresh optimizer (a restarted worker)
    skip: list[int] = []  # as Apply.skip


class Sync(Msg, tag="sync"):
    """Replica `replica` (1..K-1 local, K.. remote) (re)started: attach to its weights (a remote one: through its
    agent) and copy replica 0's live ones into them."""

    replica: int


class Shutdown(Msg, tag="shutdown"):
    pass


# ---------------------------------------------------------------- worker → API replies


class Status(Msg, tag="status"):
    pid: int
    state: str
    load_id: str = ""
    staged_run_id: int | None = None
    checksum: str = ""
    mirrors: list[str] = []  # with `checksum` and replicas: sha256 of replica 0's, then each other replica's weights
    # (local replicas 1..K-1, then the remote ones; "" for one not synced)


class UpdateStats(msgspec.Struct, forbid_unknown_fields=True):
    """What the staged update looks like; `ok=False` means Apply would refuse it (and why)."""

    ok: bool
    reason: str = ""
    update_norm: float = 0.0
    weight_norm: float = 0.0
    ratio: float = 0.0
    n_tensors: int = 0


class TrainDone(Msg, tag="train_done"):
    run_id: int
    step: int
    metrics: dict[str, float] = {}
    history: list[dict[str, float]] = []
    update: UpdateStats = msgspec.field(default_factory=lambda: UpdateStats(ok=False, reason="no update"))
    ms: float = 0.0
    unstaged: list[int] = []  # remote replicas that could not stage the update: out of routing before the pause


class Screened(Msg, tag="screened"):
    """s_i = <grad m_i, w_live - w_base> for each pair (m = log pi(chosen) - log pi(rejected)) and then each example
    (m = +-log pi(completion), + for a thumb up), in the order sent: > 0 the item teaches more of what was learned,
    < 0 it pulls back. Feed them to loop.stats.label_test_p. Empty, with `note` saying why, when nothing could be
    measured (nothing learned yet, no readable base)."""

    run_id: int
    contributions: list[float]
    n_tensors: int  # weights probed
    probed_fraction: float  # share of ||w_live - w_base||^2 that the probed weights carry (screen budget)
    ms: float
    note: str = ""
    anchored: list[float] = []  # the same along the anchors' gradient g (empty: not measured, anchor_note says why)
    learned_norm: float = 0.0  # ||v||, ||g|| over the probed weights
    anchor_norm: float = 0.0
    anchor_note: str = ""
    n_anchors: int = 0


class Applied(Msg, tag="applied"):
    run_id: int
    checksum: str
    ms: float
    checksum_before: str = ""
    lost: list[int] = []  # replicas not on the new weights (a remote one that failed): out of routing before resume
    remote_ms: float | None = None  # of `ms`, the remote replicas' commits (None: there are none)


class Refused(Msg, tag="refused"):
    run_id: int
    reason: str
    checksum: str = ""


class Discarded(Msg, tag="discarded"):
    run_id: int


class CheckpointDone(Msg, tag="checkpoint_done"):
    path: str
    ms: float
    checksum: str = ""
    files: list[str] = []


class Restored(Msg, tag="restored"):
    path: str
    ms: float
    checksum: str = ""
    lost: list[int] = []  # as Applied.lost


class Synced(Msg, tag="synced"):
    replica: int
    load_id: str
    ms: float


class Bye(Msg, tag="bye"):
    pass


class Error(Msg, tag="error"):
    """A request failed in the worker; `traceback` is the worker's formatted traceback text."""

    message: str
    traceback: str = ""


Message = (Hello | Heartbeat | Progress | Ping | Train | Screen | Apply | Discard | Checkpoint | Restore | Sync | Shutdown
           | Status | TrainDone | Screened | Applied | Refused | Discarded | CheckpointDone | Restored | Synced | Bye
           | Error)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(Message)


def encode(msg: Msg) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Msg:
    """Decode one message; raises `msgspec.DecodeError`/`ValidationError` for anything not in `Message`."""
    return _decoder.decode(data)
