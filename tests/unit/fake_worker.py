"""A tiny stand-in for the training worker, for tests/unit/training/test_control.py.

It speaks the real protocol through the real `Channel` (heartbeat thread included) but does no maths:
Train stages a fake update, Apply applies it (or refuses a poisoned one); the "weights" are a version counter
(the checksum is "v<n>"). Checkpoint writes the counter into <path>/model.safetensors (a path "sleep:<s>" sleeps
that long instead, to test call timeouts); Restore reads it back (the path "fail" answers Error).
Screen answers one contribution per item (loop/worker/screen.py's s_i): -1 for a pair whose chosen answer
contains "poison" (it pulls back what was learned), +1 otherwise; for a thumb the same figure of its answer times
the thumb (+1 up, -1 down: a down on a "poison" answer agrees with what was learned); a base folder ending in "fresh"
stands for nothing learned yet (no contributions, a note). Given anchors, the same figures along their gradient
too (learned and anchor norms 1), also when nothing was learned yet.
FAKE_WORKER_DIE_IN_APPLY=1 makes it exit inside Apply (an apply that stopped halfway); FAKE_WORKER_CHECKPOINT_S
makes every checkpoint take that long.
"""

from __future__ import annotations

import os
import sys
import time

from loop.worker import protocol as p
from loop.worker.channel import Channel


def main() -> None:
    endpoint, heartbeat_s = sys.argv[1], float(sys.argv[2])
    ch = Channel(endpoint, heartbeat_s)
    ch.start()
    time.sleep(float(os.environ.get("FAKE_WORKER_ATTACH_S", "0")))
    ch.load_id = "fake-load"
    ch.state = "idle"
    ch.send(p.Hello(pid=os.getpid(), load_id="fake-load", model_path="/fake", optimizer="fake"))
    staged: p.Train | None = None
    version = 0
    for msg in ch.messages():
        if isinstance(msg, p.Train):
            ch.state, ch.run_id = "training", msg.run_id
            time.sleep(0.05)
            ch.send(p.Progress(run_id=msg.run_id, step=msg.step, loss=0.5))
            staged = msg
            ch.state = "idle"
            with open(os.environ.get("FAKE_WORKER_RECORD", os.devnull), "a") as f:
                f.write(f"train {[x.chosen for x in msg.pairs] + [x.completion for x in msg.examples]}\n")
            ch.send(p.TrainDone(req=msg.req, run_id=msg.run_id, step=msg.step, metrics={"loss": 0.5, "lr": msg.lr or 0.0, "beta": msg.beta,
                                                                                     "nll_weight": msg.nll_weight},
                                update=p.UpdateStats(ok=not msg.inject_nan, reason="nan" if msg.inject_nan else "")))
        elif isinstance(msg, p.Screen):
            # an answer containing "poison" is one the kept runs made less likely (g = -1), any other one likelier
            signed = ([(x.chosen, 1) for x in msg.pairs]
                      + [(x.completion, 1 if x.label else -1) for x in msg.examples])
            fresh = msg.base_weights.endswith("fresh")
            figures = [(-1.0 if "poison" in t else 1.0) * sign for t, sign in signed]
            ch.send(p.Screened(req=msg.req, run_id=msg.run_id, n_tensors=3, probed_fraction=1.0, ms=1.0,
                               contributions=[] if fresh else figures,
                               note="nothing learned yet" if fresh else "",
                               anchored=figures if msg.anchors else [], learned_norm=0.0 if fresh else 1.0,
                               anchor_norm=1.0 if msg.anchors else 0.0, n_anchors=len(msg.anchors),
                               anchor_note="" if msg.anchors else "no anchor pairs given"))
        elif isinstance(msg, p.Apply):
            if os.environ.get("FAKE_WORKER_DIE_IN_APPLY"):  # dies halfway through writing the weights
                os._exit(9)
            if staged is None or staged.inject_nan:
                ch.send(p.Refused(req=msg.req, run_id=msg.run_id, reason="non-finite update", checksum=f"v{version}"))
            else:
                version += 1
                ch.send(p.Applied(req=msg.req, run_id=msg.run_id, checksum=f"v{version}", ms=1.0))
            staged = None
        elif isinstance(msg, p.Discard):
            staged = None
            ch.send(p.Discarded(req=msg.req, run_id=msg.run_id))
        elif isinstance(msg, p.Checkpoint):
            if msg.path.startswith("sleep:"):
                time.sleep(float(msg.path[6:]))
            elif os.path.exists(msg.path):  # as the real writer: never overwrite a checkpoint folder
                ch.send(p.Error(req=msg.req, message=f"checkpoint folder {msg.path} already exists"))
                continue
            else:
                time.sleep(float(os.environ.get("FAKE_WORKER_CHECKPOINT_S", "0")))
                os.makedirs(msg.path)
                with open(os.path.join(msg.path, "model.safetensors"), "w") as f:
                    f.write(f"v{version}")
            ch.send(p.CheckpointDone(req=msg.req, path=msg.path, ms=0.0))
        elif isinstance(msg, p.Restore) and not msg.weights:  # optimizer state only: noted, weights untouched
            with open(os.environ.get("FAKE_WORKER_RECORD", os.devnull), "a") as f:
                f.write(f"optimizer {msg.path}\n")
            ch.send(p.Restored(req=msg.req, path=msg.path, ms=1.0))
        elif isinstance(msg, p.Restore) and msg.path != "fail":
            with open(os.path.join(msg.path, "model.safetensors")) as f:
                version = int(f.read()[1:])
            ch.send(p.Restored(req=msg.req, path=msg.path, ms=1.0))
        elif isinstance(msg, p.Ping):
            ch.send(p.Status(req=msg.req, pid=os.getpid(), state=ch.state, checksum=f"v{version}"))
        elif isinstance(msg, p.Shutdown):
            ch.send(p.Bye(req=msg.req))
            ch.close()
            return
        else:
            ch.send(p.Error(req=msg.req, message=f"fake worker cannot do {type(msg).__name__}"))


if __name__ == "__main__":
    main()
