"""Write the weight-handle file of one vLLM worker: `<runtime_dir>/weights-tp<rank>.json`.

The file lets another process of the same user (the training worker, loop/worker/handles.py) map vLLM's live
weight memory without a copy. It is plain JSON — readers never unpickle anything — with:

- metadata: format/version, model path, architectures, HF config path, vLLM version, device kind, dtype,
  tp rank/size, a fresh `load_id` per load, the pid, and `layout`: where vLLM's own loader put every HF tensor
  (loop/layout.py; `layout_error` says why when it could not be derived);
- `storages`: every DISTINCT untyped storage once (tied embeddings: `lm_head` and `embed_tokens` share one), with
  its share handle — CPU: the shared-memory file name and torch_shm_manager socket (file_system sharing);
  CUDA: the `_share_cuda_()` IPC tuple, byte fields as hex;
- `params`: per vLLM parameter name (duplicates included, so `lm_head.weight` is listed even when tied) its shape,
  stride, storage offset (elements), dtype and storage index.

CPU: `UntypedStorage._share_filename_cpu_()` moves each storage into /dev/shm IN PLACE (vLLM's tensors keep
aliasing it), which must happen before warm-up. We do not take the in-flight reference `reduce_storage` takes (it
would keep the files alive forever). vLLM's API server kills its workers with signals, so an atexit hook is not
enough: a small reaper process (plugin/reaper.py) waits for this process to die and unlinks the files and the
handle file.

Security: the directory is made 0700 and the file 0600, written under a temporary name and renamed.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("vllm.loop_plugin")

FORMAT = "loop-weight-handles"
FORMAT_VERSION = 2  # 2: the layout replaced the packed-modules mapping

_shm_files: list[str] = []
_handle_files: list[tuple[Path, str]] = []
_cleanup_registered = False


def handle_path(runtime_dir: Path, tp_rank: int) -> Path:
    return Path(runtime_dir) / f"weights-tp{tp_rank}.json"


def export_worker(worker: Any, runtime_dir: Path) -> Path:
    """Export the handles of a vLLM `Worker` whose model is loaded; returns the file written."""
    import vllm
    from vllm.distributed import parallel_state

    cfg = worker.vllm_config
    model = worker.model_runner.get_model()
    tp_size = cfg.parallel_config.tensor_parallel_size
    tp_rank = parallel_state.get_tp_group().rank_in_group if tp_size > 1 else 0
    model_path = str(cfg.model_config.model)
    hf_config_path = Path(model_path) / "config.json"
    meta = {
        "model_path": model_path,
        "architectures": list(getattr(cfg.model_config.hf_config, "architectures", None) or []),
        "hf_config_path": str(hf_config_path) if hf_config_path.is_file() else None,
        "vllm_version": vllm.__version__,
        "dtype": _dtype_name(cfg.model_config.dtype),
        "tp_rank": tp_rank,
        "tp_size": tp_size,
        "pp_size": cfg.parallel_config.pipeline_parallel_size,
        **layout_meta(model, model_path),
    }
    return export_module(model, runtime_dir, tp_rank=tp_rank, meta=meta)


def _identity(model: torch.nn.Module, values: bool = False) -> dict[str, tuple[Any, ...]]:
    """Per parameter: address, shape, strides, dtype and (with `values`) an order-sensitive fingerprint of its
    elements in flat order."""
    return {n: (p.data_ptr(), tuple(p.shape), tuple(p.stride()), p.dtype, _fingerprint(p) if values else None)
            for n, p in model.named_parameters(remove_duplicate=False)}


@torch.no_grad()
def _fingerprint(t: torch.Tensor) -> tuple[float, bool]:
    """(sum of each element times a weight that depends on its flat position, whether all elements are equal)."""
    flat = t.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    chunk = 1 << 24
    for s in range(0, flat.numel(), chunk):
        part = flat[s:s + chunk].double()
        pos = torch.arange(s, s + part.numel(), dtype=torch.float64, device=flat.device).remainder_(65521).add_(1)
        total += (part * pos).sum()
    constant = flat.numel() < 2 or bool((flat == flat[0]).all())
    return float(total), constant


def note_loaded_layout(model: torch.nn.Module, model_path: str) -> None:
    """Derive the layout as vLLM's loader left the weights, before any post-processing, and keep it (with each
    parameter's storage, shape and strides then) on the model for `layout_meta`."""
    from loop import layout

    derived = layout.derive(model, *layout.hf_probe_inputs(model_path))
    model._loop_layout = (derived, _identity(model, values=True))  # type: ignore[assignment]


def layout_meta(model: torch.nn.Module, model_path: str) -> dict[str, Any]:
    """`layout`: where vLLM's loader puts every HF tensor (loop/layout.py), or `layout_error`: why it is unknown.

    Taken from `note_loaded_layout` when it ran (the plugin calls it between vLLM's load_weights and its
    post-processing): a placement in a parameter that post-processing then re-laid (a new storage, shape or strides:
    prepacked for a kernel, padded, quantised) no longer describes the live memory and becomes "transformed".
    Otherwise derived now, on the loaded model, whose weights it leaves as they are."""
    from loop import layout

    try:
        noted = getattr(model, "_loop_layout", None)
        if noted is None:
            derived = layout.derive(model, *layout.hf_probe_inputs(model_path))
        else:
            derived, before = noted
            now = _identity(model, values=True)
            for name, placed in derived.tensors.items():
                if placed.param and not _same_memory(before.get(placed.param), now.get(placed.param)):
                    derived.tensors[name] = layout.Placement(
                        "transformed", param=placed.param, shape=placed.shape,
                        reason=f"vLLM re-lays {placed.param} after loading it (a kernel's own format: "
                               f"{_shape(before.get(placed.param))} -> {_shape(now.get(placed.param))}, the "
                               "elements in another order)")
    except Exception as e:  # noqa: BLE001 - serving goes on; the worker reports why it cannot train
        logger.exception("loop plugin: could not derive where vLLM keeps each weight")
        return {"layout_error": f"{type(e).__name__}: {e}"}
    logger.info("loop plugin: weight layout derived in %.0f ms: %s", derived.ms, derived.kinds())
    return {"layout": derived.to_json()}


def _same_memory(a: tuple[Any, ...] | None, b: tuple[Any, ...] | None) -> bool:
    """The same elements in the same flat order, so every placement (which counts elements) still holds: at the same
    address (a reshape: the hybrid's conv1d weight loses its middle dimension), or copied in order elsewhere (the
    same fingerprint; a parameter whose elements are all equal cannot show its order and counts as re-laid)."""
    if a is None or b is None:
        return False
    (ptr_a, shape_a, stride_a, dtype_a, print_a), (ptr_b, shape_b, stride_b, dtype_b, print_b) = a, b
    if dtype_a != dtype_b or math.prod(shape_a) != math.prod(shape_b):
        return False
    if not (_contiguous(shape_a, stride_a) and _contiguous(shape_b, stride_b)):
        return (ptr_a, shape_a, stride_a) == (ptr_b, shape_b, stride_b)
    return ptr_a == ptr_b or (print_a is not None and print_a == print_b and not print_a[1])


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expect = 1
    for d, s in zip(reversed(shape), reversed(stride)):
        if d != 1 and s != expect:
            return False
        expect *= d
    return True


def _shape(identity: tuple[Any, ...] | None) -> str:
    return "gone" if identity is None else f"{list(identity[1])} strides {list(identity[2])} {identity[3]}"


def export_module(model: torch.nn.Module, runtime_dir: Path, *, tp_rank: int = 0, meta: dict[str, Any] | None = None) -> Path:
    """Share every parameter of `model` and write the handle file. Also used by tests without vLLM."""
    runtime_dir = Path(runtime_dir)
    private_dir(runtime_dir)
    storages: list[dict[str, Any]] = []
    index_of: dict[tuple[str, int], int] = {}  # (device, data_ptr) -> storage index: dedupes tied weights
    params: list[dict[str, Any]] = []
    device_kinds: set[str] = set()
    # Key every parameter by its storage BEFORE sharing anything: sharing a CPU storage moves its data pointer.
    named = [(name, param.data) for name, param in model.named_parameters(remove_duplicate=False)]
    keys = [(str(t.device), t.untyped_storage().data_ptr()) for _, t in named]
    for (name, tensor), key in zip(named, keys):
        if tensor.is_meta:
            raise RuntimeError(f"parameter {name} is on the meta device; cannot export it")
        device_kinds.add(tensor.device.type)
        if key not in index_of:
            index_of[key] = len(storages)
            storages.append(_share_storage(tensor.untyped_storage()))
        params.append(
            {
                "name": name,
                "shape": list(tensor.shape),
                "stride": list(tensor.stride()),
                "offset": tensor.storage_offset(),
                "dtype": _dtype_name(tensor.dtype),
                "storage": index_of[key],
            }
        )
    if len(device_kinds) > 1:
        raise RuntimeError(f"parameters on several device kinds {sorted(device_kinds)}; expected one")
    load_id = uuid.uuid4().hex
    doc = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        **(meta or {}),
        "device": device_kinds.pop() if device_kinds else "cpu",
        "tp_rank": tp_rank,
        "load_id": load_id,
        "pid": os.getpid(),
        "created": time.time(),
        "storages": storages,
        "params": params,
    }
    doc.setdefault("tp_size", 1)
    path = handle_path(runtime_dir, tp_rank)
    _write_private(path, json.dumps(doc, indent=1).encode())
    _handle_files.append((path, load_id))
    _register_cleanup()
    _start_reaper({"shm": [x["cpu"]["filename"] for x in storages if "cpu" in x], "handle_file": str(path), "load_id": load_id})
    return path


def _start_reaper(spec: dict[str, Any]) -> None:
    """Start plugin/reaper.py: it unlinks the shm files and handle file when this process dies, even by SIGKILL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "plugin.reaper", str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a signal to vLLM's process group must not take the reaper with it
        close_fds=True,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec).encode())
    proc.stdin.close()
    proc.wait(timeout=60)  # returns once the reaper has forked its detached child


def _share_storage(storage: torch.UntypedStorage) -> dict[str, Any]:
    if storage.device.type == "cpu":
        # Moves the bytes into a /dev/shm file in place: every tensor on this storage now aliases shared memory.
        manager, filename, size = storage._share_filename_cpu_()
        name = filename.decode()
        _shm_files.append(name)
        return {"nbytes": int(size), "cpu": {"manager": manager.decode(), "filename": name}}
    if storage.device.type == "cuda":
        try:
            (device, handle, size, offset, rc_handle, rc_offset, event_handle, event_sync) = storage._share_cuda_()
        except RuntimeError as e:
            if "expandable_segments" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
                raise RuntimeError(
                    f"CUDA IPC export failed ({e}): PYTORCH_CUDA_ALLOC_CONF has expandable_segments, which breaks "
                    "CUDA IPC; start vLLM without it"
                ) from e
            raise
        return {
            "nbytes": int(size),
            "cuda": {
                "device": int(device),
                # the index is this process's; another process with other visible devices finds the card by UUID
                "uuid": str(torch.cuda.get_device_properties(int(device)).uuid),
                "handle": bytes(handle).hex(),
                "storage_size_bytes": int(size),
                "storage_offset_bytes": int(offset),
                "ref_counter_handle": bytes(rc_handle).hex(),
                "ref_counter_offset": int(rc_offset),
                "event_handle": bytes(event_handle).hex() if event_handle is not None else None,
                "event_sync_required": bool(event_sync),
            },
        }
    raise RuntimeError(f"cannot share weights on device {storage.device}; loop supports cpu and cuda")


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def private_dir(path: Path) -> None:
    """Create `path` 0700, or accept an existing one only if it is ours and private.

    An existing folder others can reach is refused rather than chmod'ed: LOOP_RUNTIME_DIR=/tmp must not make /tmp
    private, nor put weight handles where others can read them.
    """
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"runtime dir {path} belongs to uid {st.st_uid}, not to us; set LOOP_RUNTIME_DIR to a private folder")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise PermissionError(
            f"runtime dir {path} is accessible by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            "set LOOP_RUNTIME_DIR to a private (0700) folder or `chmod 0700` it"
        )


def _write_private(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cleanup() -> None:
    """Unlink this process's shared-memory files and its handle files (if no newer load replaced them)."""
    for name in _shm_files:
        try:
            os.unlink("/dev/shm/" + name.lstrip("/"))
        except FileNotFoundError:
            pass
        except OSError as e:  # pragma: no cover - best effort at exit
            logger.warning("loop plugin: could not remove shared memory %s: %s", name, e)
    _shm_files.clear()
    for path, load_id in _handle_files:
        try:
            if json.loads(path.read_bytes()).get("load_id") == load_id:
                path.unlink()
        except (OSError, ValueError):
            pass
    _handle_files.clear()


def _register_cleanup() -> None:
    global _cleanup_registered
    if not _cleanup_registered:
        atexit.register(cleanup)
        _cleanup_registered = True
