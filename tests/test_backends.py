"""The op registry and backend selection: auto rules, explicit names, the errors for missing backends, and — for
every op and variant the registry defines — that an explicit backend never falls back to another implementation."""

from __future__ import annotations

import pytest
import torch

from fastcbm import _ext, backends
from fastcbm.backends import AUTO_ORDER, BACKENDS, BackendUnavailableError, define_op, implemented, op_matrix, resolve
from fastcbm.errors import InternalError, InvalidArgument

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 1)


@pytest.fixture
def test_op(monkeypatch):
    """Define throwaway ops for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(backends, "_OPS", dict(backends._OPS))
    monkeypatch.setattr(backends, "_NOTES", dict(backends._NOTES))

    def define(name: str, impls: tuple[str, ...], variant: str = "default", note: str | None = None) -> str:
        define_op(name, {variant: {b: (lambda b=b: b) for b in impls}}, notes={variant: note} if note else None)
        return name

    return define


@pytest.fixture
def everything_runs(monkeypatch):
    """Pretend every backend can run on every device (a CUDA machine with the module built and triton installed)."""
    monkeypatch.setattr(backends, "backend_problem", lambda name, device=None: None)


def test_cpu_extension_is_built():
    # CI builds the package; a missing extension would silently route everything to the reference.
    assert _ext.cpu_ext() is not None, _ext.cpu_ext_error()
    info = _ext.cpu_ext().build_info()
    assert info["cuda"] is False and info["max_threads"] >= 1


def test_auto_picks_cpp_for_cpu_tensors(test_op):
    assert resolve(test_op("t.op", BACKENDS), "auto", CPU).backend == "cpu"


@pytest.mark.parametrize("impls", [("reference",), ("reference", "triton", "cuda")])
def test_auto_falls_back_to_reference(test_op, impls):
    assert resolve(test_op("t.op", impls), "auto", CPU).backend == "reference"


def test_unknown_backend_is_invalid_argument(test_op):
    with pytest.raises(InvalidArgument, match="backend='fast'"):
        resolve(test_op("t.op", BACKENDS), "fast", CPU)


def test_unknown_variant_is_invalid_argument(test_op):
    with pytest.raises(InvalidArgument, match="variant='nope'"):
        resolve(test_op("t.op", BACKENDS), "auto", CPU, "nope")


def test_unimplemented_backend_names_what_exists(test_op):
    with pytest.raises(BackendUnavailableError, match=r"myop: no 'cuda' implementation; this op has reference, cpu"):
        resolve(test_op("myop", ("reference", "cpu")), "cuda", CPU)


def test_a_variant_note_explains_the_gap(test_op):
    test_op("t.op", ("reference", "cpu"), variant="paper", note="why not")
    with pytest.raises(BackendUnavailableError, match=r"no 'triton' implementation \(why not\)"):
        resolve("t.op", "triton", CPU, "paper")


def test_cuda_backend_on_cpu_tensors_is_refused(test_op):
    with pytest.raises(BackendUnavailableError, match="takes CUDA tensors"):
        resolve(test_op("t.op", BACKENDS), "cuda", CPU)


def test_cpu_backend_on_cuda_device_is_refused(test_op):
    with pytest.raises(BackendUnavailableError, match="takes CPU tensors"):
        resolve(test_op("t.op", BACKENDS), "cpu", CUDA)


def test_missing_cpu_extension_is_named(test_op, monkeypatch):
    op = test_op("t.op", BACKENDS)
    monkeypatch.setattr(_ext, "cpu_ext", lambda: None)
    monkeypatch.setattr(_ext, "cpu_ext_error", lambda: "fastcbm._C could not be imported (boom)")
    with pytest.raises(BackendUnavailableError, match=r"C\+\+ extension is not available: fastcbm._C could not"):
        resolve(op, "cpu", CPU)
    assert resolve(op, "auto", CPU).backend == "reference"


def test_triton_on_cpu_needs_interpreter(test_op, monkeypatch):
    op = test_op("t.op", BACKENDS)
    monkeypatch.setattr(backends, "triton_installed", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        resolve(op, "triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve(op, "triton", CPU).backend == "triton"
    assert resolve(op, "auto", CPU).backend == "cpu"  # auto never takes the interpreter


def test_triton_not_installed_is_named(test_op, monkeypatch):
    monkeypatch.setattr(backends, "triton_installed", lambda: False)
    with pytest.raises(BackendUnavailableError, match="triton is not installed"):
        resolve(test_op("t.op", BACKENDS), "triton", CPU)


def test_available_backends_reports_reasons():
    report = backends.available_backends("cpu")
    assert report["reference"] is None and report["cpu"] is None
    assert "CUDA" in report["cuda"]


def test_define_op_requires_the_reference_and_known_backends(test_op):
    with pytest.raises(InternalError, match="'reference' is required"):
        define_op("t.bad", {"default": {"cpu": lambda: None}})
    with pytest.raises(InternalError, match="each must be one of"):
        define_op("t.bad", {"default": {"reference": lambda: None, "gpu": lambda: None}})


# ---- every op the registry defines ---------------------------------------------------------------------------------
MATRIX = op_matrix()
CASES = [(r["op"], r["variant"]) for r in MATRIX]


def test_the_matrix_covers_every_family():
    assert {op.split(".")[0] for op, _ in CASES} == set(backends.FAMILIES)
    assert ("metrics.nra", "official") in CASES and ("metrics.nra", "paper") in CASES
    assert all(r["backends"]["reference"] for r in MATRIX)


@pytest.mark.parametrize("op, variant", CASES)
@pytest.mark.parametrize("device", [CPU, CUDA], ids=["cpu", "cuda"])
def test_explicit_backend_runs_itself_or_raises(everything_runs, op, variant, device):
    """With every backend runnable, an explicit name resolves to exactly that implementation, or raises when the
    variant lacks it — never another backend (the old metrics.nra(variant='paper', backend='cuda') ran the torch
    reference on CUDA tensors)."""
    impls = implemented(op, variant)
    for name in BACKENDS:
        if name in impls:
            impl = resolve(op, name, device, variant)
            assert (impl.backend, impl.op, impl.variant) == (name, op, variant)
        else:
            with pytest.raises(BackendUnavailableError, match=f"no '{name}' implementation"):
                resolve(op, name, device, variant)


@pytest.mark.parametrize("op, variant", CASES)
@pytest.mark.parametrize("device", [CPU, CUDA], ids=["cpu", "cuda"])
def test_auto_follows_the_declared_order(everything_runs, op, variant, device):
    impls = implemented(op, variant)
    want = next(b for b in AUTO_ORDER[device.type] if b in impls)
    assert resolve(op, "auto", device, variant).backend == want


def test_paper_nra_on_cuda_tensors_raises_for_cuda(everything_runs):
    with pytest.raises(BackendUnavailableError, match=r"metrics.nra \(variant 'paper'\): no 'cuda' implementation"):
        resolve("metrics.nra", "cuda", CUDA, "paper")
    assert resolve("metrics.nra", "auto", CUDA, "paper").backend == "triton"


def test_public_functions_refuse_unimplemented_backends():
    from fastcbm.cam import fuse
    from fastcbm.metrics import iou_curve, nra

    maps, masks = torch.rand(2, 10, 10), torch.rand(2, 10, 10) > 0.5
    with pytest.raises(BackendUnavailableError, match="no 'cuda' implementation"):
        nra(maps, masks, variant="paper", backend="cuda")
    with pytest.raises(BackendUnavailableError, match="no 'triton' implementation"):
        iou_curve(maps, masks, backend="triton")
    with pytest.raises(BackendUnavailableError, match="no 'cpu' implementation"):
        fuse(torch.rand(1, 2, 3, dtype=torch.float64), torch.rand(1, 3, 4, 4, dtype=torch.float64), backend="cpu")


def test_info_prints_the_matrix():
    from fastcbm.info import collect, format_report

    text = format_report(collect())
    for op, variant in CASES:
        assert any(line.split()[:2] == [op, variant] for line in text.splitlines()), (op, variant)


@pytest.mark.gpu
def test_cuda_extension_loads_on_gpu():
    assert _ext.cuda_ext() is not None, _ext.cuda_ext_error()
    assert resolve("prompts.render_rings", "auto", torch.device("cuda")).backend == "cuda"
