"""The deployable linear head (standardiser + weight/bias) and the one-call fit of a sparse head."""

from __future__ import annotations

import torch
from torch import nn

from fastcbm.heads.features import Standardizer, _check_features
from fastcbm.heads.sparse import PathEntry, PathResult, fit_elastic_net_path, select
from fastcbm.errors import InvalidArgument


class LinearHead(nn.Module):
    """logits = W·standardize(pooled) + b, for pooled concept activations ``[N, M]`` → logits ``[N, C]``.

    ``state_dict()`` holds ``weight [C, M]``, ``bias [C]``, ``standardizer.mean [M]`` and ``standardizer.std [M]``;
    :meth:`from_state_dict` rebuilds a head from it alone.
    """

    def __init__(self, num_features: int, num_classes: int, standardizer: Standardizer | None = None):
        super().__init__()
        if num_features < 1 or num_classes < 1:
            raise InvalidArgument(f"num_features and num_classes must be >= 1, got {num_features}, {num_classes}")
        if standardizer is not None and standardizer.num_features != num_features:
            raise InvalidArgument(f"standardizer has {standardizer.num_features} features, the head {num_features}")
        self.weight = nn.Parameter(torch.zeros(num_classes, num_features))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        # Identity statistics (mean 0, std 1) when the features are already standardised.
        self.standardizer = standardizer if standardizer is not None else Standardizer(num_features)

    @property
    def num_features(self) -> int:
        return self.weight.shape[1]

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @classmethod
    def from_entry(cls, entry: PathEntry, standardizer: Standardizer | None = None) -> "LinearHead":
        """A head with the weights of one path entry (or a dense fit)."""
        head = cls(entry.weight.shape[1], entry.weight.shape[0], standardizer)
        with torch.no_grad():
            head.weight.copy_(entry.weight)
            head.bias.copy_(entry.bias)
        return head

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "LinearHead":
        """Rebuild from ``state_dict()`` (shapes are read from the saved tensors)."""
        missing = {"weight", "bias", "standardizer.mean", "standardizer.std"} - set(state)
        if missing:
            raise InvalidArgument(f"state is missing {sorted(missing)}")
        c, m = state["weight"].shape
        head = cls(m, c)
        head.load_state_dict(state)
        return head

    def standardize(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.standardizer(pooled)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled ``[N, M]`` → logits ``[N, C]``."""
        if pooled.dim() != 2 or pooled.shape[1] != self.num_features:
            raise InvalidArgument(f"pooled must have shape [N, {self.num_features}], got {tuple(pooled.shape)}")
        return self.standardize(pooled) @ self.weight.T + self.bias

    def contributions(self, pooled: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Per-concept contributions W[c_n, m]·x̂[n, m] ``[N, M]`` to the logit of class ``classes[n]`` (``[N]``).

        They sum (over M) to the logit minus its bias.
        """
        if pooled.dim() != 2 or pooled.shape[1] != self.num_features:
            raise InvalidArgument(f"pooled must have shape [N, {self.num_features}], got {tuple(pooled.shape)}")
        if classes.shape != pooled.shape[:1]:
            raise InvalidArgument(f"classes must have shape [{pooled.shape[0]}], got {tuple(classes.shape)}")
        return self.standardize(pooled) * self.weight[classes.long()]

    def nnz_per_class(self) -> torch.Tensor:
        """Non-zero weights per class ``[C]``."""
        return (self.weight != 0).sum(1)

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, num_classes={self.num_classes}"


def fit_sparse_head(
    features: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    alpha: float = 0.99,
    criterion: str = "val_acc",
    max_nnz_per_class: float | None = None,
    eps: float = 1e-5,
    **path_kwargs,
) -> tuple[LinearHead, PathResult]:
    """Standardise raw pooled features ``[N, M]`` with their own statistics, fit the elastic-net path, select.

    ``val`` = raw ``(features_val, y_val)``, standardised with the training statistics. Remaining keyword arguments go
    to :func:`~fastcbm.heads.sparse.fit_elastic_net_path`. Returns the selected head and the whole path.
    """
    _check_features(features, "features")
    std = Standardizer.fit(features, eps=eps)
    val_std = None
    if val is not None:
        _check_features(val[0], "val[0]")
        val_std = (std.transform(val[0]), val[1])
    path = fit_elastic_net_path(std.transform(features), y, num_classes, alpha, val=val_std, **path_kwargs)
    entry = select(path, criterion=criterion, max_nnz_per_class=max_nnz_per_class)
    return LinearHead.from_entry(entry, std.cpu()), path
