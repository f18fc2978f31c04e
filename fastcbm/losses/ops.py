"""Fused SALF-CBM cubic-cosine loss: never holds the [B, M·L] outputs or targets.

Definition (``fastcbm.losses.reference``): q[b, m, l] = Σ_c W[m, c]·F[b, c, l] (the 1×1-conv concept bottleneck),
p[b, m, l] = Σ_d E[b, l, d]·T[m, d] (CLIP prompt/text similarities); per column k = (m, l), with a = q − mean_b q and
b = p − mean_b p: cos_k = Σ a³b³ / ((√Σa⁶ + eps)(√Σb⁶ + eps)); loss = −mean_k cos_k.

How the fused op avoids [B, K] memory (K = M·L):

* Means are linear: mean_b q = W·mean_b(F) and mean_b p = mean_b(E)·Tᵀ, both [L, M], computed first (the batch
  sums in the input dtype with torch's cascade summation, the products and the centring in fp64).
* Forward: one streaming pass over batch tiles computes q and p for the tile (GEMMs) and accumulates per column, in
  fp64, S_ab = Σa³b³, S_aa = Σa⁶, S_bb = Σb⁶, plus S_a2b3 = Σa²b³ and S_a5 = Σa⁵ for the backward pass.
* Backward (flash-attention style, recomputing the tiles): with u = a³, v = b³, n_u = ‖u‖, D_u = n_u + eps (same for v)
  and s = ∂L/∂cos_k = −grad/K,
      ∂L/∂a_i = 3s·a_i²·(v_i/(D_u D_v) − cos·u_i/(n_u D_u)) =: a_i²(α b_i³ − β a_i³)   (β = 0 when n_u = 0).
  Centring a = q − mean_b q has Jacobian I − 1/B, so ∂L/∂q_i = ∂L/∂a_i − ḡ with ḡ = mean_i ∂L/∂a_i =
  (α S_a2b3 − β S_a5)/B, known from the forward sums. Then dW += g_qᵀ·F and dF = W·g_q per tile.

Scaled or standardised targets need no support: centring removes any per-column shift and the normalisation any
positive per-column scale (cubing keeps the sign), so the loss is invariant to per-concept affine maps of p with positive
scale, per-batch standardisation included.

Extra memory: O(K) sums plus O(tile·K) and O(tile·L·(C + D)) tile buffers (``batch_tile``). Gradients flow to ``weight`` and ``features``; ``prompt_emb`` and
``text_emb`` are targets (CLIP embeddings) and the fused backends refuse them when they require grad (use
``backend="reference"`` to differentiate through the targets).

Data parallel (``process_group``): each process passes its own rows of the batch. The loss is a function of batch
statistics that are all sums over rows, so the batch sums of F and E (→ the means), the five column sums and the
weight gradient are all-reduced (SUM); ``dF`` stays per row. Every process then gets the loss and ``dW`` of the whole
batch — what one process would compute on the concatenated rows, up to summation order — so identical optimiser
steps keep the replicas of ``W`` equal without a DDP wrapper (which would average, not sum, the gradients).

Backends (``launchers.py``): ``reference`` (materialises, autograd); ``cpu`` (torch GEMMs per batch tile plus one
C++/OpenMP kernel per tile for the fused elementwise accumulate/gradient step — the GEMMs are ~80 % of the time and
torch's MKL/oneDNN GEMM runs at ~170 GFLOP/s on the 2-core dev machine, which a simple blocked C++ GEMM would not
approach, so no hand-written GEMM was built); ``triton`` (fused q/p GEMM + accumulation kernels, kernels/losses.py);
``cuda`` (the ``cpu`` design on a GPU: cuBLAS GEMMs per tile + CUDA twins of the C++ elementwise kernels).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fastcbm import backends
from fastcbm.errors import InvalidArgument
from fastcbm.losses import launchers as L
from fastcbm.losses.reference import EPS, cubic_cosine_loss_reference

OP = "losses.cubic_cosine_loss"
_CPU_TILE_ELEMS = 1 << 22  # cpu backend: 16 MB per fp32 tile buffer (2x faster copies than 8 MB, same GEMM speed)
_GPU_TILE_ELEMS = 1 << 24  # GPU backends: each per-tile buffer ([tile, L, M] gradients, q, p), 64 MB in fp32


def _check_inputs(weight, features, prompt_emb, text_emb, min_batch: int = 2) -> tuple[int, int, int, int, int]:
    """Validate shapes/dtypes/devices; return (B, C, L, D, M)."""
    named = {"weight": weight, "features": features, "prompt_emb": prompt_emb, "text_emb": text_emb}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise InvalidArgument(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise InvalidArgument(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    for name, t, nd, spec in (("weight", weight, 2, "[M, C]"), ("features", features, 3, "[B, C, L]"),
                              ("prompt_emb", prompt_emb, 3, "[B, L, D]"), ("text_emb", text_emb, 2, "[M, D]")):
        if t.dim() != nd:
            raise InvalidArgument(f"{name} must be {spec}, got shape {tuple(t.shape)}")
    M, C = weight.shape
    B, C2, L = features.shape
    if C2 != C:
        raise InvalidArgument(f"features must be [B, C={C}, L] to match weight [M, C]; got shape {tuple(features.shape)}")
    if tuple(prompt_emb.shape[:2]) != (B, L):
        raise InvalidArgument(f"prompt_emb must be [B={B}, L={L}, D] to match features; got {tuple(prompt_emb.shape)}")
    D = prompt_emb.shape[2]
    if tuple(text_emb.shape) != (M, D):
        raise InvalidArgument(f"text_emb must be [M={M}, D={D}] to match weight and prompt_emb; got {tuple(text_emb.shape)}")
    if B < min_batch:
        raise InvalidArgument(f"features: need a batch of at least {min_batch} samples (columns are centred over it), "
                         f"got B={B}")
    for name, t in named.items():
        if t.dtype != weight.dtype:
            raise InvalidArgument(f"{name} has dtype {t.dtype}, expected weight's dtype {weight.dtype}")
        if t.device != weight.device:
            raise InvalidArgument(f"{name} is on {t.device}, expected weight's device {weight.device}")
    return B, C, L, D, M


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _batch_means(W, F, E, T, group=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """mean_b q and mean_b p as contiguous fp64 [L·M] vectors (column order (l, m)), without forming q or p, and the
    (global) batch size."""
    # torch's sum is a cascade (pairwise-like) summation, accurate to a few ulps in the input dtype; a dtype=float64
    # reduction would materialise a float64 copy of the whole input (and is ~7x slower).
    f_sum, e_sum = F.sum(dim=0).double(), E.sum(dim=0).double()  # [C, L], [L, D]
    n = F.shape[0]
    if group is not None:
        packed = _all_reduce(torch.cat([f_sum.reshape(-1), e_sum.reshape(-1), f_sum.new_tensor([n])]), group)
        f_sum, e_sum = packed[:f_sum.numel()].view_as(f_sum), packed[f_sum.numel():-1].view_as(e_sum)
        n = int(packed[-1])
    f_mean, e_mean = f_sum / n, e_sum / n
    mu_q = f_mean.t() @ W.t().double()  # [L, M]
    mu_p = e_mean @ T.t().double()  # [L, M]
    return mu_q.reshape(-1).contiguous(), mu_p.reshape(-1).contiguous(), n


def _cosines(sums: torch.Tensor, eps: float) -> torch.Tensor:
    """[5, K] fp64 sums -> per-column cosines [K] with the reference's epsilon semantics."""
    return sums[0] / ((sums[1].sqrt() + eps) * (sums[2].sqrt() + eps))


def _coefficients(sums: torch.Tensor, grad: torch.Tensor, batch: int, eps: float) -> torch.Tensor:
    """Per-column (α, β, ḡ) as a contiguous [3, K] fp64 tensor, for g_q = a²(α b³ − β a³) − ḡ."""
    s_ab, s_aa, s_bb, s_a2b3, s_a5 = sums
    n_u, n_v = s_aa.sqrt(), s_bb.sqrt()
    du, dv = n_u + eps, n_v + eps
    cos = s_ab / (du * dv)
    s = -3.0 * grad.double() / sums.shape[1]
    alpha = s / (du * dv)
    # u = 0 exactly when n_u = 0, so the β term vanishes; guard the division.
    beta = torch.where(n_u > 0, s * cos / (n_u.clamp_min(torch.finfo(torch.float64).tiny) * du), 0.0)
    gbar = (alpha * s_a2b3 - beta * s_a5) / batch
    return torch.stack([alpha, beta, gbar]).contiguous()


def _tile_rows(batch: int, per_row: int, batch_tile: int | None, budget: int) -> int:
    """Batch rows per tile: ``batch_tile`` if given, else as many as keep each per-tile buffer under ``budget``."""
    if batch_tile is not None:
        if batch_tile < 1:
            raise InvalidArgument(f"batch_tile must be >= 1, got {batch_tile}")
        return min(batch_tile, batch)
    return max(1, min(batch, budget // max(per_row, 1)))


backends.define_op(OP, {"default": {"reference": cubic_cosine_loss_reference, "cpu": L.CPU, "triton": L.TRITON,
                                    "cuda": L.CUDA}})


class CubicCosineLossFunction(torch.autograd.Function):
    """Fused forward (streaming sums) and backward (recomputed tiles) of the cubic-cosine loss."""

    @staticmethod
    def forward(ctx, weight, features, prompt_emb, text_emb, fused: L.FusedLoss, tile: int, eps: float, group=None):
        W, F, E, T = (t.detach() for t in (weight, features, prompt_emb, text_emb))
        mu_q, mu_p, n = _batch_means(W, F, E, T, group)
        sums = _all_reduce(fused.forward(W, F, E, T, mu_q, mu_p, tile), group)
        ctx.save_for_backward(W, F, E, T, mu_q, mu_p, sums)
        ctx.fused, ctx.tile, ctx.eps, ctx.group, ctx.batch = fused, tile, eps, group, n
        return (-_cosines(sums, eps).mean()).to(weight.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        W, F, E, T, mu_q, mu_p, sums = ctx.saved_tensors
        need_dw, need_df = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dw or need_df):
            return (None,) * 8
        coefs = _coefficients(sums, grad, ctx.batch, ctx.eps)
        dW, dF = ctx.fused.backward(W, F, E, T, mu_q, mu_p, coefs, ctx.tile, need_dw, need_df)
        if dW is not None and ctx.group is not None:
            dW = _all_reduce(dW.contiguous(), ctx.group)
        return dW, dF, None, None, None, None, None, None


def cubic_cosine_loss(
    weight: torch.Tensor,
    features: torch.Tensor,
    prompt_emb: torch.Tensor,
    text_emb: torch.Tensor,
    backend: str = "auto",
    *,
    eps: float = EPS,
    batch_tile: int | None = None,
    process_group=None,
) -> torch.Tensor:
    """SALF-CBM cubic-cosine loss of the concept bottleneck, without materialising [B, M·L] outputs or targets.

    Args:
        weight: concept bottleneck W_c [M, C] (a 1×1 conv without bias); gradients flow to it.
        features: backbone feature maps resized to the prompt grid, [B, C, L] (L cells); gradients flow to it.
        prompt_emb: unit CLIP embeddings of the L prompted copies of each image, [B, L, D] (targets, no gradient).
        text_emb: unit CLIP text embeddings of the M concepts, [M, D] (targets, no gradient).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"`` (see ``fastcbm.backends``).
        eps: added to each column norm (``x / (‖x‖ + eps)``), as in the reference.
        batch_tile: batch rows per streamed tile (default: ~4M elements per tile buffer on CPU, 16M on GPU).
        process_group: a ``torch.distributed`` group (e.g. ``torch.distributed.group.WORLD``) whose processes each
            pass their own rows of one batch: the loss and ``weight``'s gradient are those of the whole batch on
            every process (fused backends only; B >= 1 per process, >= 2 in all).

    Returns:
        The scalar loss ``-mean over the M·L columns of the cubic cosine``, in the inputs' dtype. Needs B >= 2.
    """
    B, C, L, D, M = _check_inputs(weight, features, prompt_emb, text_emb, min_batch=1 if process_group else 2)
    impl = backends.resolve(OP, backend, weight.device)
    name = impl.backend
    if name == "reference":
        if process_group is not None:
            raise InvalidArgument("process_group: the reference backend is single-process; use a fused backend")
        return impl.fn(weight, features, prompt_emb, text_emb, eps)
    if torch.is_grad_enabled():
        for arg, t in (("prompt_emb", prompt_emb), ("text_emb", text_emb)):
            if t.requires_grad:
                raise InvalidArgument(
                    f"{arg} requires grad, but the fused {name!r} backend only differentiates weight and features; "
                    f"pass {arg}.detach() or use backend='reference'"
                )
    if weight.dtype not in (torch.float32, torch.float64):
        # Cubing triples relative errors and sixth powers overflow fp16: the fused backends compute in fp32/fp64.
        raise InvalidArgument(f"weight: the fused {name!r} backend takes float32 or float64, got {weight.dtype}; "
                         "cast the inputs with .float() or use backend='reference'")
    budget = _CPU_TILE_ELEMS if weight.device.type == "cpu" else _GPU_TILE_ELEMS
    # Per-tile buffers are [tile, M·L] (q, p, g) and [tile, L, C] / [tile, L, D] (re-laid-out features/embeddings).
    tile = _tile_rows(B, L * max(M, C, D), batch_tile, budget)
    return CubicCosineLossFunction.apply(weight, features, prompt_emb, text_emb, impl.fn, tile, eps, process_group)
