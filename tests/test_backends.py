"""Backend selection: auto rules, explicit names, and the errors for missing backends."""

from __future__ import annotations

import pytest
import torch

from fastcbm import _ext, backends
from fastcbm.backends import BackendUnavailableError, select_backend

ALL = ("reference", "cpu", "triton", "cuda")


def test_cpu_extension_is_built():
    # CI builds the package; a missing extension would silently route everything to the reference.
    assert _ext.cpu_ext() is not None, _ext.cpu_ext_error()
    info = _ext.cpu_ext().build_info()
    assert info["cuda"] is False and info["max_threads"] >= 1


def test_auto_picks_cpp_for_cpu_tensors():
    assert select_backend("op", "auto", torch.device("cpu"), ALL) == "cpu"


@pytest.mark.parametrize("implemented", [("reference",), ("reference", "triton", "cuda")])
def test_auto_falls_back_to_reference(implemented):
    assert select_backend("op", "auto", torch.device("cpu"), implemented) == "reference"


def test_unknown_backend_is_value_error():
    with pytest.raises(ValueError, match="backend='fast'"):
        select_backend("op", "fast", torch.device("cpu"), ALL)


def test_unimplemented_backend_names_what_exists():
    with pytest.raises(BackendUnavailableError, match=r"myop: no 'cuda' implementation; this op has reference, cpu"):
        select_backend("myop", "cuda", torch.device("cpu"), ("reference", "cpu"))


def test_cuda_backend_on_cpu_tensors_is_refused():
    with pytest.raises(BackendUnavailableError, match="takes CUDA tensors"):
        select_backend("op", "cuda", torch.device("cpu"), ALL)


def test_cpu_backend_on_cuda_device_is_refused():
    with pytest.raises(BackendUnavailableError, match="takes CPU tensors"):
        select_backend("op", "cpu", torch.device("cuda"), ALL)


def test_missing_cpu_extension_is_named(monkeypatch):
    monkeypatch.setattr(_ext, "cpu_ext", lambda: None)
    monkeypatch.setattr(_ext, "cpu_ext_error", lambda: "fastcbm._C could not be imported (boom)")
    with pytest.raises(BackendUnavailableError, match=r"C\+\+ extension is not available: fastcbm._C could not"):
        select_backend("op", "cpu", torch.device("cpu"), ALL)
    assert select_backend("op", "auto", torch.device("cpu"), ALL) == "reference"


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(backends, "triton_installed", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        select_backend("op", "triton", torch.device("cpu"), ALL)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend("op", "triton", torch.device("cpu"), ALL) == "triton"


def test_triton_not_installed_is_named(monkeypatch):
    monkeypatch.setattr(backends, "triton_installed", lambda: False)
    with pytest.raises(BackendUnavailableError, match="triton is not installed"):
        select_backend("op", "triton", torch.device("cpu"), ALL)


def test_available_backends_reports_reasons():
    report = backends.available_backends("cpu")
    assert report["reference"] is None and report["cpu"] is None
    assert "CUDA" in report["cuda"]


@pytest.mark.gpu
def test_cuda_extension_loads_on_gpu():
    assert _ext.cuda_ext() is not None, _ext.cuda_ext_error()
    assert select_backend("op", "auto", torch.device("cuda"), ALL) == "cuda"
