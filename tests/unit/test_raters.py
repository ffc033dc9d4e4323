"""Rater accounts (loop/raters.py) on SQLite and PostgreSQL, and `loop raters ...`: a token works until it is
revoked or replaced, only its hash is stored, names are never reused, and the API's cached view follows changes
made by another process."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from loop import raters
from loop.cli import main as cli_main
from loop.db.models import RaterAccount
from loop.errors import Conflict, Invalid, NotFound
from tests.unit.feedback_support import db_url, sessions  # noqa: F401 - fixtures


def test_a_token_names_its_account_until_revoked(sessions: sessionmaker[Session]) -> None:  # noqa: F811
    alice, token = raters.add(sessions, "alice")
    assert alice.role == "rater" and alice.active and token.startswith(raters.TOKEN_PREFIX)
    accounts = raters.Accounts(sessions, cache_s=0)
    assert accounts.by_token(token) == alice and accounts.is_account("alice")
    assert accounts.by_token(token + "x") is None and accounts.by_token("") is None
    revoked = raters.revoke(sessions, "alice")
    assert not revoked.active and accounts.by_token(token) is None
    assert accounts.is_account("alice")  # the name stays taken
    assert raters.revoke(sessions, "alice").revoked_at == revoked.revoked_at  # twice: no error, same record
    assert [a.name for a in raters.listing(sessions)] == ["alice"]


def test_only_the_tokens_hash_is_stored(sessions: sessionmaker[Session]) -> None:  # noqa: F811
    _, token = raters.add(sessions, "bob", "admin")
    with sessions() as s:
        row = s.scalars(select(RaterAccount)).one()
        dumped = " ".join(str(v) for v in s.execute(text("SELECT * FROM raters")).one())
    assert row.token_sha256 == raters.token_sha256(token) and token not in dumped and row.role == "admin"


def test_a_new_token_replaces_the_old_one(sessions: sessionmaker[Session]) -> None:  # noqa: F811
    _, old = raters.add(sessions, "carol")
    account, new = raters.new_token_for(sessions, "carol")
    accounts = raters.Accounts(sessions, cache_s=0)
    assert new != old and accounts.by_token(old) is None and accounts.by_token(new) == account
    raters.revoke(sessions, "carol")
    with pytest.raises(Conflict, match="revoked"):
        raters.new_token_for(sessions, "carol")
    with pytest.raises(NotFound, match="no rater named 'dave'"):
        raters.new_token_for(sessions, "dave")
    with pytest.raises(NotFound):
        raters.revoke(sessions, "dave")


@pytest.mark.parametrize("name", ["", " alice", "alice ", "x" * 201, "anonymous", "admin"])
def test_names_that_cannot_be_accounts(sessions: sessionmaker[Session], name: str) -> None:  # noqa: F811
    with pytest.raises(Invalid) as err:
        raters.add(sessions, name)
    assert err.value.code == "invalid_rater_name"
    assert raters.listing(sessions) == []


def test_a_name_at_its_limit_and_a_bad_role(sessions: sessionmaker[Session]) -> None:  # noqa: F811
    assert raters.add(sessions, "é" * 200)[0].name == "é" * 200
    with pytest.raises(Invalid, match="role must be one of rater, admin"):
        raters.add(sessions, "erin", "owner")


def test_a_taken_name_is_refused_even_after_revocation(sessions: sessionmaker[Session]) -> None:  # noqa: F811
    raters.add(sessions, "frank")
    raters.revoke(sessions, "frank")
    with pytest.raises(Conflict, match="exists already"):
        raters.add(sessions, "frank")
    assert len(raters.listing(sessions)) == 1


def test_two_admins_adding_the_same_name_at_once_make_one_account(sessions: sessionmaker[Session]) -> None:  # noqa: F811
    results: list[object] = []
    barrier = threading.Barrier(4)

    def add() -> None:
        barrier.wait()
        try:
            results.append(raters.add(sessions, "grace")[1])
        except Conflict as exc:
            results.append(exc)

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tokens = [r for r in results if isinstance(r, str)]
    assert len(tokens) == 1 and len(results) == 4
    assert raters.Accounts(sessions, cache_s=0).by_token(tokens[0]).name == "grace"


def test_the_cached_view_follows_another_process_within_its_age(sessions: sessionmaker[Session]) -> None:  # noqa: F811
    _, token = raters.add(sessions, "heidi")
    accounts = raters.Accounts(sessions, cache_s=0.3)
    assert accounts.by_token(token) is not None
    raters.revoke(sessions, "heidi")  # as `loop raters revoke` would, from elsewhere
    assert accounts.by_token(token) is not None  # still cached: at most cache_s old
    time.sleep(0.35)
    assert accounts.by_token(token) is None


def test_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--data-dir", str(tmp_path)]
    assert cli_main(["raters", "add", "ivan", *flags]) == 0
    token = capsys.readouterr().out.split("token ")[1].split()[0]
    assert cli_main(["raters", "add", "judy", "--role", "admin", *flags]) == 0
    assert cli_main(["raters", "add", "ivan", *flags]) == 1
    assert "exists already" in capsys.readouterr().err
    assert cli_main(["raters", "revoke", "ivan", *flags]) == 0
    assert cli_main(["raters", "token", "ivan", *flags]) == 1
    assert "revoked" in capsys.readouterr().err
    assert cli_main(["raters", "list", *flags]) == 0
    out = capsys.readouterr().out
    assert "ivan\trater\trevoked" in out and "judy\tadmin\tactive" in out
    from loop.db.session import make_engine, make_sessionmaker

    engine = make_engine(f"sqlite:///{tmp_path / 'loop.db'}")
    try:
        assert raters.Accounts(make_sessionmaker(engine), cache_s=0).by_token(token) is None
    finally:
        engine.dispose()
