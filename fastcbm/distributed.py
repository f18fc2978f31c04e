"""Device choice and torchrun process groups, shared by every job that may run on several processes (precompute,
training)."""

from __future__ import annotations

import datetime
import os

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: a GPU when CUDA is available, else the CPU. A GPU without an index (``"auto"``, ``"cuda"``) is this
    process's own: ``LOCAL_RANK`` under torchrun (one process per GPU), else 0."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world, we_initialised): initialise torch.distributed from torchrun's environment if needed."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    if device.type == "cuda":
        # this process's GPU (LOCAL_RANK under torchrun, see resolve_device) becomes its current device before NCCL
        # binds the group to it; otherwise every rank would create its context and communicator on GPU 0
        torch.cuda.set_device(device if device.index is not None else int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device.type == "cuda" else "gloo"
    # a rank that finishes early waits at the final barrier: allow for long, unbalanced resumes
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=12))
    return dist.get_rank(), dist.get_world_size(), True
