"""`loop replica`: serve a replica of loop's model on this host for a `loop serve` on another one.

    LOOP_REPLICA_TOKEN=<the secret loop serve has> loop replica --host 10.0.0.12 --port 8100 --model <same model>
    # and on the training host:
    LOOP_REPLICA_TOKEN=<same> loop serve --remote-replicas http://10.0.0.12:8100

It starts its own vLLM (private Unix socket, loop's plugin, restarted when it crashes), forwards vLLM's routes to
loop behind the token, and takes loop's weight transfers on --replica-transfer-port (torch.distributed: gloo, or
NCCL between CUDA hosts; a private network only, it has no authentication). loop routes chat to it only while its
weights are on loop's version: synced when it starts or restarts, every update staged before loop pauses it and
written inside the pause. Settings as `loop serve` (the model, dtype, KV cache and vLLM flags must match loop's).

Exit codes: 0 stopped, 2 invalid settings or model not found, 3 the API could not start.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from loop.cli.flags import add_model_flags
from loop.cli.serve import EXIT_API_FAILED, settings_from_args
from loop.config import SECRET_FIELDS, Settings


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse has no public type for it
    p = sub.add_parser("replica", help="serve a replica of loop's model for a loop serve on another host",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    settings = p.add_argument_group("settings (loop/config.py; LOOP_REPLICA_TOKEN comes from the environment only)")
    add_model_flags(settings, Settings, skip=SECRET_FIELDS, env_prefix="LOOP_")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.umask(0o077)  # its logs and run dir are private, as loop serve's
    import uvicorn

    from loop.logs import setup_logging
    from loop.model_cache import ModelNotFound, resolve_model
    from loop.replica.agent import create_agent_app

    settings = settings_from_args(args)
    if not settings.replica_token or len(settings.replica_token) < 16:
        print("loop: loop replica needs LOOP_REPLICA_TOKEN (at least 16 characters), the secret its loop serve "
              "has: without it anyone who reaches the port could steer this vLLM", file=sys.stderr)
        return 2
    setup_logging(settings)
    # `kill -USR1 <pid>` prints every thread's stack to its log, as the worker's: a transfer that hangs says where
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    settings.ensure_dirs()
    try:
        path = resolve_model(settings.model, settings.cache_dir, progress=True)
    except ModelNotFound as exc:
        print(f"loop: {exc}", file=sys.stderr)
        return 2
    print(f"loop: replica of {settings.model_name} from {path} on http://{settings.host}:{settings.port}; weight "
          f"transfers on port {settings.replica_transfer_port}; data in {settings.data_dir}", file=sys.stderr,
          flush=True)
    app = create_agent_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                                           access_log=False, timeout_graceful_shutdown=10))
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else EXIT_API_FAILED
