"""Keep-mode writes must not starve the answers they preempt: the next one waits until serving has recovered.

Why: a keep-mode write (`pause_mode=keep`) freezes the answers in flight and, after the write, preempts them
(`reset_running_requests`): vLLM recomputes each one's keys and values from its tokens on the new weights. That
costs a prefill of every context in flight, which grows with the answers' length. Writes back to back can then come
faster than serving recovers: every write preempts answers that have not decoded since the last one, and serving
stalls (measured: 0.02x serving with 2,048-token answers on an H200 and an unpaced trainer; on the CPU, where the
trainer is never paced in time, decoding fell to a few tokens a second with 1,024-token answers; see the
measurements document).

How: `RecomputeGuard` times each recovery from vLLM's own counters (`vllm:generation_tokens_total`,
`vllm:num_requests_running` in its Prometheus `/metrics`): the answers preempted by a write have recovered once
vLLM has generated as many tokens as there were answers running at the write (each has decoded again). The next
keep-mode write of a run then waits until the recompute is at most `share` of the time since the write:
`recovered + recompute * (1 - share) / share`. The tokens are counted from a reading right after the write's
resume (the answers are preempted by then), while the answers running come from a reading just before its pause
(inside it would lengthen every pause). With nothing running at a write there is nothing to recompute and
no wait; with short answers in flight the recompute, and so the wait, is short. Only training runs wait: a
rollback, a restore or a repair is never delayed.

The arithmetic is `RecomputeGuard` (clock-driven, no I/O: the service and `loop bench serving` use the same);
`read_counters` parses vLLM's metrics text.

Tests: tests/unit/training/test_recompute.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GENERATED = "vllm:generation_tokens_total"
RUNNING = "vllm:num_requests_running"


@dataclass
class Counters:
    running: float  # answers being generated now
    generated: float  # tokens generated since vLLM started (a counter)


def read_counters(text: str) -> Counters:
    """Running answers and generated tokens from vLLM's Prometheus text (summed over engines and models);
    ValueError when either is missing (not vLLM's /metrics, or its stats logging is off)."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith((GENERATED, RUNNING)):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in (GENERATED, RUNNING):  # not e.g. vllm:generation_tokens_created
            found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    if GENERATED not in found or RUNNING not in found:
        raise ValueError(f"no {GENERATED} or {RUNNING} in vLLM's metrics (is its stats logging off?)")
    return Counters(running=found[RUNNING], generated=found[GENERATED])


class RecomputeGuard:
    """When the next keep-mode write may start. Call `wrote(now, before)` right after a write, with the counters
    read just before its pause; feed `observe(now, counters)` until `recovering` is False; ask `wait_s(now)`
    before the next write."""

    def __init__(self, share: float, *, give_up_s: float = 120.0) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], not {share}")
        self.share = share
        self.give_up_s = give_up_s  # a recovery not seen in this long stops holding writes back
        self.next_at = -math.inf
        self.recovering = False
        self.last_recompute_s: float | None = None
        self.last_wait_s = 0.0
        self._wrote_at = 0.0
        self._running = 0.0
        self._generated = 0.0

    def wrote(self, now: float, before: Counters | None) -> None:
        """A keep-mode write ended at `now`; `before`: vLLM's counters just before its pause (None: unknown)."""
        if before is None or before.running <= 0 or self.share >= 1:
            self.recovering = False  # nothing preempted (or no guard): the next write may follow at once
            self.next_at = -math.inf
            return
        self.recovering = True
        self._wrote_at, self._running, self._generated = now, before.running, before.generated
        self.next_at = math.inf  # until the recovery is seen

    def resumed(self, counters: Counters) -> None:
        """The first reading after the write's resume. The counters before the pause were read while vLLM still
        decoded: the tokens it made between that read and the freeze are not the preempted answers decoding
        again, and counting them read a recovery at once (every write, on the CPU under load)."""
        if self.recovering and counters.generated >= self._generated:
            self._generated = counters.generated

    def observe(self, now: float, counters: Counters) -> None:
        if not self.recovering:
            return
        if counters.generated < self._generated:  # vLLM restarted: its counters began again
            self._recovered(now, now - self._wrote_at)
        elif counters.generated - self._generated >= self._running:
            self._recovered(now, now - self._wrote_at)
        else:
            self.wait_s(now)

    def _recovered(self, now: float, recompute_s: float) -> None:
        self.recovering = False
        self.last_recompute_s = recompute_s
        self.next_at = now + recompute_s * (1 - self.share) / self.share

    def wait_s(self, now: float) -> float:
        """Seconds until the next keep-mode write may start (0: now; inf: still recovering, for at most
        `give_up_s` after the write: a recovery never seen, e.g. vLLM's metrics unreadable, stops holding back)."""
        if self.recovering and now - self._wrote_at >= self.give_up_s:
            self._recovered(now, 0.0)
        return max(0.0, self.next_at - now)
