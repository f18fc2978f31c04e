"""Dense linear head: multinomial logistic regression with an L2 penalty (the non-sparse option).

Objective: mean CE + ½·weight_decay·‖W‖² (bias unregularised) — the elastic net with α = 0, so the result is a
:class:`~fastcbm.heads.sparse.PathEntry` like one point of a sparse path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastcbm.heads.sparse import PathEntry, _accuracy, check_problem, check_validation, elastic_net_objective
from fastcbm.errors import InvalidArgument


def fit_dense_head(
    X: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    weight_decay: float = 1e-4,
    epochs: int = 100,
    *,
    optimizer: str = "lbfgs",
    lr: float | None = None,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> PathEntry:
    """Fit W [C, M], b [C] on standardised features X [N, M] and labels y [N].

    ``optimizer="lbfgs"``: full-batch L-BFGS with a strong-Wolfe line search, ``epochs`` outer iterations of up to 20
    evaluations each (best for data that fits on the device). ``optimizer="adam"``: minibatch Adam for ``epochs``
    passes with cosine-decayed ``lr`` (default 1e-2). ``val`` = ``(X_val, y_val)`` adds validation accuracy.
    """
    n, m = check_problem(X, y, num_classes)
    if not weight_decay >= 0:
        raise InvalidArgument(f"weight_decay must be >= 0, got {weight_decay!r}")
    if optimizer not in ("lbfgs", "adam"):
        raise InvalidArgument(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
    if epochs < 1 or batch_size < 1:
        raise InvalidArgument(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    dev = torch.device(device) if device is not None else X.device
    dtype = torch.float64 if X.dtype == torch.float64 else torch.float32
    X, y = X.to(dev, dtype), y.to(dev, torch.long)

    W = torch.zeros(num_classes, m, dtype=dtype, device=dev, requires_grad=True)
    counts = torch.bincount(y, minlength=num_classes).to(dtype)
    b = torch.log(counts.clamp_min(0.5) / n).requires_grad_(True)

    def loss_fn(xb, yb):
        return F.cross_entropy(xb @ W.T + b, yb) + 0.5 * weight_decay * W.square().sum()

    epochs_done = 0
    converged = False
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS([W, b], lr=lr or 1.0, max_iter=20, history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-9, tolerance_change=1e-12)

        def closure():
            opt.zero_grad()
            loss = loss_fn(X, y)
            loss.backward()
            return loss

        prev = float("inf")
        for epochs_done in tqdm(range(1, epochs + 1), desc="dense head (L-BFGS)", disable=not progress, leave=False):
            cur = float(opt.step(closure).detach())
            if abs(prev - cur) <= 1e-10 * max(abs(cur), 1.0):
                converged = True
                break
            prev = cur
    else:
        opt = torch.optim.Adam([W, b], lr=lr or 1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for epochs_done in tqdm(range(1, epochs + 1), desc="dense head (Adam)", disable=not progress, leave=False):
            perm = torch.randperm(n, generator=gen).to(dev)
            for s in range(0, n, batch_size):
                idx = perm[s:s + batch_size]
                opt.zero_grad()
                loss_fn(X[idx], y[idx]).backward()
                opt.step()
            sched.step()
        converged = True  # a fixed schedule: "converged" means it ran to the end

    W, b = W.detach(), b.detach()
    val_acc = None
    if val is not None:
        Xv, yv = check_validation(val, m, num_classes, dev, dtype)
        val_acc = _accuracy(Xv, yv, W, b, 65536)
    return PathEntry(lam=float(weight_decay), weight=W.cpu().clone(), bias=b.cpu().clone(),
                     objective=elastic_net_objective(X, y, W, b, weight_decay, 0.0),
                     train_acc=_accuracy(X, y, W, b, 65536), val_acc=val_acc,
                     nnz_per_class=(W != 0).sum(1).cpu(), epochs=epochs_done, converged=converged)
