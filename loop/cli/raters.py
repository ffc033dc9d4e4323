"""`loop raters add|list|revoke|token`: rater accounts, straight in loop's database (the service need not run; a
running one notices within a few seconds).

    loop raters add alice                # prints alice's token, once
    loop raters add ops --role admin     # an admin account: may also train and manage versions
    loop raters list
    loop raters revoke alice
    loop raters token alice              # a new token for alice; the old one stops working
    loop raters signal                   # (over HTTP, admin) whose feedback pulls against what was learned

Tests: tests/unit/test_raters.py.
"""

from __future__ import annotations

import argparse
import json
import sys

from loop.cli import runs
from loop.cli.serve import add_storage_flags, settings_from_args


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    p = sub.add_parser("raters", help="rater accounts: add, list, revoke, new token; per-rater signal",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rsub = p.add_subparsers(dest="raters_command", metavar="ACTION")
    rsub.required = True
    add = rsub.add_parser("add", help="make an account and print its token (shown only now)")
    add.add_argument("name")
    add.add_argument("--role", choices=("rater", "admin"), default="rater")
    listing = rsub.add_parser("list", help="every account, revoked ones too")
    listing.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    revoke = rsub.add_parser("revoke", help="the account's token stops working; its ratings stay attributed")
    revoke.add_argument("name")
    token = rsub.add_parser("token", help="a new token for an active account (the old one stops working)")
    token.add_argument("name")
    for q in (add, listing, revoke, token):
        add_storage_flags(q)
        q.set_defaults(func=run)
    signal = rsub.add_parser("signal", help="per-rater signal: whose feedback pulls against what was learned")
    signal.add_argument("--runs", type=int, default=200, help="the newest scheduled runs to read")
    runs._common(signal)  # noqa: SLF001 - the HTTP commands' flags
    signal.set_defaults(func=runs._wrap(runs.cmd_raters))  # noqa: SLF001


def run(args: argparse.Namespace) -> int:
    from loop import raters
    from loop.db.session import make_engine, make_sessionmaker, migrate
    from loop.errors import LoopError

    settings = settings_from_args(args)
    settings.ensure_dirs()
    migrate(settings.db_url)
    engine = make_engine(settings.db_url)
    sessions = make_sessionmaker(engine)
    try:
        if args.raters_command == "add":
            account, tok = raters.add(sessions, args.name, args.role)
            print(f"{account.name} ({account.role}): token {tok}\n(shown once; loop keeps only its hash)")
        elif args.raters_command == "token":
            account, tok = raters.new_token_for(sessions, args.name)
            print(f"{account.name} ({account.role}): new token {tok}\n(the old token no longer works)")
        elif args.raters_command == "revoke":
            account = raters.revoke(sessions, args.name)
            print(f"{account.name}: revoked at {account.to_json()['revoked_at']}")
        else:
            accounts = raters.listing(sessions)
            if args.json:
                print(json.dumps({"raters": [a.to_json() for a in accounts]}, indent=1))
            else:
                for a in accounts:
                    state = "active" if a.active else f"revoked {a.to_json()['revoked_at']}"
                    print(f"{a.name}\t{a.role}\t{state}")
                if not accounts:
                    print("no rater accounts (make one with `loop raters add NAME`)")
        return 0
    except LoopError as exc:
        print(f"loop: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
