"""Device choice shared by precompute and training: one GPU per torchrun process."""

from __future__ import annotations

import pytest
import torch

from fastcbm.distributed import init_distributed, resolve_device


@pytest.mark.parametrize("device, local_rank, cuda, expected", [
    ("cpu", None, True, torch.device("cpu")),
    ("auto", None, False, torch.device("cpu")),
    ("auto", None, True, torch.device("cuda", 0)),
    ("auto", "1", True, torch.device("cuda", 1)),
    ("cuda", "3", False, torch.device("cuda", 3)),  # --device cuda under torchrun: this rank's GPU, not GPU 0
    ("cuda:2", "3", False, torch.device("cuda", 2)),  # an explicit index is kept
    (torch.device("cuda"), None, False, torch.device("cuda", 0)),
])
def test_resolve_device(monkeypatch, device, local_rank, cuda, expected):
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resolve_device(device) == expected


def test_init_distributed_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed(torch.device("cpu")) == (0, 1, False)
