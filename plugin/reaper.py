"""Remove a vLLM worker's shared-memory weight files and handle file once that worker process is gone.

Why a separate process: vLLM's API server ends its workers with signals (SIGTERM to the process group, SIGKILL after
a grace period), so atexit hooks in the worker do not reliably run, and the /dev/shm files holding the weights
(hundreds of MB to GB) would outlive the server. plugin/export.py starts one reaper per export in its own session
that detaches itself (double fork, own session: neither vLLM's process-tree kill nor a signal to its process group
reaches it); it waits on a pidfd of the worker, then unlinks.

    python -m plugin.reaper PID < spec.json      # spec: {"shm": [names], "handle_file": path, "load_id": id}

Only stdlib, no torch: it starts fast and holds next to no memory.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time


def wait_for_exit(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd (old kernel): poll
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


def remove(spec: dict) -> None:
    for name in spec.get("shm", []):
        try:
            os.unlink("/dev/shm/" + str(name).lstrip("/"))
        except OSError:
            pass
    handle_file = spec.get("handle_file")
    if handle_file:
        try:
            with open(handle_file, "rb") as f:
                same_load = json.load(f).get("load_id") == spec.get("load_id")
            if same_load:  # a newer load replaced it: leave that one alone
                os.unlink(handle_file)
        except (OSError, ValueError):
            pass


def main(argv: list[str]) -> int:
    pid = int(argv[0])
    spec = json.loads(sys.stdin.read())
    sys.stdin.close()
    # Detach: vLLM kills its workers' whole process tree (psutil children, recursive) at shutdown, so the reaper
    # must not stay a descendant of the worker. Fork; the parent exits at once (the exporter waits for it) and
    # the orphaned child is re-parented to init, in a session of its own.
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    wait_for_exit(pid)
    remove(spec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
