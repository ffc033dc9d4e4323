"""The per-step extra memory the worker reports (loop/worker/memwatch.py): on the CPU the resident set's
high-water mark, reset at each step's start, so a step sees its own peak and not an earlier one's.

Run: .venv/bin/python -m pytest -q tests/unit/worker/test_memwatch.py
"""

from __future__ import annotations

import pytest
import torch

from loop.worker import memwatch
from loop.worker.memwatch import StepMemory, figures

MB = 1_000_000


def test_a_step_sees_its_own_peak_on_the_cpu() -> None:
    big = StepMemory("cpu").start()
    block = torch.ones(200 * MB, dtype=torch.uint8)  # touched: resident
    del block
    extra = big.stop()
    assert extra is not None and extra >= 190 * MB, extra
    small = StepMemory("cpu").start()  # the earlier peak is forgotten
    torch.ones(MB, dtype=torch.uint8)
    extra = small.stop()
    assert extra is not None and extra < 100 * MB, extra


def test_memory_kept_by_the_allocator_from_an_earlier_step_is_not_hidden() -> None:
    # many small blocks (below glibc's mmap threshold): freed, glibc keeps them; the next step reuses them
    blocks = [torch.ones(16_000, dtype=torch.uint8) for _ in range(6_000)]
    del blocks
    m = StepMemory("cpu").start()
    blocks = [torch.ones(16_000, dtype=torch.uint8) for _ in range(6_000)]
    extra = m.stop()
    del blocks
    assert extra is not None and extra >= 60 * MB, extra


def test_without_proc_the_cpu_figure_is_none(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.setattr(memwatch, "PROC", tmp_path / "missing")
    assert StepMemory("cpu").start().stop() is None


def test_figures_name_the_worst_rank_and_each_rank() -> None:
    assert figures([None], [100]) == {}
    assert figures([50 * MB], [100 * MB]) == {"mem_extra_mb": 50.0, "mem_extra_x": 0.5}
    two = figures([30 * MB, 80 * MB], [100 * MB, 100 * MB])
    assert two == {"mem_extra_mb": 80.0, "mem_extra_x": 0.8, "mem_extra_mb_rank0": 30.0, "mem_extra_mb_rank1": 80.0}
    assert figures([None, 10 * MB], [1, 20 * MB]) == {"mem_extra_mb": 10.0, "mem_extra_x": 0.5,
                                                       "mem_extra_mb_rank1": 10.0}
