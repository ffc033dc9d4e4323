"""Training, seen from the API process: the parts that change the weights vLLM serves, one job each.

- runs.py — `Trainer`: one run at a time (batch → worker `Train` → apply → version), holding the parts below;
  `TrainRequest` is what POST /api/train and the scheduler hand it.
- weights.py — `LiveWeights`: where a weight is written: the lock and pause → write → reset → resume, and the held
  state after a torn write.
- versions.py — `VersionRecords`: the one owner of the version rows; what a reload from disk lost.
- checkpoints.py — `Checkpoints`: write, prune and restore HF folders; `Flusher` makes kept versions durable.
- recovery.py — `Recovery`: a torn apply, a vLLM (re)start, a worker (re)start.
- worker.py — `WorkerControl`: the training subprocess over ZMQ (spawn, call, watchdog, restart).
The worker process itself (the model on vLLM's memory, the optimizer) is loop/worker/.
"""

from loop.training.runs import ExampleIn, PairIn, RunHandle, Trainer, TrainRequest
from loop.training.worker import (
           WorkerControl,
           WorkerError,
           WorkerFailed,
           WorkerTimeout,
           WorkerUnavailable,
)

__all__ = ["ExampleIn", "PairIn", "RunHandle", "TrainRequest", "Trainer", "WorkerControl", "WorkerError",
           "WorkerFailed", "WorkerTimeout", "WorkerUnavailable"]
