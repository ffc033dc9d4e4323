"""`loop openwebui sync`: Open WebUI's thumbs, ratings and comments become loop ratings of the exact responses loop
logged, filed under `openwebui:<user>` (loop/openwebui.py says how a rated message is matched).

    export LOOP_OPENWEBUI_API_KEY=sk-...            # an Open WebUI admin's API key
    loop openwebui sync --url http://localhost:8080
    loop openwebui sync --url http://localhost:8080 --since 1767225600 --json

Reads and writes loop's database directly (the service need not run). Running it again stores nothing twice; an
edited feedback supersedes its earlier rating. Exit code 0 when every feedback was stored or already stored, 2 when
some could not be matched or stored (listed), 1 when Open WebUI could not be read (nothing stored).

Tests: tests/unit/test_openwebui.py, tests/e2e/test_openwebui_e2e.py.
"""

from __future__ import annotations

import argparse
import json
import sys

from loop.cli.serve import add_storage_flags, settings_from_args


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    p = sub.add_parser("openwebui", help="Open WebUI's feedback as loop ratings", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    osub = p.add_subparsers(dest="openwebui_command", metavar="ACTION")
    osub.required = True
    s = osub.add_parser("sync", help="pull Open WebUI's feedback once and store it as ratings")
    s.add_argument("--url", help="Open WebUI's address, e.g. http://localhost:8080 (default: LOOP_OPENWEBUI_URL)")
    s.add_argument("--api-key", help="an Open WebUI admin's API key (default: LOOP_OPENWEBUI_API_KEY; prefer the "
                                     "variable: a flag shows in the process list)")
    s.add_argument("--since", type=float, default=None,
                   help="only feedback changed at or after this time (epoch seconds)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    add_storage_flags(s)
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loop import openwebui
    from loop.db.session import make_engine, make_sessionmaker, migrate
    from loop.errors import LoopError

    settings = settings_from_args(args)
    url = args.url or settings.openwebui_url
    if not url:
        print("loop: no Open WebUI address: pass --url http://HOST:PORT or set LOOP_OPENWEBUI_URL", file=sys.stderr)
        return 1
    settings.ensure_dirs()
    migrate(settings.db_url)
    engine = make_engine(settings.db_url)
    try:
        report = openwebui.sync(make_sessionmaker(engine), url, args.api_key or settings.openwebui_api_key or "",
                                since=args.since)
    except LoopError as exc:
        print(f"loop: {exc.message}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    print(json.dumps(report.to_json(), indent=1) if args.json else report.summary())
    return 2 if report.unmatched or report.failed else 0
