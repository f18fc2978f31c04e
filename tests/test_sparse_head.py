"""Sparse (GLM-SAGA elastic net) and dense linear heads, pooling and standardisation."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch

from fastcbm.heads import (
    LinearHead,
    PathEntry,
    PathResult,
    Standardizer,
    elastic_net_objective,
    fit_dense_head,
    fit_elastic_net_path,
    fit_sparse_head,
    lambda_max,
    pool_concept_maps,
    select,
)
from tests.conftest import assert_close, devices_under_test


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=300, m=20, c=4, seed=0, offset=2.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, m, generator=g) * 3 + offset
    w = torch.randn(c, m, generator=g) * (torch.rand(c, m, generator=g) < 0.3)
    y = torch.multinomial(torch.softmax((X - offset) @ w.T / 3, 1), 1, generator=g).squeeze(1)
    return X, y


@pytest.fixture(scope="module")
def std_data():
    X, y = _data()
    return Standardizer.fit(X).transform(X), y


# ------------------------------------------------------------------------------------------------ objective vs sklearn
@pytest.mark.parametrize("alpha", [0.99, 0.5])
@pytest.mark.parametrize("frac", [0.2, 0.03])
def test_objective_matches_sklearn(std_data, alpha, frac):
    from sklearn.linear_model import LogisticRegression

    X, y = std_data
    n, c = X.shape[0], 4
    lam = lambda_max(X, y, c, alpha) * frac
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning / deprecations are not what we test
        sk = LogisticRegression(C=1 / (n * lam), l1_ratio=alpha, solver="saga", tol=1e-6, max_iter=20000)
        sk.fit(X.double().numpy(), y.numpy())
    ref = elastic_net_objective(X, y, torch.from_numpy(sk.coef_), torch.from_numpy(sk.intercept_), lam, alpha)
    lams = np.geomspace(lambda_max(X, y, c, alpha), lam, 5).tolist()
    path = fit_elastic_net_path(X, y, c, alpha, lambdas=lams, batch_size=64, tol=1e-4, max_epochs=300, progress=False)
    got = path[-1]
    # the reported objective is the documented formula at the returned weights
    assert got.objective == pytest.approx(elastic_net_objective(X, y, got.weight, got.bias, lam, alpha), rel=1e-6)
    assert abs(got.objective - ref) <= 0.01 * ref, f"ours {got.objective:.6f} vs scikit-learn {ref:.6f}"
    nnz_sk = int((sk.coef_ != 0).sum())
    assert abs(got.nnz - nnz_sk) <= max(3, 0.15 * nnz_sk)


def test_full_batch_and_float64_agree(std_data):
    X, y = std_data
    lam = lambda_max(X, y, 4, 0.9) * 0.05
    a = fit_elastic_net_path(X, y, 4, 0.9, lambdas=[lam], batch_size=10_000, max_epochs=2000, progress=False)[0]
    b = fit_elastic_net_path(X.double(), y, 4, 0.9, lambdas=[lam], batch_size=17, progress=False)[0]
    assert a.weight.dtype == torch.float32 and b.weight.dtype == torch.float64
    assert a.objective == pytest.approx(b.objective, rel=1e-3)


# ---------------------------------------------------------------------------------------------------------- the path
def test_path_sparsity_grows_and_warm_start(std_data):
    X, y = std_data
    path = fit_elastic_net_path(X, y, 4, n_lambdas=8, epsilon=1e-2, batch_size=64, progress=False)
    assert len(path) == 8 and path.lambdas == sorted(path.lambdas, reverse=True)
    assert path.lam_max == pytest.approx(path.lambdas[0], rel=1e-4)
    nnz = [e.nnz for e in path.entries]
    assert nnz[0] == 0, "W = 0 is optimal at λ_max"
    assert all(b >= a - 1 for a, b in zip(nnz, nnz[1:])), nnz
    assert nnz[-1] > nnz[len(nnz) // 2] > 0
    assert path[-1].train_acc > path[0].train_acc
    for e in path.entries:
        assert e.weight.shape == (4, 20) and e.bias.shape == (4,) and e.nnz_per_class.shape == (4,)
        assert e.converged and e.val_acc is None and math.isfinite(e.objective)
    # objectives along a descending-λ path decrease (smaller penalty, warm-started)
    objs = [e.objective for e in path.entries]
    assert all(b <= a + 1e-6 for a, b in zip(objs, objs[1:]))


def test_bias_unregularised_strong_prior():
    # Noise features, 90 % / 5 % / 5 % classes: at λ ≥ λ_max the model is the prior, carried by the bias alone.
    g = torch.Generator().manual_seed(1)
    n = 400
    y = torch.zeros(n, dtype=torch.long)
    y[:20], y[20:40] = 1, 2
    X = torch.randn(n, 6, generator=g)
    X = (X - X.mean(0)) / X.std(0)
    lam = lambda_max(X, y, 3, 0.99) * 1.5
    e = fit_elastic_net_path(X, y, 3, 0.99, lambdas=[lam], batch_size=32, progress=False)[0]
    assert e.nnz == 0
    assert_close(torch.softmax(e.bias, 0), torch.tensor([0.9, 0.05, 0.05]), atol=2e-3, rtol=0, what="softmax(bias)")
    assert e.train_acc == pytest.approx(0.9)


def test_val_accuracy_stop_and_select(std_data):
    X, y = std_data
    path = fit_elastic_net_path(X[:200], y[:200], 4, n_lambdas=20, val=(X[200:], y[200:]), stop_nnz_per_class=3,
                                batch_size=50, progress=False)
    assert len(path) < 20 and path[-1].mean_nnz_per_class > 3
    assert all(0 <= e.val_acc <= 1 for e in path.entries)
    best = select(path, "val_acc", max_nnz_per_class=3)
    assert best.mean_nnz_per_class <= 3
    assert best.val_acc == max(e.val_acc for e in path.entries if e.mean_nnz_per_class <= 3)


def test_unconverged_is_reported_and_progress_bar_runs(std_data, caplog):
    X, y = std_data
    path = fit_elastic_net_path(X, y, 4, n_lambdas=3, max_epochs=1, tol=1e-12, progress=True)
    assert path.info["unconverged"] >= 2 and not path[-1].converged and path[-1].epochs == 1
    assert "stopped at max_epochs=1" in caplog.text


def _entry(lam, nnz, val, train=0.5):
    return PathEntry(lam=lam, weight=torch.zeros(2, 3), bias=torch.zeros(2), objective=1.0, train_acc=train,
                     val_acc=val, nnz_per_class=torch.tensor([nnz, nnz]), epochs=1, converged=True)


def test_select_rules(caplog):
    path = PathResult([_entry(1.0, 0, 0.3), _entry(0.5, 2, 0.8), _entry(0.2, 2, 0.8), _entry(0.1, 3, 0.7)],
                      alpha=0.99, lam_max=1.0, num_classes=2, num_features=3)
    assert select(path).lam == 0.5  # best val acc, ties → sparser (same nnz → first)
    assert select(path, "sparsity", max_nnz_per_class=2.5).lam == 0.5
    assert select(path, "sparsity", max_nnz_per_class=3).lam == 0.1
    assert select(path, "val_acc", max_nnz_per_class=1).lam == 1.0
    with pytest.raises(ValueError, match="max_nnz_per_class"):
        select(path, "sparsity")
    with pytest.raises(ValueError, match="criterion"):
        select(path, "accuracy")
    noval = PathResult([_entry(1.0, 1, None, 0.2), _entry(0.5, 2, None, 0.6)], 0.99, 1.0, 2, 3)
    assert select(noval).lam == 0.5 and "training accuracy" in caplog.text
    tight = PathResult([_entry(1.0, 2, 0.5)], 0.99, 1.0, 2, 3)
    with pytest.raises(ValueError, match="sparsest"):
        select(tight, max_nnz_per_class=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(X=torch.randn(5, 3, 1)), "X must have shape"),
        (dict(X=torch.ones(5, 3, dtype=torch.long)), "floating point"),
        (dict(y=torch.zeros(4, dtype=torch.long)), "1-D tensor of 5"),
        (dict(y=torch.zeros(5)), "integer class"),
        (dict(y=torch.full((5,), 3)), r"\[0, 3\)"),
        (dict(num_classes=1), "num_classes"),
        (dict(alpha=1.5), "alpha"),
        (dict(lambdas=[]), "lambdas"),
        (dict(lambdas=[-1.0]), "lambdas"),
        (dict(val=(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))), "val features"),
        (dict(lr=0.0), "lr"),
    ],
)
def test_path_errors(kwargs, match):
    args = dict(X=torch.randn(5, 3), y=torch.tensor([0, 1, 2, 0, 1]), num_classes=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fit_elastic_net_path(progress=False, **args)


def test_non_contiguous_input_and_ridge_path(std_data):
    X, y = std_data
    Xnc = X.T.contiguous().T  # same values, column-major
    assert not Xnc.is_contiguous()
    a = fit_elastic_net_path(X, y, 4, 0.0, n_lambdas=3, epsilon=0.1, progress=False, seed=3)
    b = fit_elastic_net_path(Xnc, y, 4, 0.0, n_lambdas=3, epsilon=0.1, progress=False, seed=3)
    assert_close(a[-1].weight, b[-1].weight, atol=1e-5, rtol=1e-4, what="non-contiguous")
    assert a[-1].nnz == 4 * 20  # α = 0: ridge, nothing exactly zero


# ------------------------------------------------------------------------------------------------------- dense head
def test_dense_head_lbfgs_matches_sklearn_and_adam_close(std_data):
    from sklearn.linear_model import LogisticRegression

    X, y = std_data
    n, wd = X.shape[0], 1e-2
    sk = LogisticRegression(C=1 / (n * wd), l1_ratio=0.0, tol=1e-10, max_iter=5000).fit(X.double().numpy(), y.numpy())
    ref = elastic_net_objective(X, y, torch.from_numpy(sk.coef_), torch.from_numpy(sk.intercept_), wd, 0.0)
    e = fit_dense_head(X, y, 4, weight_decay=wd, val=(X[:50], y[:50]), progress=False)
    assert e.objective == pytest.approx(ref, rel=1e-4) and e.val_acc is not None and e.nnz == 80
    adam = fit_dense_head(X, y, 4, weight_decay=wd, optimizer="adam", epochs=60, batch_size=64, lr=0.05,
                          progress=False)
    assert adam.objective <= ref * 1.02
    with pytest.raises(ValueError, match="optimizer"):
        fit_dense_head(X, y, 4, optimizer="sgd")
    with pytest.raises(ValueError, match="weight_decay"):
        fit_dense_head(X, y, 4, weight_decay=-1.0)


# ------------------------------------------------------------------------------------------------ head + round trip
def test_fit_sparse_head_and_state_round_trip():
    X, y = _data(seed=4)
    head, path = fit_sparse_head(X[:240], y[:240], 4, val=(X[240:], y[240:]), n_lambdas=6, epsilon=0.02,
                                 progress=False)
    assert isinstance(head, LinearHead) and len(path) == 6
    assert_close(head.standardizer.mean, X[:240].mean(0), atol=1e-5, rtol=1e-5, what="train mean")
    logits = head(X)
    assert logits.shape == (300, 4)
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)
    buf.seek(0)
    back = LinearHead.from_state_dict(torch.load(buf))
    assert_close(back(X), logits, atol=0, rtol=0, what="round trip")
    classes = logits.argmax(1)
    contrib = head.contributions(X, classes)
    assert_close(contrib.sum(1) + head.bias[classes], logits.gather(1, classes[:, None])[:, 0], atol=1e-4, rtol=1e-5,
                 what="contributions")
    with pytest.raises(ValueError, match="missing"):
        LinearHead.from_state_dict({"weight": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"\[N, 20\]"):
        head(X[:, :5])


# ------------------------------------------------------------------------------------------------------ standardizer
def test_standardizer():
    X, _ = _data(n=101, m=7)
    X[:, 3] = 5.0  # a dead concept
    s = Standardizer.fit(X, eps=1e-4, chunk_size=9)  # chunked accumulation == one shot
    assert_close(s.mean, X.double().mean(0), atol=1e-5, rtol=1e-6, what="mean")
    ref_std = X.double().std(0, unbiased=False).clamp_min(1e-4)
    assert_close(s.std, ref_std, atol=1e-5, rtol=1e-5, what="std")
    Z = s.transform(X)
    assert torch.isfinite(Z).all() and Z[:, 3].abs().max() == 0
    assert_close(Z.mean(0), torch.zeros(7), atol=1e-5, rtol=0, what="standardised mean")
    back = Standardizer.from_state_dict(s.state_dict())
    assert_close(back.transform(X), Z, atol=0, rtol=0, what="round trip")
    assert s.transform(X.double()).dtype == torch.float64
    assert s.transform(X[None]).shape == (1, 101, 7)
    with pytest.raises(ValueError, match="last dimension 7"):
        s.transform(X[:, :3])
    with pytest.raises(ValueError, match=r"\[N, M\]"):
        Standardizer.fit(X[0])
    with pytest.raises(ValueError, match="'mean' and 'std'"):
        Standardizer.from_state_dict({})


# ----------------------------------------------------------------------------------------------------------- pooling
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 1, 1, 1), (3, 2, 7), (2, 5, 1)])
@pytest.mark.parametrize("mode", ["mean", "softmax"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_pooling(shape, mode, contiguous):
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(*shape[:-1], shape[-1] * 2, generator=g, dtype=torch.float64)
    maps = maps[..., ::2] if not contiguous else maps[..., : shape[-1]].contiguous()
    maps.requires_grad_(True)
    cells = maps.reshape(*shape[:2], -1)
    tau = 0.7
    expected = cells.mean(-1) if mode == "mean" else (torch.softmax(cells / tau, -1) * cells).sum(-1)
    got = pool_concept_maps(maps, mode, temperature=tau)
    assert got.shape == shape[:2]
    assert_close(got, expected, atol=1e-12, rtol=1e-12, what=f"{mode} pooling")
    assert torch.autograd.gradcheck(lambda m: pool_concept_maps(m, mode, tau), (maps,))
    if len(shape) == 4:  # [N, M, h, w] and its flattened [N, M, L] agree
        assert_close(pool_concept_maps(cells, mode, tau), got, atol=0, rtol=0, what="flattened")


def test_pooling_temperature_limits_and_dtypes():
    maps = torch.randn(4, 6, 3, 3)
    flat = maps.flatten(2)
    assert_close(pool_concept_maps(maps, "softmax", 1e-4), flat.amax(-1), atol=1e-4, rtol=0, what="τ→0 is max")
    assert_close(pool_concept_maps(maps, "softmax", 1e5), flat.mean(-1), atol=1e-4, rtol=0, what="τ→∞ is mean")
    half = pool_concept_maps(maps.bfloat16(), "softmax")
    assert half.dtype == torch.bfloat16
    assert_close(half, pool_concept_maps(maps, "softmax"), atol=0.05, rtol=0.02, what="bf16")
    for bad, match in [(dict(maps=torch.randn(3, 4)), "shape"), (dict(mode="max"), "mode"),
                       (dict(temperature=0.0), "temperature"), (dict(maps=torch.ones(2, 2, 2, dtype=torch.long)),
                                                                "floating")]:
        kw = dict(maps=maps, mode="softmax", temperature=1.0) | bad
        with pytest.raises(ValueError, match=match):
            pool_concept_maps(**kw)


# --------------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_path_on_cuda_matches_cpu(std_data):
    assert "cuda" in devices_under_test()
    X, y = std_data
    lam = lambda_max(X, y, 4, 0.99) * 0.05
    lams = np.geomspace(lambda_max(X, y, 4, 0.99), lam, 4).tolist()
    cpu = fit_elastic_net_path(X, y, 4, lambdas=lams, batch_size=64, progress=False)[-1]
    gpu = fit_elastic_net_path(X.cuda(), y.cuda(), 4, lambdas=lams, batch_size=64, progress=False)
    assert gpu.info["device"].startswith("cuda") and gpu[-1].weight.device.type == "cpu"
    assert gpu[-1].objective == pytest.approx(cpu.objective, rel=1e-3)
    also = fit_elastic_net_path(X, y, 4, lambdas=lams, batch_size=64, device="cuda", progress=False)[-1]
    assert also.objective == pytest.approx(cpu.objective, rel=1e-3)
    head = fit_dense_head(X.cuda(), y.cuda(), 4, progress=False)
    assert math.isfinite(head.objective)
    pooled = pool_concept_maps(torch.randn(2, 3, 4, 4, device="cuda"), "softmax")
    assert pooled.device.type == "cuda"
