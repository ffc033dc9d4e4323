"""Read the plugin's weight-handle files and map vLLM's live weights into this process, without a copy.

The vLLM plugin (plugin/export.py) writes `<runtime_dir>/weights-tp<rank>.json` right after vLLM loads the model.
`read_handles` finds, validates and parses those files (JSON decoded by msgspec into typed structs: nothing is
unpickled); `attach` turns one rank's handles into `{vllm_param_name: tensor}` where every tensor aliases vLLM's
memory:

- CPU: each storage's /dev/shm file is mmap'ed (MAP_SHARED; see `_map_shm` for why not torch_shm_manager),
  `Tensor.set_` rebuilds the parameter views (shape, stride, offset) on it;
- CUDA: `UntypedStorage._new_shared_cuda` opens each storage's IPC handle (what torch's `rebuild_cuda_tensor`
  does), then the same `set_`.

Files that are group/world-accessible, owned by someone else, of an unknown format, or left by a vLLM process
that is gone are refused with an error that says what to do.

    python -m loop.worker.handles RUNTIME_DIR     # prints a summary of the handle files found
"""

from __future__ import annotations

import mmap
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import torch

FORMAT = "loop-weight-handles"
FORMAT_VERSION = 2

_DTYPES = {
    "float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool",
    "float8_e4m3fn", "float8_e5m2",
}  # fmt: skip


class HandleError(RuntimeError):
    """The handle files are missing, unsafe, stale or malformed; the message says what to do."""


class CpuShare(msgspec.Struct, frozen=True):
    manager: str
    filename: str


class CudaShare(msgspec.Struct, frozen=True):
    device: int
    handle: str
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: str
    ref_counter_offset: int
    event_handle: str | None
    event_sync_required: bool
    uuid: str = ""  # the card's UUID: its index in this process when vLLM saw other devices (a replica's own card)


class StorageHandle(msgspec.Struct, frozen=True):
    nbytes: int
    cpu: CpuShare | None = None
    cuda: CudaShare | None = None


class ParamHandle(msgspec.Struct, frozen=True):
    name: str
    shape: list[int]
    stride: list[int]
    offset: int
    dtype: str
    storage: int


class RankHandles(msgspec.Struct, frozen=True):
    """One handle file, i.e. one tensor-parallel rank."""

    format: str
    version: int
    device: str
    tp_rank: int
    tp_size: int
    load_id: str
    pid: int
    storages: list[StorageHandle]
    params: list[ParamHandle]
    model_path: str = ""
    architectures: list[str] = []
    hf_config_path: str | None = None
    vllm_version: str = ""
    dtype: str = ""
    pp_size: int = 1
    created: float = 0.0
    layout: dict[str, Any] | None = None  # loop/layout.py's Layout.to_json()
    layout_error: str = ""


@dataclass(frozen=True)
class HandleSet:
    """All ranks of one vLLM load. `meta` holds rank 0's metadata (model_path, architecture, load_id, device, ...)."""

    runtime_dir: Path
    ranks: list[RankHandles]

    @property
    def meta(self) -> dict[str, Any]:
        r = self.ranks[0]
        return {
            "model_path": r.model_path,
            "architecture": r.architectures[0] if r.architectures else "",
            "architectures": list(r.architectures),
            "hf_config_path": r.hf_config_path,
            "load_id": r.load_id,
            "load_ids": [x.load_id for x in self.ranks],
            "device": r.device,
            "dtype": r.dtype,
            "tp_size": r.tp_size,
            "vllm_version": r.vllm_version,
            "pid": r.pid,
            "layout": r.layout,
            "layout_error": r.layout_error,
        }


def read_handles(runtime_dir: str | os.PathLike[str], *, wait_s: float = 0) -> HandleSet:
    """Read every rank's handle file in `runtime_dir`, waiting up to `wait_s` seconds for them to appear."""
    runtime_dir = Path(runtime_dir)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return _read_once(runtime_dir)
        except _NotYet as e:
            if time.monotonic() >= deadline:
                raise HandleError(str(e)) from None
            time.sleep(0.2)


class _NotYet(Exception):
    pass


def _read_once(runtime_dir: Path) -> HandleSet:
    first = runtime_dir / "weights-tp0.json"
    if not first.exists():
        raise _NotYet(
            f"no weight-handle file {first}: is vLLM running with the loop plugin and LOOP_RUNTIME_DIR={runtime_dir}? "
            "(the plugin logs 'loop plugin active' at start and 'exported weight handles' after loading)"
        )
    _check_private(runtime_dir, is_dir=True)
    rank0 = _read_file(first)
    ranks = [rank0]
    for r in range(1, rank0.tp_size):
        path = runtime_dir / f"weights-tp{r}.json"
        if not path.exists():
            raise _NotYet(f"{path} missing: vLLM runs with tensor parallel size {rank0.tp_size}, wait for all ranks")
        ranks.append(_read_file(path))
    for r in ranks:
        if r.model_path != rank0.model_path or r.tp_size != rank0.tp_size:
            raise _NotYet(f"handle files in {runtime_dir} come from different vLLM loads; waiting for a consistent set")
    return HandleSet(runtime_dir=runtime_dir, ranks=ranks)


def _check_private(path: Path, *, is_dir: bool) -> None:
    st = path.stat()
    if st.st_uid != os.getuid():
        raise HandleError(f"{path} belongs to uid {st.st_uid}, not to this user ({os.getuid()}); refusing to use it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        want = "0700" if is_dir else "0600"
        raise HandleError(
            f"{path} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"refusing it: run `chmod {want} {path}` and restart vLLM if you did not expect this"
        )


def _read_file(path: Path) -> RankHandles:
    _check_private(path, is_dir=False)
    try:
        doc = msgspec.json.decode(path.read_bytes(), type=RankHandles)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise HandleError(f"{path} is not a valid loop weight-handle file: {e}") from None
    if doc.format != FORMAT or doc.version != FORMAT_VERSION:
        raise HandleError(
            f"{path} has format {doc.format!r} v{doc.version}; this loop reads {FORMAT!r} v{FORMAT_VERSION}: "
            "use the same loop version in vLLM and in the worker"
        )
    if not _pid_alive(doc.pid):
        raise _NotYet(f"{path} was written by vLLM process {doc.pid}, which is gone: the file is stale; (re)start vLLM")
    for p in doc.params:
        if p.dtype not in _DTYPES:
            raise HandleError(f"{path}: parameter {p.name} has unsupported dtype {p.dtype!r}")
        if not 0 <= p.storage < len(doc.storages) or len(p.shape) != len(p.stride):
            raise HandleError(f"{path}: parameter {p.name} has an inconsistent storage index or stride")
    return doc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def attach(handle_set: HandleSet, rank: int = 0) -> dict[str, torch.Tensor]:
    """Map rank `rank`'s weights: vLLM parameter name -> tensor aliasing vLLM's memory (no copy)."""
    if not 0 <= rank < len(handle_set.ranks):
        raise HandleError(f"rank {rank} out of range: the handle set has {len(handle_set.ranks)} rank(s)")
    doc = handle_set.ranks[rank]
    storages = [_open_storage(s, doc) for s in doc.storages]
    out: dict[str, torch.Tensor] = {}
    for p in doc.params:
        storage = storages[p.storage]
        dtype = getattr(torch, p.dtype)
        t = torch.empty(0, dtype=dtype, device=storage.device)
        end = p.offset + sum((n - 1) * s for n, s in zip(p.shape, p.stride)) + 1 if all(p.shape) else p.offset
        if end * t.element_size() > storage.nbytes():
            raise HandleError(f"parameter {p.name} would reach past its storage ({storage.nbytes()} bytes)")
        t.set_(storage, p.offset, p.shape, p.stride)
        out[p.name] = t
    return out


def local_device(index: int, uuid: str) -> int:
    """This process's index of the card vLLM called `index` and whose UUID is `uuid` (vLLM may see other devices
    than this process: a replica started with CUDA_VISIBLE_DEVICES)."""
    if not uuid:
        return index
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    raise HandleError(f"vLLM's weights are on the card with UUID {uuid}, which this process does not see "
                      "(CUDA_VISIBLE_DEVICES)")


def _open_storage(s: StorageHandle, doc: RankHandles) -> torch.UntypedStorage:
    if s.cpu is not None:
        shm = Path("/dev/shm") / s.cpu.filename.lstrip("/")
        if not shm.exists():
            raise HandleError(f"shared memory {shm} is gone: vLLM (pid {doc.pid}) exited or reloaded; restart it")
        return _map_shm(shm, s.nbytes)
    if s.cuda is not None:
        if not torch.cuda.is_available():
            raise HandleError("the handle file shares CUDA memory but this process sees no CUDA device")
        c = s.cuda
        torch.cuda._lazy_init()
        return torch.UntypedStorage._new_shared_cuda(
            local_device(c.device, c.uuid),
            bytes.fromhex(c.handle),
            c.storage_size_bytes,
            c.storage_offset_bytes,
            bytes.fromhex(c.ref_counter_handle),
            c.ref_counter_offset,
            bytes.fromhex(c.event_handle) if c.event_handle is not None else None,
            c.event_sync_required,
        )
    raise HandleError("a storage entry has neither a cpu nor a cuda share handle")


# torch's file_system sharing (RefcountedMapAllocator) keeps a refcount in a 64-byte header before the data.
_SHM_HEADER = 64


def _map_shm(path: Path, nbytes: int) -> torch.UntypedStorage:
    """Map a torch shared-memory file ourselves (MAP_SHARED), bypassing torch_shm_manager.

    Why not `UntypedStorage._new_shared_filename_cpu`: that registers with the exporter's torch_shm_manager, which
    vLLM kills with its worker; freeing the storage afterwards (at the latest at exit) then aborts this process
    with a broken pipe. A plain mapping only needs the file to exist while we open it.
    """
    if nbytes == 0:
        return torch.UntypedStorage(0)
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size != nbytes + _SHM_HEADER:
            raise HandleError(f"{path} is {size} bytes, expected {nbytes} + {_SHM_HEADER}: not a torch shm weight file")
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    # frombuffer aliases the mapping (no copy) and keeps `mm` alive as long as any view of it lives.
    return torch.frombuffer(mm, dtype=torch.uint8, offset=_SHM_HEADER, count=nbytes).untyped_storage()


def _main(argv: list[str]) -> int:
    hs = read_handles(argv[0] if argv else ".")
    print({k: v for k, v in hs.meta.items() if k != "layout"})
    for r in hs.ranks:
        nbytes = sum(s.nbytes for s in r.storages)
        print(f"rank {r.tp_rank}: {len(r.params)} params in {len(r.storages)} storages, {nbytes / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))
