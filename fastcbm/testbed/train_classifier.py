"""Supervised training of the testbed classifiers (CNN and ViT) on the rule task."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastcbm.data import synthetic as S
from fastcbm.models import testbed as T
from fastcbm.utils import torch_threads
from fastcbm.errors import InvalidArgument

POOL_SEED = 500_000


def train_classifier(kind: str, out: str | Path, steps: int = 1200, batch_size: int = 96, lr: float = 2e-3,
                     seed: int = 0, progress: bool = True) -> dict:
    """Train ``kind`` ("cnn" or "vit"); writes ``out/testbed_<kind>.safetensors``; returns the test accuracy."""
    from tqdm.auto import tqdm

    from fastcbm.testbed.evaluate import evaluate_classifier

    if kind not in ("cnn", "vit"):
        raise InvalidArgument(f"kind must be 'cnn' or 'vit', got {kind!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch_threads(1):  # many small ops: one thread is fast here and deterministic
        torch.manual_seed(seed)
        pool = [S.generate(1024, seed=POOL_SEED + k) for k in range(8)]
        model = T.TinyResNet() if kind == "cnn" else T.make_vit()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
        gen = torch.Generator().manual_seed(seed)
        t0 = time.time()
        for step in tqdm(range(steps), desc=f"testbed {kind}", disable=not progress):
            for group in opt.param_groups:
                group["lr"] = lr * min(1, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
            src = pool[int(torch.randint(len(pool), (1,), generator=gen))]
            idx = torch.randint(len(src), (batch_size,), generator=gen)
            x, y = T.normalize(src.images[idx]), src.labels[idx]
            if torch.rand(1, generator=gen) < 0.5:  # the rule task is mirror-invariant
                x = x.flip(3)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        path = out / T.WEIGHTS[kind]
        T.save_weights(model, path)
        fresh = T.TinyResNet() if kind == "cnn" else T.make_vit()
        acc = evaluate_classifier(T.load_weights(fresh, kind, path))
    return {f"{kind}_accuracy": acc, "train_seconds": round(time.time() - t0, 1)}
