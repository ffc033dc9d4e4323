"""Where loop keeps its files: one rule for every process that needs it.

Settings (loop/config.py) takes its folder defaults from here, and the vLLM plugin (plugin/__init__.py), which runs
inside vLLM without loop's settings, finds the runtime dir with the same rule from the environment. So a `vllm
serve` with the plugin installed and a `loop serve --vllm-url` agree on where the weight handles are without any
configuration. Standard library only: the plugin imports this in every vLLM process.
Tests: tests/unit/config/test_settings_sources.py (Settings and the plugin agree), tests/unit/vllm/test_plugin.py.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def _home_dir(environ: Mapping[str, str], xdg: str, *fallback: str) -> Path:
    base = environ.get(xdg) or os.path.join(environ.get("HOME") or os.path.expanduser("~"), *fallback)
    return Path(base) / "loop"


def default_data_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """$XDG_DATA_HOME/loop, else ~/.local/share/loop (LOOP_DATA_DIR, read by Settings, overrides it)."""
    return _home_dir(environ, "XDG_DATA_HOME", ".local", "share")


def default_cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """$XDG_CACHE_HOME/loop, else ~/.cache/loop."""
    return _home_dir(environ, "XDG_CACHE_HOME", ".cache")


def run_dir(data_dir: Path) -> Path:
    """The runtime dir inside a data dir: the default for the weight-handle files and the sockets."""
    return Path(data_dir) / "run"


def runtime_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The runtime dir Settings would pick in this environment: LOOP_RUNTIME_DIR, else <data dir>/run, the data
    dir being LOOP_DATA_DIR, else default_data_dir(). Empty variables count as unset."""
    if environ.get("LOOP_RUNTIME_DIR"):
        return Path(environ["LOOP_RUNTIME_DIR"])
    data_dir = environ.get("LOOP_DATA_DIR")
    return run_dir(Path(data_dir) if data_dir else default_data_dir(environ))
