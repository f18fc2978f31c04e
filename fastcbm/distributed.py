"""Device choice and torchrun process groups, shared by every job that may run on several processes (precompute,
training)."""

from __future__ import annotations

import datetime
import os

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: this process's GPU (``LOCAL_RANK`` under torchrun) when CUDA is available, else the CPU."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(device)


def init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world, we_initialised): initialise torch.distributed from torchrun's environment if needed."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    backend = "nccl" if device.type == "cuda" else "gloo"
    # a rank that finishes early waits at the final barrier: allow for long, unbalanced resumes
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=12))
    return dist.get_rank(), dist.get_world_size(), True
