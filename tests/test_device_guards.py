"""Several GPUs, without a GPU: every compiled (Triton / CUDA) launcher of every op launches inside the device
context of its inputs and passes that device's stream to the CUDA module; init_distributed binds the process to its
GPU. The launches are faked (recorded), so this runs on CPU; tests/test_multi_gpu.py runs the real thing on cuda:1."""

from __future__ import annotations

import contextlib

import pytest
import torch

from fastcbm import _ext, backends
from fastcbm.triton_launch import TritonKernel

STREAM = 4242  # the fake stream handle on_device yields
_REAL_LAUNCH = TritonKernel.launch


class _Recorder:
    """Fakes on_device, the CUDA module and Triton launches; records the device context active at each launch."""

    def __init__(self) -> None:
        self.active: list[torch.device] = []
        self.launches: list[tuple[str, list[torch.device], tuple]] = []

    @contextlib.contextmanager
    def on_device(self, device):
        self.active.append(torch.device(device))
        try:
            yield STREAM
        finally:
            self.active.pop()

    def triton_launch(self, kernel: TritonKernel, grid, args, constexprs, interpreted):
        self.launches.append((f"triton:{kernel.name}", list(self.active), tuple(args)))
        _REAL_LAUNCH(kernel, grid, args, constexprs, interpreted)  # the interpreter: later steps read the outputs

    def cuda_module(self):
        rec = self

        class FakeModule:
            def __getattr__(self, name):
                return lambda *args: rec.launches.append((f"cuda:{name}", list(rec.active), args))

        return FakeModule()


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(_ext, "on_device", rec.on_device)
    monkeypatch.setattr(_ext, "cuda_module", rec.cuda_module)
    monkeypatch.setattr(_ext, "expect_device", lambda *a, **k: None)  # CPU tensors stand in for CUDA ones
    monkeypatch.setattr(TritonKernel, "launch", lambda self, *a, **k: rec.triton_launch(self, *a, **k))
    return rec


def _sample_calls():
    """One call of each op's implementation, on small CPU tensors: ``op -> (args builder)``."""
    from fastcbm.metrics._common import prepare
    from fastcbm.prompts.reference import CLIP_MEAN, CLIP_STD, make_plan

    def prompts():
        images = torch.randint(0, 256, (2, 3, 12, 12), dtype=torch.uint8)
        return (images, make_plan(12, 2, 3.0, 2.0, "inset", CLIP_MEAN, CLIP_STD, True), torch.float16, CLIP_MEAN,
                CLIP_STD)

    def metrics():
        return prepare(torch.rand(3, 10, 11), torch.rand(3, 10, 11) > 0.5)

    def cam():
        return torch.rand(2, 3, 4), torch.rand(2, 4, 5, 5), (7, 6), True

    def losses():
        M, C, B, L, D = 3, 4, 5, 2, 6
        W, F, E, T = torch.randn(M, C), torch.randn(B, C, L), torch.randn(B, L, D), torch.randn(M, D)
        mu = torch.zeros(L * M, dtype=torch.float64)
        coefs = torch.zeros(3, L * M, dtype=torch.float64)
        return W, F, E, T, mu, mu.clone(), coefs

    return {"prompts.render_rings": prompts, "metrics.nra": metrics, "metrics.iou_curve": metrics,
            "metrics.epg": metrics, "cam.fuse": cam, "losses.cubic_cosine_loss": losses}


def _call(op: str, fn, args):
    if op == "losses.cubic_cosine_loss":
        W, F, E, T, mu_q, mu_p, coefs = args
        fn.forward(W, F, E, T, mu_q, mu_p, 2)
        fn.backward(W, F, E, T, mu_q, mu_p, coefs, 2, True, True)
    else:
        fn(*args)


COMPILED = [(r["op"], r["variant"], b) for r in backends.op_matrix() for b in ("triton", "cuda") if r["backends"][b]]


def test_every_op_has_a_sample_call():
    assert {op for op, _, _ in COMPILED} <= set(_sample_calls())


@pytest.mark.parametrize("op, variant, backend", COMPILED, ids=lambda v: str(v))
def test_compiled_launchers_run_inside_the_inputs_device(recorder, op, variant, backend):
    if backend == "triton" and backends.backend_problem("triton", torch.device("cpu")) is not None:
        pytest.skip("the Triton interpreter cannot run here")
    args = _sample_calls()[op]()
    impl = backends._OPS[op][variant][backend]
    _call(op, impl.fn, args)
    assert recorder.launches, f"{op} {variant} {backend}: nothing was launched"
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    for name, active, call_args in recorder.launches:
        assert active == [device], f"{name} launched outside on_device({device}): active {active}"
        if name.startswith("cuda:"):
            assert call_args[-1] == STREAM, f"{name} got stream {call_args[-1]}, not the device's current stream"
    assert recorder.active == []


def test_on_device_enters_the_device_and_yields_its_stream(monkeypatch):
    entered: list[torch.device] = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(torch.device(device))
        yield

    class FakeStream:
        def __init__(self, device):
            self.cuda_stream = 1000 + torch.device(device).index

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream(device))
    with _ext.on_device(torch.device("cuda", 1)) as stream:
        assert entered == [torch.device("cuda", 1)]
        assert stream == 1001
    with _ext.on_device(torch.device("cpu")) as stream:
        assert stream == 0 and entered == [torch.device("cuda", 1)]  # nothing entered for CPU tensors


def test_init_distributed_binds_the_process_to_its_gpu(monkeypatch):
    import torch.distributed as dist

    from fastcbm.distributed import init_distributed, resolve_device

    calls: list = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert init_distributed(resolve_device("cuda")) == (1, 2, True)
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl")]  # the GPU first, then NCCL
    calls.clear()
    assert init_distributed(torch.device("cpu")) == (1, 2, True)
    assert calls == [("init", "gloo")]
