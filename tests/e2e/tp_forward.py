"""One rank of the tensor-parallel test's own forward (tests/e2e/test_tensor_parallel_e2e.py): attach to vLLM rank
RANK's weights, build the HF model on them with the worker's tensor-parallel modules, and (rank 0) write the
prompt log-probs of IDS to OUT. Reads only.
    python -m tests.e2e.tp_forward RUNTIME_DIR RENDEZVOUS IDS_JSON OUT RANK
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from loop.worker.tp import init_group
from loop.worker.views import load_model_from_handles


def main() -> None:
    runtime_dir, rendezvous, ids_json, out, rank = sys.argv[1:6]
    torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tp = init_group(int(rank), 2, Path(rendezvous), device)
    model, _ = load_model_from_handles(runtime_dir, tp=tp, wait_s=30)
    ids = json.loads(ids_json)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids], device=next(model.parameters()).device)).logits[0].float(),
                               dim=-1)
    if tp.rank == 0:
        Path(out).write_text(json.dumps([lp[i - 1, ids[i]].item() for i in range(1, len(ids))]))


if __name__ == "__main__":
    main()
