"""Does the worker's group pattern (NCCL default group through a FileStore, a gloo host group, then an all_gather
of CUDA tensors) work on this host?  python3 tests/gpu/nccl_probe.py <variant>; prints one line per rank."""

import datetime
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank: int, world: int, path: str, variant: str) -> None:
    torch.cuda.set_device(rank)
    kw = {"device_id": torch.device("cuda", rank)} if "eager" in variant else {}
    dist.init_process_group("nccl", init_method=f"file://{path}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60), **kw)
    host = dist.new_group(backend="gloo") if "gloo" in variant else None
    if host is not None:
        t = torch.ones(2)
        dist.all_reduce(t, group=host)
    parts = [torch.empty(4, device="cuda") for _ in range(world)]
    dist.all_gather(parts, torch.full((4,), float(rank), device="cuda"))
    torch.cuda.synchronize()
    print(f"{variant} rank {rank}: ok {[p[0].item() for p in parts]}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    variant = sys.argv[1] if len(sys.argv) > 1 else "plain"
    path = os.path.join(tempfile.mkdtemp(), "rdv")
    mp.spawn(rank_main, args=(2, path, variant), nprocs=2)
