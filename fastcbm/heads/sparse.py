"""Sparse linear head: elastic-net multinomial logistic regression along a regularisation path (GLM-SAGA).

Objective, for standardised features X [N, M], labels y [N], weights W [C, M] and an unregularised bias b [C]:

    F(W, b) = mean_i CE(W x_i + b, y_i) + λα‖W‖₁ + ½λ(1−α)‖W‖²_F

This is scikit-learn's ``LogisticRegression(l1_ratio=α, C=1/(N·λ))`` objective divided by N·C, so both have the
same minimiser. Solver: minibatch proximal SAGA as in GLM-SAGA (Wong et al. 2021): a table of per-sample
logit-gradients g_i = softmax(W x_i + b) − onehot(y_i) [N, C] stands in for the per-sample parameter gradients
g_i x_iᵀ (a linear model's gradient factorises), so the table costs N·C instead of N·C·M. Each step is a handful of
GEMMs on the device of X; no Python loop over samples.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastcbm.heads.features import _check_features
from fastcbm.errors import InvalidArgument

log = logging.getLogger(__name__)


@dataclass
class PathEntry:
    """The solution at one λ of the path. Tensors live on the CPU."""

    lam: float
    weight: torch.Tensor  # [C, M]
    bias: torch.Tensor  # [C]
    objective: float
    train_acc: float
    val_acc: float | None
    nnz_per_class: torch.Tensor  # [C] int64: non-zero weights per class
    epochs: int
    converged: bool

    @property
    def nnz(self) -> int:
        """Total number of non-zero weights."""
        return int(self.nnz_per_class.sum())

    @property
    def mean_nnz_per_class(self) -> float:
        return float(self.nnz_per_class.float().mean())


@dataclass
class PathResult:
    """A regularisation path: one :class:`PathEntry` per λ, in the order solved (descending λ for the auto path)."""

    entries: list[PathEntry]
    alpha: float
    lam_max: float
    num_classes: int
    num_features: int
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> PathEntry:
        return self.entries[i]

    @property
    def lambdas(self) -> list[float]:
        return [e.lam for e in self.entries]


def elastic_net_objective(X: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          lam: float, alpha: float) -> float:
    """F(W, b) = mean CE + λα‖W‖₁ + ½λ(1−α)‖W‖² for X [N, M], y [N], weight [C, M], bias [C] (float64 math)."""
    X64, W64, b64 = X.double(), weight.to(X.device).double(), bias.to(X.device).double()
    ce = F.cross_entropy(X64 @ W64.T + b64, y.to(X.device).long())
    return float(ce + lam * alpha * W64.abs().sum() + 0.5 * lam * (1 - alpha) * W64.square().sum())


def lambda_max(X: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float) -> float:
    """Smallest λ at which W = 0 is optimal: max|∇_W mean CE| at W = 0 with the optimal bias (log class priors) / α.

    As in glmnet, α is floored at 1e-3 so a pure ridge path still has a finite start.
    """
    counts = torch.bincount(y, minlength=num_classes).to(X.dtype)
    prior = counts / counts.sum()
    # ∇_W = (1/N) Σ_i (prior − onehot_i) x_iᵀ = prior·mean(X)ᵀ − (1/N)·onehotᵀX
    grad = prior[:, None] * X.mean(0)[None, :] - _onehot_t_x(X, y, num_classes) / X.shape[0]
    return float(grad.abs().max()) / max(alpha, 1e-3)


def _onehot_t_x(X: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Σ_i onehot(y_i) x_iᵀ → [C, M] (class sums) without materialising the one-hot matrix."""
    return torch.zeros(num_classes, X.shape[1], dtype=X.dtype, device=X.device).index_add_(0, y, X)


def _prox_elastic_net(w: torch.Tensor, step: float, lam: float, alpha: float) -> torch.Tensor:
    """prox of step·(λα‖·‖₁ + ½λ(1−α)‖·‖²): soft-threshold by step·λα, then shrink by 1/(1 + step·λ(1−α))."""
    thr = step * lam * alpha
    return torch.sign(w) * (w.abs() - thr).clamp_min(0) / (1.0 + step * lam * (1.0 - alpha))


def _lipschitz(X: torch.Tensor, iters: int = 30, seed: int = 0) -> tuple[float, float]:
    """(L, L_max) of the mean CE w.r.t. [W, b]: ½·λ_max(X̃ᵀX̃/N) and ½·max_i‖x̃_i‖², with x̃ = [x, 1].

    ½ bounds the largest eigenvalue of the softmax Hessian diag(p) − ppᵀ. λ_max by power iteration (a few GEMVs).
    """
    n = X.shape[0]
    l_max = 0.5 * float((X.square().sum(1) + 1).max())
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(X.shape[1] + 1, generator=g, dtype=torch.float64).to(X.device, X.dtype)
    ev = 0.0
    for _ in range(iters):
        xv = X @ v[:-1] + v[-1]
        u = torch.cat([X.T @ xv, xv.sum().reshape(1)]) / n
        ev = float(u.norm())
        if ev == 0:
            break
        v = u / ev
    # Power iteration approaches λ_max from below: pad a little so the step stays safe.
    return 0.5 * ev * 1.05, l_max


def _full_logit_grads(X, y, W, b, chunk):
    """Per-sample logit gradients softmax(XWᵀ+b) − onehot [N, C], the number correct, and the mean CE."""
    n = X.shape[0]
    out = torch.empty(n, W.shape[0], dtype=X.dtype, device=X.device)
    correct, ce = 0, 0.0
    for s in range(0, n, chunk):
        logits = X[s:s + chunk] @ W.T + b
        yy = y[s:s + chunk]
        ce += float(F.cross_entropy(logits.double(), yy, reduction="sum"))
        correct += int((logits.argmax(1) == yy).sum())
        p = torch.softmax(logits, dim=1)
        p[torch.arange(p.shape[0], device=p.device), yy] -= 1
        out[s:s + chunk] = p
    return out, correct, ce / n


def _accuracy(X, y, W, b, chunk) -> float:
    correct = 0
    for s in range(0, X.shape[0], chunk):
        correct += int(((X[s:s + chunk] @ W.T + b).argmax(1) == y[s:s + chunk]).sum())
    return correct / X.shape[0]


def check_problem(X: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[int, int]:
    """Validate a classification problem (features ``X [N, M]``, labels ``y [N]``); returns ``(N, M)``."""
    _check_features(X, "X")
    n, m = X.shape
    if not isinstance(num_classes, int) or num_classes < 2:
        raise InvalidArgument(f"num_classes must be an int >= 2, got {num_classes!r}")
    _check_labels(y, n, num_classes, "y")
    if n < 1:
        raise InvalidArgument("X must have at least one row")
    return n, m


def check_validation(val: tuple[torch.Tensor, torch.Tensor], m: int, num_classes: int, device: torch.device,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``val = (X_val [N_v, m], y_val [N_v])`` and move it to ``device`` (features as ``dtype``)."""
    Xv, yv = val
    _check_features(Xv, "val[0]")
    if Xv.shape[1] != m:
        raise InvalidArgument(f"val features must have {m} columns like X, got shape {tuple(Xv.shape)}")
    _check_labels(yv, Xv.shape[0], num_classes, "val[1]")
    return Xv.to(device, dtype), yv.to(device, torch.long)


def _check_labels(y, n, num_classes, name):
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != n:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise InvalidArgument(f"{name} must be a 1-D tensor of {n} labels, got {got}")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise InvalidArgument(f"{name} must hold integer class indices, got dtype {y.dtype}")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InvalidArgument(f"{name} must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")


def _saga(X, y, W, b, lam, alpha, step, max_epochs, tol, B, gen, rows, chunk):
    """Minibatch proximal SAGA at one λ from the warm start (W, b) → (W, b, epochs, converged)."""
    n = X.shape[0]
    # Fresh, exact table at the warm start: the SAGA average gradient starts unbiased at every λ.
    table, _, _ = _full_logit_grads(X, y, W, b, chunk)
    avg_W = table.T @ X / n  # [C, M]
    avg_b = table.mean(0)  # [C]
    converged, epoch = False, 0
    for epoch in range(1, max_epochs + 1):
        W_prev, b_prev = W.clone(), b.clone()
        perm = torch.randperm(n, generator=gen).to(X.device)
        for s in range(0, n, B):
            idx = perm[s:s + B]
            xb = X[idx]
            g_new = torch.softmax(xb @ W.T + b, dim=1)
            g_new[rows[:idx.shape[0]], y[idx]] -= 1
            d = g_new - table[idx]  # [B, C]
            dW = d.T @ xb  # [C, M]
            db = d.sum(0)
            # SAGA direction: fresh-minus-stale minibatch gradient plus the table average (unbiased).
            W = _prox_elastic_net(W - step * (dW / idx.shape[0] + avg_W), step, lam, alpha)
            b = b - step * (db / idx.shape[0] + avg_b)
            avg_W += dW / n
            avg_b += db / n
            table[idx] = g_new
        change = max(float((W - W_prev).abs().max()), float((b - b_prev).abs().max()))
        scale = max(float(W.abs().max()), float(b.abs().max()), 1.0)
        if not math.isfinite(change):
            raise FloatingPointError(f"elastic-net path diverged at λ={lam:.4g} (step {step:.3g}); pass a smaller lr")
        if change <= tol * scale:
            converged = True
            break
    return W, b, epoch, converged


def _mean_grad(X, Y, W, b, chunk):
    """∇ of the mean CE at (W, b) for one-hot labels ``Y [N, C]``: (dW [C, M], db [C]); chunked over rows."""
    n = X.shape[0]
    if n <= chunk:
        g = torch.softmax(torch.addmm(b, X, W.T), dim=1) - Y
        return g.T @ X / n, g.mean(0)
    gW, gb = torch.zeros_like(W), torch.zeros_like(b)
    for s in range(0, n, chunk):
        g = torch.softmax(torch.addmm(b, X[s:s + chunk], W.T), dim=1) - Y[s:s + chunk]
        gW += g.T @ X[s:s + chunk]
        gb += g.sum(0)
    return gW / n, gb / n


def _fista(X, y, W, b, lam, alpha, step, max_iter, tol, chunk):
    """Full-batch accelerated proximal gradient (FISTA, Beck & Teboulle 2009) with function-free adaptive restart
    (O'Donoghue & Candès 2015) at one λ from the warm start → (W, b, passes, converged).

    One pass = one gradient (two GEMMs over X). Stops when the gradient mapping max|θ − θ⁺|/step ≤ tol, i.e. the
    elastic-net optimality conditions hold to ``tol``; restart keeps the iterates monotone-ish on the flat parts
    of the path where momentum would overshoot the support."""
    yW, yb = W, b
    t = 1.0
    it, converged = 0, False
    Y = F.one_hot(y, W.shape[0]).to(X.dtype)
    for it in range(1, max_iter + 1):
        gW, gb = _mean_grad(X, Y, yW, yb, chunk)
        W_new = _prox_elastic_net(yW - step * gW, step, lam, alpha)
        b_new = yb - step * gb
        # optimality of the point the gradient was taken at (the proximal-gradient mapping)
        dW, db = yW - W_new, yb - b_new
        stats = torch.stack([torch.maximum(dW.abs().max(), db.abs().max()),
                             (dW * (W_new - W)).sum() + (db * (b_new - b)).sum()]).tolist()  # one sync
        gmap = stats[0] / step
        if not math.isfinite(gmap):
            raise FloatingPointError(f"elastic-net path diverged at λ={lam:.4g} (step {step:.3g}); pass a smaller lr")
        if gmap <= tol:
            W, b, converged = W_new, b_new, True
            break
        # restart when the step goes against the momentum direction
        if stats[1] > 0:
            t = 1.0
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        mom = (t - 1.0) / t_next
        yW = W_new + mom * (W_new - W)
        yb = b_new + mom * (b_new - b)
        W, b, t = W_new, b_new, t_next
    return W, b, it, converged


def fit_elastic_net_path(
    X: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    alpha: float = 0.99,
    lambdas: list[float] | torch.Tensor | None = None,
    *,
    n_lambdas: int = 30,
    epsilon: float = 1e-3,
    max_epochs: int | None = None,
    tol: float = 1e-4,
    batch_size: int = 256,
    lr: float | None = None,
    device: torch.device | str | None = None,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
    stop_nnz_per_class: float | None = None,
    solver: str = "auto",
    progress: bool = True,
) -> PathResult:
    """Solve the elastic-net multinomial logistic regression at each λ of a path, warm-starting along it.

    Args:
        X: standardised training features ``[N, M]`` (see :class:`~fastcbm.heads.Standardizer`).
        y: labels ``[N]`` in ``[0, num_classes)``.
        alpha: L1 share α ∈ [0, 1] of the penalty (GLM-SAGA / label-free CBM use 0.99).
        lambdas: explicit λ values (solved in the given order; descending warm-starts best). ``None``: ``n_lambdas``
            values log-spaced from λ_max (where W = 0 is optimal) down to λ_max·``epsilon``, as glmnet/GLM-SAGA do
            (30 by default: with warm starts and the nnz stop below, a finer path only costs time).
        max_epochs, tol: per λ, at most ``max_epochs`` passes over the data (default 100 for SAGA, 2,000 for the
            full-batch solver, whose passes are single cheap GEMMs). SAGA stops when an epoch changes the parameters
            by max|Δθ| ≤ tol·max(max|θ|, 1) (the scikit-learn SAGA criterion); the full-batch solver when the
            proximal-gradient mapping max|θ − prox(θ − s∇f)|/s ≤ tol (a first-order optimality measure).
        solver: ``"fista"`` (full-batch accelerated proximal gradient with adaptive restart, step 1/L from the
            exact Lipschitz bound: converges in tens to hundreds of passes), ``"saga"`` (minibatch GLM-SAGA: for
            data too large for full passes to be cheap), or ``"auto"`` (FISTA when N·M ≤ 5·10⁷, else SAGA).
        batch_size: SAGA minibatch size. ``lr``: step size; ``None`` picks 1/(2·L_B) from the minibatch smoothness
            L_B = [N(B−1)·L + (N−B)·L_max] / (B(N−1)) (Gazagnadou et al. 2019), with L and L_max from the ½ bound
            on the softmax Hessian (loose in practice, hence 1/2 rather than the worst-case 1/3).
        device: where to solve (default: the device of X); X and the [N, C] gradient table are moved there whole.
        val: optional standardised ``(X_val [N_v, M], y_val [N_v])`` for validation accuracy per λ.
        stop_nnz_per_class: stop the path once the mean number of non-zeros per class exceeds this (label-free CBM's
            sparsity target: the denser rest of the path is never solved).
        progress: show a tqdm bar over the path.

    Returns:
        :class:`PathResult` with, per λ, weight ``[C, M]``, bias ``[C]``, objective, train/val accuracy and
        non-zeros per class (all on the CPU).
    """
    n, m = check_problem(X, y, num_classes)
    if X.device.type == "cpu" and (device is None or torch.device(device).type == "cpu") and n * m <= 4_000_000 \
            and torch.get_num_threads() > 1:
        # a small problem is thousands of tiny GEMMs: one thread is faster than two, and far faster than two
        # oversubscribed ones on a shared machine (measured: the head's wall time swung 10.8 s → 239 s under load)
        from fastcbm.utils import torch_threads

        with torch_threads(1):
            return fit_elastic_net_path(X, y, num_classes, alpha, lambdas, n_lambdas=n_lambdas, epsilon=epsilon,
                                        max_epochs=max_epochs, tol=tol, batch_size=batch_size, lr=lr, device=device,
                                        val=val, seed=seed, stop_nnz_per_class=stop_nnz_per_class, solver=solver,
                                        progress=progress)
    solver, max_epochs = _checked_solver(n, m, alpha, solver, max_epochs, batch_size, tol, lr)
    dev = torch.device(device) if device is not None else X.device
    dtype = torch.float64 if X.dtype == torch.float64 else torch.float32
    X = X.to(dev, dtype).contiguous()
    y = y.to(dev, torch.long)
    Xv, yv = check_validation(val, m, num_classes, dev, dtype) if val is not None else (None, None)
    lam_max = lambda_max(X, y, num_classes, alpha)
    lam_list = _lambda_list(lambdas, lam_max, n_lambdas, epsilon)

    B = min(batch_size, n)
    L, L_max = _lipschitz(X, seed=seed)
    L_B = (n * (B - 1) * L + (n - B) * L_max) / (B * (n - 1)) if n > 1 else L_max
    step = lr if lr is not None else 1.0 / (2.0 * L_B)
    chunk = max(B, 65536)

    # Warm start at the λ_max solution: W = 0, bias = log class priors (the exact optimum there).
    counts = torch.bincount(y, minlength=num_classes).to(dtype)
    W = torch.zeros(num_classes, m, dtype=dtype, device=dev)
    b = torch.log(counts.clamp_min(0.5) / n)
    b -= b.mean()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows = torch.arange(B, device=dev)

    entries: list[PathEntry] = []
    bar = tqdm(lam_list, desc="elastic-net path", disable=not progress, leave=False)
    full_step = 1.0 / L  # full-batch step: L bounds the Hessian of the mean CE in [W, b]
    for lam in bar:
        if solver == "fista":
            W, b, epoch, converged = _fista(X, y, W, b, lam, alpha, lr if lr is not None else full_step, max_epochs,
                                            tol, chunk)
        else:
            W, b, epoch, converged = _saga(X, y, W, b, lam, alpha, step, max_epochs, tol, B, gen, rows, chunk)
        entry = _path_entry(X, y, W, b, lam, alpha, Xv, yv, chunk, epoch, converged)
        entries.append(entry)
        if not converged:
            log.info("λ=%.4g: not converged after %d %s", lam, max_epochs,
                     "passes" if solver == "fista" else "epochs")
        bar.set_postfix(lam=f"{lam:.3g}", nnz=f"{entry.mean_nnz_per_class:.1f}/cls", acc=f"{entry.train_acc:.3f}",
                        **({"val": f"{entry.val_acc:.3f}"} if entry.val_acc is not None else {}))
        if stop_nnz_per_class is not None and entry.mean_nnz_per_class > stop_nnz_per_class:
            break
    bar.close()
    unconverged = sum(not e.converged for e in entries)
    if unconverged:
        log.warning("elastic-net path: %d of %d λ values stopped at max_epochs=%d before reaching tol=%g; raise "
                    "max_epochs (fastcbm train --head-epochs) for an exact path", unconverged, len(entries),
                    max_epochs, tol)
    return PathResult(entries=entries, alpha=alpha, lam_max=lam_max, num_classes=num_classes, num_features=m,
                      info={"step": step if solver == "saga" else (lr or full_step), "solver": solver, "L": L,
                            "L_max": L_max, "batch_size": B, "device": str(dev),
                            "unconverged": unconverged})


def _checked_solver(n: int, m: int, alpha: float, solver: str, max_epochs: int | None, batch_size: int, tol: float,
                    lr: float | None) -> tuple[str, int]:
    """Validate the path settings → ``(solver, max_epochs)`` with "auto" and the per-solver default resolved."""
    if not 0.0 <= alpha <= 1.0:
        raise InvalidArgument(f"alpha must lie in [0, 1], got {alpha!r}")
    if solver not in ("auto", "fista", "saga"):
        raise InvalidArgument(f"solver must be 'auto', 'fista' or 'saga', got {solver!r}")
    if solver == "auto":
        solver = "fista" if n * m <= 50_000_000 else "saga"
    if max_epochs is None:
        max_epochs = 2000 if solver == "fista" else 100
    if max_epochs < 1 or batch_size < 1 or not tol > 0:
        raise InvalidArgument(f"max_epochs and batch_size must be >= 1 and tol > 0, got {max_epochs}, {batch_size}, "
                              f"{tol}")
    if lr is not None and not lr > 0:
        raise InvalidArgument(f"lr must be > 0, got {lr!r}")
    return solver, max_epochs


def _lambda_list(lambdas, lam_max: float, n_lambdas: int, epsilon: float) -> list[float]:
    """The λ values of the path: given, or ``n_lambdas`` log-spaced from just above λ_max down to λ_max·epsilon."""
    if lambdas is None:
        if n_lambdas < 1 or not 0 < epsilon <= 1:
            raise InvalidArgument(f"n_lambdas must be >= 1 and epsilon in (0, 1], got {n_lambdas}, {epsilon}")
        # Start a hair above λ_max so rounding in the table average cannot leak a non-zero into the first entry.
        top = max(lam_max, 1e-12) * (1 + 1e-5)
        return torch.logspace(math.log10(top), math.log10(top * epsilon), n_lambdas, dtype=torch.float64).tolist()
    lam_list = [float(v) for v in (lambdas.tolist() if isinstance(lambdas, torch.Tensor) else lambdas)]
    if not lam_list or any(not v >= 0 for v in lam_list):
        raise InvalidArgument(f"lambdas must be a non-empty list of values >= 0, got {lam_list}")
    return lam_list


def _path_entry(X, y, W, b, lam: float, alpha: float, Xv, yv, chunk: int, epoch: int, converged: bool) -> PathEntry:
    """The solution at one λ with its objective, accuracies and sparsity (tensors copied to the CPU)."""
    _, correct, ce = _full_logit_grads(X, y, W, b, chunk)
    obj = ce + lam * alpha * float(W.abs().sum()) + 0.5 * lam * (1 - alpha) * float(W.square().sum())
    val_acc = _accuracy(Xv, yv, W, b, chunk) if Xv is not None else None
    return PathEntry(lam=lam, weight=W.detach().cpu().clone(), bias=b.detach().cpu().clone(), objective=obj,
                     train_acc=correct / X.shape[0], val_acc=val_acc, nnz_per_class=(W != 0).sum(1).cpu(),
                     epochs=epoch, converged=converged)


def select(path: PathResult, criterion: str = "val_acc", max_nnz_per_class: float | None = None) -> PathEntry:
    """Pick one λ from a path.

    Only entries whose mean number of non-zero weights per class is ≤ ``max_nnz_per_class`` (if given) compete.
    ``criterion="val_acc"``: the highest validation accuracy (training accuracy when the path has no validation
    set), ties going to the sparser entry. ``criterion="sparsity"``: the densest entry within the budget (the
    one using the budget best; needs ``max_nnz_per_class``), ties going to the higher accuracy.
    """
    if criterion not in ("val_acc", "sparsity"):
        raise InvalidArgument(f"criterion must be 'val_acc' or 'sparsity', got {criterion!r}")
    if not path.entries:
        raise InvalidArgument("path has no entries")
    if criterion == "sparsity" and max_nnz_per_class is None:
        raise InvalidArgument("criterion='sparsity' needs max_nnz_per_class (the non-zeros-per-class budget)")
    feasible = [e for e in path.entries if max_nnz_per_class is None or e.mean_nnz_per_class <= max_nnz_per_class]
    if not feasible:
        least = min(e.mean_nnz_per_class for e in path.entries)
        raise InvalidArgument(f"no λ on the path has <= {max_nnz_per_class} non-zeros per class (sparsest: {least:.1f})")
    has_val = all(e.val_acc is not None for e in feasible)
    if criterion == "val_acc" and not has_val:
        log.warning("select: the path has no validation accuracy; selecting by training accuracy")

    def acc(e: PathEntry) -> float:
        return e.val_acc if has_val else e.train_acc

    if criterion == "val_acc":
        return max(feasible, key=lambda e: (acc(e), -e.nnz))
    return max(feasible, key=lambda e: (e.nnz, acc(e)))
