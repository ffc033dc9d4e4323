"""`loop db upgrade|downgrade REV|current`: run the Alembic migrations in migrations/ by hand.

`loop serve` upgrades at start-up; these are for operators (e.g. a downgrade before going back a release).
"""

from __future__ import annotations

import argparse

from loop.cli.serve import add_storage_flags, settings_from_args


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    p = sub.add_parser("db", help="database migrations")
    dbsub = p.add_subparsers(dest="db_command", metavar="ACTION")
    dbsub.required = True
    up = dbsub.add_parser("upgrade", help="migrate to the newest (or the given) revision")
    up.add_argument("revision", nargs="?", default="head")
    down = dbsub.add_parser("downgrade", help="migrate down to REV (e.g. -1, base, 0001)")
    down.add_argument("revision")
    dbsub.add_parser("current", help="print the current revision")
    for q in (up, down, dbsub.choices["current"]):
        add_storage_flags(q)
        q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loop.db.session import current_revision, downgrade, migrate

    settings = settings_from_args(args)
    url = settings.db_url
    if args.db_command == "upgrade":
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        migrate(url, args.revision)
    elif args.db_command == "downgrade":
        downgrade(url, args.revision)
    print(f"{url}: revision {current_revision(url) or 'base (empty)'}")
    return 0
