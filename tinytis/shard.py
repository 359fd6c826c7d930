"""Sharding an evaluation grid over processes started by torchrun: each rank runs every world-th job, and rank 0
gets all results back in the order one process would have produced them.

    torchrun --nproc_per_node 2 eval.py niah    # gloo on CPU, nccl on GPU
"""
import os

import torch
import torch.distributed as dist


def init() -> tuple[int, int]:
    """(rank, world size): torchrun's, or (0, 1) in a plain run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def merge(results: dict[int, list], rank: int, world: int) -> list | None:
    """results: job index -> items, for this rank's jobs. On rank 0: every rank's items, ordered by job index;
    None on the other ranks."""
    if world == 1:
        return [item for _, items in sorted(results.items()) for item in items]
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(results, gathered, dst=0)
    if rank != 0:
        return None
    merged = {i: items for part in gathered for i, items in part.items()}
    return [item for _, items in sorted(merged.items()) for item in items]


def close(world: int):
    if world > 1:
        dist.destroy_process_group()
