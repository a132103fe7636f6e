"""Collectives our stages need beyond what accelerate offers."""

from __future__ import annotations

import torch


def gather_to_main(items: list, world_size: int) -> list | None:
    """Every process's ``items`` concatenated in rank order on the main process (rank 0); ``None`` on the others.

    accelerate's ``gather_object`` gives every process the whole list, which for large objects (edited images) only
    costs the other processes memory. Items must be picklable (they are our own rows, never user files).
    """
    if world_size == 1:
        return list(items)
    parts = [None] * world_size if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(items, parts, dst=0)
    return None if parts is None else [item for part in parts for item in part]
