"""The extra memory of one training step, per rank: what the worker held at the step's peak beyond what it held
when the step began (the issue's P2, measured in every run rather than only by `loop bench memory`).

On CUDA it is exact for this process: torch's allocator peak on the rank's device (`max_memory_allocated` after
`reset_peak_memory_stats`) minus what was allocated at the start. vLLM's weights are mapped over CUDA IPC and are
not in this allocator, so they never count; the staged new values the step leaves for the apply do.
On the CPU it is the process's resident-set high-water mark (`VmHWM`, reset through /proc/self/clear_refs) minus
its resident set at the start, after glibc gave back the memory it kept from earlier steps (`malloc_trim`: without
it a step reusing the last step's freed memory reads as needing none). Indicative only: pages of vLLM's
shared-memory weights that the step touches for the first time count too (they are resident once, after the
first step). Where /proc cannot be read or reset, the figure is None. The trim costs the step a few per cent (the
memory it hands back is faulted in again), so the worker measures only a run's first step on the CPU.
Tests: tests/unit/worker/test_memwatch.py; per rank through tests/e2e/test_tensor_parallel_e2e.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
from pathlib import Path
from typing import Any, Self

PROC = Path("/proc/self")


def _status_bytes(field: str) -> int | None:
    try:
        found = re.search(rf"^{field}:\s+(\d+) kB", (PROC / "status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def _trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_high_water_mark() -> bool:
    _trim()
    try:
        (PROC / "clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
    except OSError:
        return False
    return True


class StepMemory:
    """`m = StepMemory(device).start()`, the step, then `m.stop()`: the extra bytes (None where they cannot be
    measured)."""

    def __init__(self, device: Any) -> None:
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.base: int | None = None

    def start(self) -> Self:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif _reset_high_water_mark():
            self.base = _status_bytes("VmRSS")
        return self

    def stop(self) -> int | None:
        import torch

        if self.base is None:
            return None
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else _status_bytes("VmHWM")
        return max(0, peak - self.base) if peak is not None else None


def figures(extra: list[int | None], weight_bytes: list[int]) -> dict[str, float]:
    """Run metrics from every rank's extra bytes and the weight bytes it trains (rank order): the largest rank's
    MB and its multiple of that rank's weights, and with several ranks each rank's MB too."""
    known = [(e, w) for e, w in zip(extra, weight_bytes) if e is not None]
    if not known:
        return {}
    worst = max(known, key=lambda ew: ew[0])
    out = {"mem_extra_mb": worst[0] / 1e6, "mem_extra_x": worst[0] / worst[1] if worst[1] else 0.0}
    if len(extra) > 1:
        out.update({f"mem_extra_mb_rank{r}": e / 1e6 for r, e in enumerate(extra) if e is not None})
    return out
