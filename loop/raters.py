"""Rater accounts: who may rate, under which name, with which token.

An account has a name (what every rating it gives is attributed to), a role (`rater`, or `admin`: also allowed on
the admin routes) and a token, shown once when the account is made or its token replaced; only the token's
SHA-256 is stored. Revoking keeps the row: the name stays taken, so no one can later rate as someone who left.

`Accounts` answers "whose token is this?" and "is this name an account?" for the API from a short-lived cache,
because the CLI (`loop raters ...`) changes accounts in another process, straight in the database: a revocation
reaches a running service within `CACHE_S`.

Tests: tests/unit/test_raters.py (SQLite and PostgreSQL), tests/unit/api/test_accounts_api.py.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from loop.db.models import RaterAccount
from loop.errors import Conflict, Invalid, NotFound

Role = Literal["rater", "admin"]
ROLES: tuple[Role, ...] = ("rater", "admin")
# Names a person cannot take: the one an unsigned rating gets, and the one the admin token rates as.
RESERVED = frozenset({"anonymous", "admin"})
TOKEN_PREFIX = "loopr_"
# How stale the API's view of the accounts may be: a token revoked from the CLI stops working within this.
CACHE_S = 2.0


@dataclass(frozen=True)
class Account:
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "role": self.role, "active": self.active,
                "created_at": _iso(self.created_at), "revoked_at": _iso(self.revoked_at)}


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def _utc(t: datetime | None) -> datetime | None:
    """SQLite hands back times without their zone; they were written in UTC."""
    return t if t is None or t.tzinfo else t.replace(tzinfo=timezone.utc)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= 200 or name != name.strip():
        raise Invalid(f"a rater's name is 1..200 characters without leading or trailing spaces, got {name!r}",
                      code="invalid_rater_name", param="name")
    if name in RESERVED:
        raise Invalid(f"{name!r} is reserved ({', '.join(sorted(RESERVED))}: unsigned ratings and the admin token "
                      "use them); choose another name", code="invalid_rater_name", param="name")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise Invalid(f"role must be one of {', '.join(ROLES)}, got {role!r}", code="invalid_role", param="role")
    return role


def _account(row: RaterAccount) -> Account:
    return Account(row.name, row.role, _utc(row.created_at), _utc(row.revoked_at))  # type: ignore[arg-type]


def add(sessions: sessionmaker[Session], name: str, role: str = "rater") -> tuple[Account, str]:
    """A new account and its token (shown only now). A name ever used by an account, revoked or not, is taken."""
    check_name(name)
    check_role(role)
    token = new_token()
    with sessions() as s:
        row = RaterAccount(name=name, role=role, token_sha256=token_sha256(token))
        s.add(row)
        try:
            s.commit()
        except IntegrityError:
            s.rollback()
            raise Conflict(f"a rater named {name!r} exists already (revoked accounts keep their names)",
                           code="rater_exists", param="name") from None
        return _account(row), token


def listing(sessions: sessionmaker[Session]) -> list[Account]:
    with sessions() as s:
        return [_account(r) for r in s.scalars(select(RaterAccount).order_by(RaterAccount.id))]


def _active_row(s: Session, name: str) -> RaterAccount:
    row = s.scalars(select(RaterAccount).where(RaterAccount.name == name)).first()
    if row is None:
        raise NotFound(f"no rater named {name!r}", code="rater_not_found", param="name")
    return row


def revoke(sessions: sessionmaker[Session], name: str) -> Account:
    """The account's token stops working (the API notices within CACHE_S). Revoking twice is no error."""
    with sessions() as s:
        row = _active_row(s, name)
        if row.revoked_at is None:
            row.revoked_at = datetime.now(timezone.utc)
            s.commit()
        return _account(row)


def new_token_for(sessions: sessionmaker[Session], name: str) -> tuple[Account, str]:
    """Replace an active account's token (a lost or leaked one): the old token stops working."""
    token = new_token()
    with sessions() as s:
        row = _active_row(s, name)
        if row.revoked_at is not None:
            raise Conflict(f"the rater {name!r} is revoked; make a new account instead", code="rater_revoked",
                           param="name")
        row.token_sha256 = token_sha256(token)
        s.commit()
        return _account(row), token


class Accounts:
    """The API's cached view of the accounts: whose token is this, and which names are taken."""

    def __init__(self, sessions: sessionmaker[Session], cache_s: float = CACHE_S) -> None:
        self._sessions = sessions
        self._cache_s = cache_s
        self._lock = threading.Lock()
        self._loaded_at = float("-inf")
        self._by_hash: dict[str, Account] = {}
        self._names: frozenset[str] = frozenset()

    def _fresh(self) -> None:
        if time.monotonic() - self._loaded_at < self._cache_s:
            return
        with self._lock:
            if time.monotonic() - self._loaded_at < self._cache_s:
                return
            with self._sessions() as s:
                rows = list(s.scalars(select(RaterAccount)))
            self._by_hash = {r.token_sha256: _account(r) for r in rows if r.revoked_at is None}
            self._names = frozenset(r.name for r in rows)
            self._loaded_at = time.monotonic()

    def forget(self) -> None:
        """Read the accounts again at the next question (after this process changed them)."""
        self._loaded_at = float("-inf")

    def stale(self) -> bool:
        return time.monotonic() - self._loaded_at >= self._cache_s

    def by_token(self, token: str) -> Account | None:
        """The active account whose token this is; None for an unknown or revoked token."""
        self._fresh()
        return self._by_hash.get(token_sha256(token))

    def is_account(self, name: str) -> bool:
        self._fresh()
        return name in self._names
