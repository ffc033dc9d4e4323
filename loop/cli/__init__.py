"""The `loop` command line: `loop serve`, `loop db ...`, `loop bench ...` and more.

Each subcommand lives in its own module with `register(subparsers)`, which adds its parser and sets
`func=<callable taking the parsed args, returning an exit code>`. Adding a command is one line in COMMANDS.
Run `loop --help` (or `python -m loop.cli --help`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from loop.cli import (
    bench,
    db,
    feedback,  # loop feedback export / stats
    layout,  # loop layout MODEL: where vLLM keeps each weight
    openwebui,  # loop openwebui sync: Open WebUI's feedback as ratings
    raters,  # loop raters add / list / revoke / token
    replica,  # loop replica: a replica on another host
    runs,  # loop runs / versions / rollback / scheduler
    serve,
)

# One module per command; each has register(subparsers).
COMMANDS = [serve, replica, db, bench, runs, feedback, layout, raters, openwebui]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loop", description="An online RL loop around a vLLM server.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
