"""The training worker's configuration: one typed value, built from Settings in one place and decoded by the worker.

`worker_command(settings, endpoint)` is the worker's whole command line: `python -m loop.worker.main <json>`, the
JSON being a `WorkerConfig`. The worker (loop/worker/main.py) decodes it with msgspec and has no defaults of its
own, so a setting cannot drift between the API and the worker. Nothing secret is in it (argv is visible to every
local user; loop/config.py SECRET_FIELDS are never passed on). Imports no pydantic: the worker stays small.
Tests: tests/unit/config/test_settings_sources.py (round trip; defaults equal Settings').
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import msgspec

from loop.choices import LogLevel, Optimizer

if TYPE_CHECKING:
    from loop.config import Settings


# The worker's exit code when the model vLLM serves cannot be trained in place (a weight that is not a view of
# vLLM's memory, or no layout at all): restarting would refuse again, so the API side does not, and `loop serve`
# stops with the reason. The worker's last log line is `REFUSED_PREFIX` + the reason.
EXIT_REFUSED = 78  # sysexits EX_CONFIG
REFUSED_PREFIX = "loop cannot train this model in place: "
# The one secret the worker gets, in its environment (never argv): the token of the `loop replica` agents it writes.
REPLICA_TOKEN_ENV = "LOOP_WORKER_REPLICA_TOKEN"


class WorkerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    endpoint: str  # the API's ROUTER socket, ipc://<runtime_dir>/worker.sock
    runtime_dir: str  # where vLLM's loop plugin writes weights-tp<rank>.json
    heartbeat_s: float  # Settings.worker_heartbeat_s
    optimizer: Optimizer
    learning_rate: float  # of a Train request that sets none (the Trainer always sets it)
    max_update_ratio: float  # of an Apply request that sets none
    log_level: LogLevel
    screen_budget_bytes: int  # most bytes of w_live - w_base a Screen keeps on the weights' device (screen.py)
    vllm_address: str  # Settings.vllm_address: where the pacer reads vLLM's load (/metrics)
    train_share: float | None  # Settings.train_share: the trainer's share while vLLM has work (None: by device)
    mirrors: list[str]  # run dirs of replicas 1..K-1: every write to replica 0's weights is copied into them
    remotes: list[str]  # `loop replica` agents' URLs, replicas K.. (their token: LOOP_WORKER_REPLICA_TOKEN, env)
    remote_min_mb_s: float  # Settings.remote_min_mb_s: what bounds a remote replica's transfer and commit
    cpu_nice: int  # Settings.cpu_nice: this process's niceness beside a CPU-only vLLM (0: left alone)

    @classmethod
    def from_settings(cls, settings: Settings, endpoint: str) -> WorkerConfig:
        return cls(endpoint=endpoint, runtime_dir=str(settings.runtime_dir), heartbeat_s=settings.worker_heartbeat_s,
                   optimizer=settings.optimizer, learning_rate=settings.learning_rate,
                   max_update_ratio=settings.max_update_ratio, log_level=settings.log_level,
                   screen_budget_bytes=settings.screen_budget_bytes, vllm_address=settings.vllm_address,
                   train_share=settings.train_share,
                   mirrors=[str(settings.replica_dir(k)) for k in range(1, settings.replicas)],
                   remotes=list(settings.remote_replicas), remote_min_mb_s=settings.remote_min_mb_s,
                   cpu_nice=settings.cpu_nice)

    def encode(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def decode(cls, text: str | bytes) -> WorkerConfig:
        """The config, or ValueError naming the field that is missing or wrong."""
        try:
            return msgspec.json.decode(text, type=cls)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
            raise ValueError(f"invalid worker config: {exc}") from None


def worker_command(settings: Settings, endpoint: str) -> list[str]:
    """The worker's command line: everything it needs from the settings, nothing secret."""
    return [sys.executable, "-m", "loop.worker.main", WorkerConfig.from_settings(settings, endpoint).encode()]
