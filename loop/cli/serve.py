"""`loop serve`: start vLLM (or attach to one) and the loop API in front of it.

Flags override LOOP_* environment variables, which override defaults (see loop/config.py). The model is resolved
first (the default SmolLM2 is converted once, with progress), then uvicorn runs `create_app(settings)`: the API
listens at once and answers 503 with progress until vLLM is ready.

    loop serve                                  # default model, API on 127.0.0.1:8000, vLLM on a private socket
    loop serve --model Qwen/Qwen2.5-0.5B-Instruct --port 9000
    loop serve --vllm-url unix:/run/vllm/sock   # attach to a running vLLM (with the loop plugin), see below

The managed vLLM listens only on a Unix socket in the private run dir (<data dir>/run/vllm.sock): its dev routes
(/pause, /collective_rpc, ...) have no authentication. An attached vLLM should be started with --uds too; an
http:// one lets every local process (and any web page, through the browser) pause or rewrite it.

Exit codes: 0 stopped (SIGTERM/SIGINT), 2 invalid settings or model not found, 3 the API could not start (as
uvicorn), 4 vLLM could not be brought back (its restart limit within the window was reached, or it could not be
started): /health said why, and a process manager (systemd Restart=on-failure) restarts the whole service.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from typing import Any

from pydantic import ValidationError

from loop.config import Settings

EXIT_API_FAILED = 3  # as uvicorn's own start-up failure
EXIT_VLLM_FAILED = 4

# flag → Settings field, for the flags shared by several commands
_FIELDS = {
    "model": "model", "served_model_name": "served_model_name", "host": "host", "port": "port",
    "vllm_url": "vllm_url", "data_dir": "data_dir", "cache_dir": "cache_dir",
    "database_url": "database_url", "device": "device", "dtype": "dtype", "max_model_len": "max_model_len",
    "cpu_kv_cache_gib": "cpu_kv_cache_gib", "gpu_memory_utilization": "gpu_memory_utilization",
    "request_timeout_s": "request_timeout_s", "vllm_restart_limit": "vllm_restart_limit",
    "vllm_restart_window_s": "vllm_restart_window_s",
    "log_level": "log_level", "train_mode": "train_mode",
}


def settings_from_args(args: argparse.Namespace, **extra: Any) -> Settings:
    """Settings from LOOP_* plus the flags that were given; exits with a clear message on a bad value."""
    overrides = {field: getattr(args, flag) for flag, field in _FIELDS.items()
                 if getattr(args, flag, None) is not None}
    overrides.update({k: v for k, v in extra.items() if v is not None})
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"  --{where.replace('_', '-')} / LOOP_{where.upper()}: {msg}" if where else f"  {msg}")
        print("loop: invalid settings:\n" + "\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None


def add_storage_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="where the database, logs, checkpoints live (LOOP_DATA_DIR)")
    p.add_argument("--database-url", help="SQLAlchemy URL; default SQLite in the data dir (LOOP_DATABASE_URL)")


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse has no public type for it
    p = sub.add_parser("serve", help="start vLLM and the loop API", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="'smollm2' (default), an HF model id, or a local HF folder (LOOP_MODEL)")
    p.add_argument("--served-model-name", help="the name clients put in 'model'")
    p.add_argument("--host", help="address for the API (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port for the API (default 8000)")
    p.add_argument("--vllm-url", help="attach to this running vLLM instead of starting one: unix:/path/to/sock "
                                      "(vLLM started with --uds; recommended) or http://host:port")
    p.add_argument("--vllm-args", help="extra vLLM arguments, one quoted string (e.g. \"--seed 1\")")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--cpu-kv-cache-gib", type=float, help="vLLM-CPU KV cache size (default 1)")
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs (always on CPU)")
    p.add_argument("--request-timeout-s", type=float, help="504 after this long (default 300)")
    p.add_argument("--vllm-restart-limit", type=int,
                   help="restarts of a crashed vLLM within --vllm-restart-window-s before loop exits (default 3)")
    p.add_argument("--vllm-restart-window-s", type=float, help="crashes older than this no longer count (default 600)")
    p.add_argument("--cache-dir", help="where converted models are kept (LOOP_CACHE_DIR)")
    p.add_argument("--no-worker", action="store_true", help="do not start the training worker")
    p.add_argument("--train-mode", choices=["atomic", "lowmem", "hogwild"],
                   help="how updates are written (LOOP_TRAIN_MODE, default atomic): atomic stages them (1x the "
                        "trained weights extra, shortest pause); lowmem writes them by a second backward inside the "
                        "pause (~0.2x extra, pause of one backward); hogwild writes while serving")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--text-logs", action="store_true", help="plain-text logs instead of JSON")
    add_storage_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Everything loop serve and its children (vLLM, the worker) create is private to this user: the database,
    # logs and checkpoints hold every conversation.
    os.umask(0o077)
    import uvicorn

    from loop.api.app import create_app
    from loop.logs import setup_logging
    from loop.model_cache import ModelNotFound, resolve_model

    settings = settings_from_args(
        args,
        vllm_args=shlex.split(args.vllm_args) if args.vllm_args else None,
        enforce_eager=args.enforce_eager,
        worker_enabled=False if args.no_worker else None,
        json_logs=False if args.text_logs else None,
    )
    setup_logging(settings)
    settings.ensure_dirs()
    if settings.vllm_url is None:
        try:
            path = resolve_model(settings.model, settings.cache_dir, progress=True)
        except ModelNotFound as exc:
            print(f"loop: {exc}", file=sys.stderr)
            return 2
        print(f"loop: model {settings.model_name} from {path}", file=sys.stderr)
    settings.resolved_admin_token()
    where = "LOOP_ADMIN_TOKEN" if settings.admin_token else str(settings.data_dir / "admin_token")
    print(f"loop: API on http://{settings.host}:{settings.port} (docs: /docs); data in {settings.data_dir}; "
          f"admin token in {where}", file=sys.stderr, flush=True)
    fatal: list[str] = []

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        print(f"loop: vLLM cannot be brought back; shutting down (exit code {EXIT_VLLM_FAILED}) so that a process "
              f"manager restarts loop: {reason}", file=sys.stderr, flush=True)
        server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                                           access_log=False, timeout_graceful_shutdown=10))
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if fatal:
        return EXIT_VLLM_FAILED
    return 0 if server.started else EXIT_API_FAILED
