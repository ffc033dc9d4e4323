"""`loop layout MODEL`: where vLLM's own loader puts each weight of a model, and whether loop can train it in place.

Builds vLLM's model class for the folder in this process (plugin/offline.py: no engine, no server, parameters in
untouched host memory), runs the layout probe on it (loop/layout.py, the same code the plugin runs inside a serving
vLLM) and prints, per treatment, how many Hugging Face tensors got it, then every tensor that is not a view with the
reason. Exit 0 when every tensor is a view or vLLM's rows in another order (the worker can train the model in place),
1 when not, 2 on bad input.
Run it before serving a new model; `--json` prints the whole layout.

Tests: `.venv/bin/python -m pytest -q tests/unit/test_families.py -k layout`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
TRAINABLE = {"view", "rows"}  # loop/worker/views.py: views in place; rows as a copy written back in each pause


def register(sub: Any) -> None:
    p = sub.add_parser("layout", help="where vLLM keeps each weight of a model, and whether loop trains it in place",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a Hugging Face model folder (config.json; weights are not read)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="the dtype vLLM would serve (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the whole layout as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from loop import layout
    from plugin.offline import build_vllm_model

    folder = Path(args.model).expanduser()
    if not (folder / "config.json").is_file():
        print(f"loop layout: {folder} has no config.json; pass a Hugging Face model folder", file=sys.stderr)
        return 2
    with build_vllm_model(folder, dtype=getattr(torch, args.dtype), device="cpu") as built:
        derived = layout.derive(built.model, *layout.hf_probe_inputs(str(folder)))
        arch = built.architecture
    if args.json:
        print(json.dumps({"architecture": arch, **derived.to_json()}, indent=1))
    else:
        print(f"{arch}: {len(derived.tensors)} weights, derived in {derived.ms:.0f} ms")
        for kind, n in sorted(derived.kinds().items()):
            print(f"  {kind:12s} {n}")
        for name, placed in derived.tensors.items():
            if placed.kind != "view":
                print(f"  {name}: {placed.kind}: {placed.reason}")
    ok = set(derived.kinds()) <= TRAINABLE
    if not args.json:
        print("every weight is a view (or vLLM's rows, trained as a copy): loop trains this model in place" if ok
              else "not every weight is a view: loop's worker refuses this model")
    return 0 if ok else 1
