"""Every setting has one source (loop/config.py) and the copies are derived from it: the worker decodes exactly
what `worker_command` encodes (and nothing secret), the scheduler's tunables take the settings' defaults and
ranges, the vLLM plugin finds the runtime dir Settings chooses, and a run's learning rate, beta and train mode
fall back to the settings in one place."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import typing
from pathlib import Path

import msgspec
import pytest
import zmq

import plugin
from loop import paths
from loop.choices import Optimizer
from loop.config import SECRET_ENV, SECRET_FIELDS, Settings, private_dir
from loop.scheduler import tunables
from loop.worker import protocol as p
from loop.worker.config import WorkerConfig, worker_command
from loop.worker.main import main as worker_main

TOKEN = "t" * 32


# --- the worker's config ----------------------------------------------------------------------------------------------
def test_the_worker_decodes_exactly_what_worker_command_encodes() -> None:
    for settings in (Settings(), Settings(data_dir=Path("/srv/loop"), optimizer="adamw", learning_rate=3e-4,
                                          max_update_ratio=0.2, worker_heartbeat_s=0.5, log_level="debug")):
        command = worker_command(settings, "ipc:///srv/loop/run/worker.sock")
        assert command[:3] == [sys.executable, "-m", "loop.worker.main"] and len(command) == 4
        config = WorkerConfig.decode(command[3])
        assert config == WorkerConfig.from_settings(settings, "ipc:///srv/loop/run/worker.sock")
        assert (config.runtime_dir, config.heartbeat_s, config.optimizer, config.learning_rate,
                config.max_update_ratio, config.log_level) == \
            (str(settings.runtime_dir), settings.worker_heartbeat_s, settings.optimizer, settings.learning_rate,
             settings.max_update_ratio, settings.log_level)


def test_the_worker_has_no_defaults_of_its_own() -> None:
    assert all(f.default is msgspec.NODEFAULT for f in msgspec.structs.fields(WorkerConfig))
    with pytest.raises(ValueError, match="missing required field `endpoint`"):
        WorkerConfig.decode(b"{}")
    good = msgspec.json.decode(WorkerConfig.from_settings(Settings(), "ipc://x").encode())
    with pytest.raises(ValueError, match="optimizer"):
        WorkerConfig.decode(msgspec.json.encode({**good, "optimizer": "adam"}))
    with pytest.raises(ValueError, match="unknown field `lr`"):
        WorkerConfig.decode(msgspec.json.encode({**good, "lr": 1.0}))


def test_no_secret_reaches_the_worker_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOP_VLLM_API_KEY", "k" * 24)
    settings = Settings(admin_token=TOKEN)
    assert settings.vllm_api_key == "k" * 24
    command = " ".join(worker_command(settings, "ipc://x"))
    assert TOKEN not in command and "k" * 24 not in command
    assert SECRET_ENV == tuple(f"LOOP_{n.upper()}" for n in SECRET_FIELDS)
    assert all(n in Settings.model_fields for n in SECRET_FIELDS)


@pytest.mark.parametrize("argv", [[], ["{}"], ["--socket", "ipc://x"], ["{\"endpoint\": 1}"]])
def test_the_worker_refuses_anything_but_one_config(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert worker_main(argv) == 2
    assert "loop.worker.main:" in capsys.readouterr().err


def test_a_worker_started_by_worker_command_connects_and_waits_for_vllm(tmp_path: Path) -> None:
    """The real worker process, from the real command line: it decodes its config, heartbeats on the endpoint
    at the configured rate, and waits for vLLM's handle file in the configured runtime dir."""
    settings = Settings(data_dir=tmp_path, worker_heartbeat_s=0.1, admin_token=TOKEN)
    settings.ensure_dirs()
    endpoint = f"ipc://{settings.runtime_dir / 'worker.sock'}"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    proc = subprocess.Popen(worker_command(settings, endpoint), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        beats: list[p.Heartbeat] = []
        deadline = time.monotonic() + 60
        while len(beats) < 3 and time.monotonic() < deadline and proc.poll() is None:
            if router.poll(200):
                msg = p.decode(router.recv_multipart()[-1])
                if isinstance(msg, p.Heartbeat):
                    beats.append(msg)
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        assert len(beats) == 3 and all(b.pid == proc.pid and b.state == "waiting" for b in beats[1:])
    finally:
        proc.kill()
        proc.wait()
        router.close()
        ctx.term()


# --- enums and a run's defaults -------------------------------------------------------------------------------------------
def test_every_optimizer_name_is_one_the_worker_builds() -> None:
    import torch

    from loop.worker.apollo import make_optimizer

    weight = torch.nn.Parameter(torch.zeros(4, 4))
    for name in typing.get_args(Optimizer):
        assert make_optimizer(name, [weight], lr=1e-3) is not None


def test_train_params_fill_in_what_a_run_leaves_out() -> None:
    settings = Settings(learning_rate=2e-5, dpo_beta=0.3, train_mode="lowmem", optimizer="sgd", nll_weight=0.5)
    assert tuple(settings.train_params()) == (2e-5, 0.3, "lowmem", "sgd", 0.5)
    assert tuple(settings.train_params(learning_rate=1e-3, beta=0.05, train_mode="hogwild", nll_weight=0.0)) == \
        (1e-3, 0.05, "hogwild", "sgd", 0.0)
    assert Settings().nll_weight == 1.0  # the likelihood term is on by default (docs/measurements.md says why)


# --- scheduler tunables -------------------------------------------------------------------------------------------------
def test_tunables_take_the_settings_defaults_ranges_and_descriptions() -> None:
    defaults = tunables.Tunables()
    for name, setting in tunables.SETTING.items():
        field = Settings.model_fields[setting]
        assert getattr(defaults, name) == field.default
        assert tunables.Tunables.model_fields[name].description == field.description
        assert field.description
    assert set(tunables.TunableChanges.model_fields) == set(tunables.SETTING)
    assert tunables.effective(Settings(scheduler_min_pairs=3), {"steps": 4}).model_dump() == \
        {**defaults.model_dump(), "min_pairs": 3, "steps": 4}


@pytest.mark.parametrize("name, bad", [("interval_s", 1e11), ("min_pairs", 0), ("batch_size", 4097),
                                       ("steps", 101), ("learning_rate", 2.0), ("margin_alpha", -1.0), ("margin_alpha", 1.0)])
def test_a_value_out_of_range_is_refused_alike_at_start_up_and_at_run_time(name: str, bad: float) -> None:
    with pytest.raises(ValueError, match=name):
        tunables.check(name, bad)
    with pytest.raises(ValueError, match=tunables.SETTING[name]):
        Settings(**{tunables.SETTING[name]: bad})


def test_every_setting_value_is_a_valid_tunable() -> None:
    """The ranges are shared: whatever Settings accepts, the scheduler's own check accepts too."""
    settings = Settings(scheduler_interval_s=1e10, scheduler_min_pairs=1_000_000, batch_size=4096,
                        scheduler_steps=100, learning_rate=1.0, poison_alpha=0.999)
    for name, setting in tunables.SETTING.items():
        value = getattr(settings, setting)
        if value is not None:
            assert tunables.check(name, value) == value


# --- the runtime dir ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env", [{}, {"XDG_DATA_HOME": "xdg"}, {"LOOP_DATA_DIR": "data"},
                                 {"LOOP_DATA_DIR": "data", "LOOP_RUNTIME_DIR": "rt"},
                                 {"XDG_RUNTIME_DIR": "xdg-run"}])
def test_settings_and_the_plugin_agree_on_the_runtime_dir(env: dict[str, str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LOOP_DATA_DIR", "LOOP_RUNTIME_DIR", "XDG_DATA_HOME", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, str(tmp_path / value))
    assert plugin.runtime_dir() == Settings().runtime_dir == paths.runtime_dir()
    assert Settings(data_dir=tmp_path / "flag").runtime_dir == (
        tmp_path / "rt" if "LOOP_RUNTIME_DIR" in env else tmp_path / "flag" / "run")


def test_a_shared_sticky_folder_is_refused_as_a_private_dir(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(PermissionError, match="shared folder"):
        private_dir(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777  # left as it was
    with pytest.raises(PermissionError, match="shared folder"):
        Settings(data_dir=tmp_path / "data", runtime_dir=shared).ensure_dirs()
