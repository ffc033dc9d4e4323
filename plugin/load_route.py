"""vLLM's own cross-process weight route, for comparison benchmarks only (`loop bench update`).

A trainer that holds its own copy of the weights shares it (loop's JSON handle file, written with
plugin.export.export_module into a private folder) and asks vLLM, through `POST /collective_rpc`, to run
`loop_load_weights_from(folder)` on every worker: the worker maps the copy and feeds it to the model's own
`load_weights` (which fuses q/k/v and gate/up and pads the vocab as vLLM loads a checkpoint). That is the route
loop's zero-copy apply is measured against: it copies every byte and needs the trainer's second copy.
Parameter names in the handle file use "__" for "." (module attribute names cannot hold dots).
"""

from __future__ import annotations

from typing import Any


def loop_load_weights_from(self: Any, folder: str) -> dict[str, Any]:  # bound as a vLLM Worker method
    import time

    import torch

    from loop.worker.handles import attach, read_handles

    t0 = time.perf_counter()
    tensors = attach(read_handles(folder))
    weights = [(name.replace("__", "."), t) for name, t in tensors.items()]
    model = self.model_runner.get_model()
    model.load_weights(weights)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    nbytes = sum(t.numel() * t.element_size() for _, t in weights)
    return {"tensors": len(weights), "bytes": nbytes, "ms": (time.perf_counter() - t0) * 1e3}


def install(worker_cls: type) -> None:
    if not hasattr(worker_cls, "loop_load_weights_from"):
        worker_cls.loop_load_weights_from = loop_load_weights_from
