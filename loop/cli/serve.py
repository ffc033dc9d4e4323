"""`loop serve`: start vLLM (or attach to one) and the loop API in front of it.

Every setting of loop/config.py is a flag here (`--max-model-len` sets `max_model_len`: loop/cli/flags.py), except
the secrets, which come from the environment only. Flags override LOOP_* environment variables, which override the
defaults. The model is resolved first (the default SmolLM2 is converted once, with progress), then uvicorn runs
`create_app(settings)`: the API listens at once and answers 503 with progress until vLLM is ready.

    loop serve                                  # default model, API on 127.0.0.1:8000, vLLM on a private socket
    loop serve --model Qwen/Qwen2.5-0.5B-Instruct --port 9000
    loop serve --vllm-url unix:/run/vllm/sock   # attach to a running vLLM (with the loop plugin), see below

The managed vLLM listens only on a Unix socket in the private run dir (<data dir>/run/vllm.sock): its dev routes
(/pause, /collective_rpc, ...) have no authentication. An attached vLLM should be started with --uds too; an
http:// one lets every local process (and any web page, through the browser) pause or rewrite it.

Exit codes: 0 stopped (SIGTERM/SIGINT), 2 invalid settings or model not found, 3 the API could not start (as
uvicorn), 4 vLLM could not be brought back (its restart limit within the window was reached, or it could not be
started): /health said why, and a process manager (systemd Restart=on-failure) restarts the whole service;
5 the training worker cannot train the served model in place (a weight that is not a view of vLLM's memory: the
reason names each one; `--no-worker` serves it without training).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

from pydantic import ValidationError

from loop.cli.flags import add_model_flags, flag_of, given
from loop.config import SECRET_FIELDS, Settings

EXIT_API_FAILED = 3  # as uvicorn's own start-up failure
EXIT_VLLM_FAILED = 4
EXIT_MODEL_REFUSED = 5  # the model cannot be trained in place: restarting loop would not change that



def settings_from_args(args: argparse.Namespace, **extra: Any) -> Settings:
    """Settings from LOOP_* plus the flags that were given; exits with a clear message on a bad value."""
    overrides = given(args, Settings.model_fields)
    overrides.update({k: v for k, v in extra.items() if v is not None})
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            if err["type"] == "default_factory_not_called":  # a default derived from a field reported above
                continue
            where = ".".join(str(p) for p in err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            names = f"LOOP_{where.upper()}" if where in SECRET_FIELDS else f"{flag_of(where)} / LOOP_{where.upper()}"
            lines.append(f"  {names}: {msg}" if where else f"  {msg}")
        print("loop: invalid settings:\n" + "\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None


def add_storage_flags(p: argparse.ArgumentParser) -> None:
    add_model_flags(p, Settings, ["data_dir", "database_url"], env_prefix="LOOP_")


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse has no public type for it
    p = sub.add_parser("serve", help="start vLLM and the loop API", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    settings = p.add_argument_group("settings (loop/config.py; secrets such as LOOP_ADMIN_TOKEN and "
                                    "LOOP_VLLM_API_KEY come from the environment only)")
    add_model_flags(settings, Settings, skip=SECRET_FIELDS, env_prefix="LOOP_")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Everything loop serve and its children (vLLM, the worker) create is private to this user: the database,
    # logs and checkpoints hold every conversation.
    os.umask(0o077)
    import uvicorn

    from loop.api.app import create_app
    from loop.logs import setup_logging
    from loop.model_cache import ModelNotFound, resolve_model

    settings = settings_from_args(args)
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
        print(f"loop: shutting down (exit code {EXIT_VLLM_FAILED}) so that a process manager restarts loop: {reason}",
              file=sys.stderr, flush=True)
        server.should_exit = True

    refused: list[str] = []

    def on_refused(reason: str) -> None:
        refused.append(reason)
        print(f"loop: {reason}\nloop: shutting down (exit code {EXIT_MODEL_REFUSED}); `loop layout MODEL` lists "
              "every weight and why; to serve this model without training, add --no-worker",
              file=sys.stderr, flush=True)
        server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal, on_refused=on_refused)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                                           access_log=False, timeout_graceful_shutdown=10))
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if fatal:
        return EXIT_VLLM_FAILED
    if refused:
        return EXIT_MODEL_REFUSED
    return 0 if server.started else EXIT_API_FAILED
