"""`loop serve`: start vLLM (or attach to one) and the loop API in front of it.

Flags override LOOP_* environment variables, which override defaults (see loop/config.py). The model is resolved
first (the default SmolLM2 is converted once, with progress), then uvicorn runs `create_app(settings)`: the API
listens at once and answers 503 with progress until vLLM is ready.

    loop serve                                  # default model, API on 127.0.0.1:8000, vLLM on :8001
    loop serve --model Qwen/Qwen2.5-0.5B-Instruct --port 9000
    loop serve --vllm-url http://127.0.0.1:8001 # attach to a running vLLM (with the loop plugin)
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from pydantic import ValidationError

from loop.config import Settings

# flag → Settings field, for the flags shared by several commands
_FIELDS = {
    "model": "model", "served_model_name": "served_model_name", "host": "host", "port": "port",
    "vllm_url": "vllm_url", "vllm_port": "vllm_port", "data_dir": "data_dir", "cache_dir": "cache_dir",
    "database_url": "database_url", "device": "device", "dtype": "dtype", "max_model_len": "max_model_len",
    "cpu_kv_cache_gib": "cpu_kv_cache_gib", "gpu_memory_utilization": "gpu_memory_utilization",
    "request_timeout_s": "request_timeout_s", "vllm_restart_limit": "vllm_restart_limit",
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
    p.add_argument("--vllm-url", help="attach to this running vLLM instead of starting one")
    p.add_argument("--vllm-port", type=int, help="port of the vLLM child (default 8001)")
    p.add_argument("--vllm-args", help="extra vLLM arguments, one quoted string (e.g. \"--seed 1\")")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--cpu-kv-cache-gib", type=float, help="vLLM-CPU KV cache size (default 1)")
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs (always on CPU)")
    p.add_argument("--request-timeout-s", type=float, help="504 after this long (default 300)")
    p.add_argument("--vllm-restart-limit", type=int)
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
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None,
                access_log=False, timeout_graceful_shutdown=10)
    return 0
