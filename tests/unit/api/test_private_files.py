"""Private by default: the data dir and everything loop writes into it (database, logs, checkpoints, the run dir,
the admin token) are readable by this user only, whatever the umask, and a data dir left open is tightened.

Each test runs under umask 022 (files 0644, folders 0755 unless loop says otherwise), so a pass means loop set
the modes itself. `loop serve` also sets umask 077 for itself and its children; tests/e2e/test_access_e2e.py
checks the files of a real service.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, text

from loop.api.app import create_app
from loop.config import Settings, tighten
from loop.db.session import make_engine, migrate
from loop.logs import open_private_log


@pytest.fixture(autouse=True)
def open_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_one_row(db_url: str) -> tuple[Engine, Connection]:
    """A write through loop's engine, connection left open so SQLite's -wal and -shm files exist when checked."""
    engine = make_engine(db_url)
    conn = engine.connect()
    conn.execute(text("CREATE TABLE IF NOT EXISTS probe (x INTEGER)"))
    conn.execute(text("INSERT INTO probe VALUES (1)"))
    conn.commit()
    return engine, conn


def test_ensure_dirs_and_migrate_create_everything_private(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    settings.ensure_dirs()
    migrate(settings.db_url)
    settings.resolved_admin_token()
    engine, conn = write_one_row(settings.db_url)
    try:
        data = settings.data_dir
        assert {p.name: oct(mode(p)) for p in (data, settings.runtime_dir, settings.checkpoint_dir,
                                               settings.log_dir)} == dict.fromkeys(
            ("data", "run", "checkpoints", "logs"), oct(0o700))
        files = [data / "loop.db", data / "loop.db-wal", data / "loop.db-shm", data / "admin_token"]
        assert {p.name: oct(mode(p)) for p in files} == {p.name: oct(0o600) for p in files}
    finally:
        conn.close()
        engine.dispose()


async def test_app_start_up_leaves_a_private_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", vllm_url="http://127.0.0.1:9")
    app = create_app(settings, manage=False)
    async with app.router.lifespan_context(app):
        assert mode(settings.data_dir) == 0o700 and mode(settings.data_dir / "loop.db") == 0o600
        assert mode(settings.runtime_dir) == mode(settings.checkpoint_dir) == mode(settings.log_dir) == 0o700
        assert mode(settings.data_dir / "admin_token") == 0o600


def test_an_existing_open_data_dir_is_tightened_and_the_log_says_so(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    (data / "logs").mkdir(parents=True)
    (data / "checkpoints").mkdir()
    for folder in (data, data / "logs", data / "checkpoints"):
        os.chmod(folder, 0o755)
    settings = Settings(data_dir=data)
    migrate(settings.db_url)  # made by an older loop, before files were private
    for name in ("loop.db", "logs/vllm.log", "logs/worker.log", "admin_token"):
        (data / name).touch()
        os.chmod(data / name, 0o644)
    with caplog.at_level(logging.WARNING, logger="loop.config"):
        settings.ensure_dirs()
        make_engine(settings.db_url).dispose()
    for folder in (data, data / "logs", data / "checkpoints"):
        assert mode(folder) == 0o700, folder
    for name in ("loop.db", "logs/vllm.log", "logs/worker.log", "admin_token"):
        assert mode(data / name) == 0o600, name
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{data} was open to others (mode 755); made it private (700)" in said
    assert "loop.db was open to others (mode 644); made it private (600)" in said


def test_a_private_log_is_created_0600_appends_and_tightens_an_open_one(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "vllm.log"
    with open_private_log(path) as f:
        f.write(b"one\n")
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    os.chmod(path, 0o644)
    with open_private_log(path) as f:
        assert f.name == str(path)  # the worker's control reads its tail back by name
        f.write(b"two\n")
    assert path.read_bytes() == b"one\ntwo\n" and mode(path) == 0o600


def test_a_path_that_cannot_be_tightened_is_reported_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "shared.db"
    path.touch()
    os.chmod(path, 0o644)

    def refuse(*_: object) -> None:
        raise PermissionError("Operation not permitted")

    monkeypatch.setattr(os, "chmod", refuse)
    with caplog.at_level(logging.WARNING, logger="loop.config"):
        tighten(path, 0o600)
    assert mode(path) == 0o644
    assert "could not be made private: Operation not permitted" in caplog.text


def test_a_private_path_is_left_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "f"
    path.touch()
    os.chmod(path, 0o400)
    with caplog.at_level(logging.WARNING, logger="loop.config"):
        tighten(path, 0o600)
        tighten(tmp_path / "missing", 0o600)
    assert mode(path) == 0o400 and caplog.records == []


def test_a_shared_sticky_folder_is_refused_as_data_dir_and_left_as_it_was(tmp_path: Path) -> None:
    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # what /tmp looks like
    with pytest.raises(PermissionError, match="shared folder .* choose a folder of loop's own"):
        Settings(data_dir=shared).ensure_dirs()
    assert mode(shared) == 0o1777 and list(shared.iterdir()) == []
