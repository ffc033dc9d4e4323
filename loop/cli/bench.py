"""`loop bench <name>`: benchmarks that print figures. Each lives in loop/bench/<name>.py with
`register(subparsers)`; adding one is one entry in BENCHES."""

from __future__ import annotations

import argparse

from loop.bench import (
    direction,
    durable,
    ingest,
    learning,
    memory,
    proxy,
    reads,
    serving,
    update,
)

BENCHES = [proxy, ingest, reads, learning, update, durable, memory, direction, serving]


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    p = sub.add_parser("bench", help="benchmarks (print figures)")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    bsub.required = True
    for module in BENCHES:
        module.register(bsub)
