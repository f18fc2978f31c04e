"""Deployment: the exported SALF-CBM / CLIP graphs match PyTorch in onnxruntime, the runtime's backends and input
checks, and the pure-Python parts of the TensorRT path (with a fake ``tensorrt`` module: it cannot be installed here)."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch

from fastcbm.deploy import export_clip_onnx, export_onnx, load, read_metadata
from fastcbm.deploy import tensorrt as T
from fastcbm.models.features import normalize_for_backbone
from fastcbm.heads import LinearHead
from fastcbm.models import load_backbone
from fastcbm.salf import explain as ex
from fastcbm.salf.model import SALFCBM, SALFConfig
from tests.conftest import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")
OUTPUTS = ("logits", "concepts", "concept_maps", "contributions")


def make_salf(backbone_name: str = "testbed", *, m: int = 12, k: int = 5, grid=(7, 7), pooling: str = "mean",
              weight_scale: float = 1.0, seed: int = 0):
    """A SALF-CBM with random bottleneck/head weights on a bundled or torchvision backbone."""
    torch.manual_seed(seed)
    bb = load_backbone(backbone_name)
    layer = bb.feature_layers[-1]
    with torch.no_grad():
        from fastcbm.models.features import extract_feature_maps

        s = bb.input_size if bb.kind == "vit" else 64  # a CNN's channel count does not depend on the input size
        c = extract_feature_maps(bb.model, torch.zeros(1, 3, s, s), layer, kind=bb.kind,
                                 num_prefix_tokens=bb.num_prefix_tokens).shape[1]
    head = LinearHead(m, k)
    with torch.no_grad():
        head.weight.normal_()
        head.bias.normal_()
        head.standardizer.mean.normal_()
        head.standardizer.std.uniform_(0.5, 2.0)
    cfg = SALFConfig(backbone=backbone_name, grid=grid, feature_layer=layer, pooling=pooling,
                     concepts=[f"concept {i}" for i in range(m)], class_names=[f"class {i}" for i in range(k)])
    return SALFCBM(bb.model, bb.kind, cfg, torch.randn(m, c) * weight_scale, head), bb


def reference(model: SALFCBM, bb, images_u8: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four outputs from the eager model's own methods (the same path fastcbm explain takes)."""
    x = normalize_for_backbone(images_u8, bb, torch.device("cpu"))
    with torch.no_grad():
        maps = model.concept_maps(x)
        concepts = model.concepts_from_maps(maps)
        logits = model.classify(concepts)
        contrib = ex.contributions(model, concepts, logits.argmax(1))
    return {"logits": logits, "concepts": concepts, "concept_maps": maps, "contributions": contrib}


@pytest.fixture(scope="module")
def testbed_export(tmp_path_factory):
    model, bb = make_salf()
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "salf.onnx", max_batch=8, backbone=bb)
    return model, bb, path


@pytest.mark.parametrize("batch", [1, 7])
def test_testbed_salf_onnx_matches_pytorch(testbed_export, batch):
    model, bb, path = testbed_export
    runner = load(path, backend="onnxruntime", threads=1)
    assert runner.backend == "onnxruntime-cpu"
    images = torch.randint(0, 256, (batch, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    got = runner(images.numpy())
    ref = reference(model, bb, images)
    assert list(got) == list(OUTPUTS)
    for name in OUTPUTS:
        assert isinstance(got[name], np.ndarray) and got[name].dtype == np.float32
        assert_close(torch.from_numpy(got[name]), ref[name], atol=1e-4, rtol=0, what=name)
    # the contributions of the predicted class add up to its logit minus the bias
    pred = got["logits"].argmax(1)
    np.testing.assert_allclose(got["contributions"].sum(1) + model.head.bias.numpy()[pred],
                               got["logits"][np.arange(batch), pred], atol=1e-4)


def test_metadata_labels_the_outputs(testbed_export):
    model, _, path = testbed_export
    meta = read_metadata(path)
    assert meta["concepts"] == model.config.concepts and meta["class_names"] == model.config.class_names
    assert meta["grid"] == [7, 7] and meta["input_size"] == 64 and meta["input"]["dtype"] == "uint8"
    assert meta["outputs"] == list(OUTPUTS) and meta["max_batch"] == 8 and meta["precision"] == "fp32"
    import fastcbm

    assert meta["fastcbm_version"] == fastcbm.__version__
    import onnx

    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == 17
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    out_dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert out_dims == {"logits": ["batch", 5], "concepts": ["batch", 12], "concept_maps": ["batch", 12, 7, 7],
                        "contributions": ["batch", 12]}


def test_runtime_torch_inputs_and_input_errors(testbed_export):
    model, bb, path = testbed_export
    runner = load(path, backend="auto", device="cpu", threads=1)  # no TensorRT, no CUDA EP here → onnxruntime CPU
    assert runner.backend == "onnxruntime-cpu"
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    got = runner(images)
    assert all(isinstance(v, torch.Tensor) for v in got.values())
    assert_close(got["logits"], reference(model, bb, images)["logits"], atol=1e-4, rtol=0, what="logits")
    with pytest.raises(ValueError, match=r"shape \[N, 3, 64, 64\]"):
        runner(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 pixels 0-255.*got dtype float32"):
        runner(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="batch of 9 images is above the maximum of 8"):
        runner(np.zeros((9, 3, 64, 64), np.uint8))


def test_onnxruntime_sessions_do_not_spin_by_default(testbed_export):
    """Two sessions in one process each own a thread pool; spinning idle threads starve the other session's cores
    (ResNet-50 batch 1 on 2 cores: 108 ms interleaved with spinning, 66 ms without), so spinning is opt-in."""
    from fastcbm.deploy.runtime import OnnxRuntimeRunner

    _, _, path = testbed_export
    key = "session.intra_op.allow_spinning"
    quiet, spinning = OnnxRuntimeRunner(path, device="cpu"), OnnxRuntimeRunner(path, device="cpu", spin=True)
    assert quiet.session.get_session_options().get_session_config_entry(key) == "0"
    assert spinning.session.get_session_options().get_session_config_entry(key) == "1"
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 64, 64), dtype=np.uint8)
    a, b = quiet(images), spinning(images)
    assert all(np.array_equal(a[n], b[n]) for n in a)


def test_folder_runs_on_torch_and_onnxruntime(tmp_path):
    model, bb = make_salf(pooling="softmax", m=6, k=3, seed=2)
    model.save(tmp_path / "model")
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    ref = reference(model, bb, images)
    torch_runner = load(tmp_path / "model", backend="torch", device="cpu")
    assert torch_runner.backend == "torch" and torch_runner.metadata["concepts"] == model.config.concepts
    ort_runner = load(tmp_path / "model", backend="onnxruntime", device="cpu", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx")), "the folder's export is cached"
    for runner in (torch_runner, ort_runner):
        got = runner(images)
        for name in OUTPUTS:
            assert_close(got[name], ref[name], atol=1e-4, rtol=0, what=f"{runner.backend} {name}")


def test_bad_paths_and_backends(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a saved SALF-CBM directory"):
        load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not found"):
        load(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not an ONNX file"):
        load(tmp_path / "junk.onnx")
    with pytest.raises(ValueError, match="backend must be one of"):
        load(tmp_path / "junk.onnx", backend="tvm")


def test_resnet18_small_input_matches(tmp_path):
    """A torchvision ResNet-18 (random init) at 64 px: layer4 is 2×2, resized up to a 3×3 grid inside the graph."""
    model, bb = make_salf("resnet18", m=8, k=4, grid=(3, 3), weight_scale=0.05, seed=3)
    path = export_onnx(model, tmp_path / "r18.onnx", input_size=64, mean=bb.mean, std=bb.std, max_batch=7)
    runner = load(path, backend="onnxruntime", threads=1)
    bb.input_size = 64  # the reference normalises at the exported size
    for batch in (1, 7):
        images = torch.randint(0, 256, (batch, 3, 64, 64), dtype=torch.uint8)
        got, ref = runner(images), reference(model, bb, images)
        for name in OUTPUTS:
            assert_close(got[name], ref[name], atol=1e-4, rtol=0, what=f"batch {batch} {name}")


def test_testbed_vit_salf_matches(tmp_path):
    """A ViT backbone: the hooked block's tokens become the feature map inside the graph (class token dropped)."""
    model, bb = make_salf("testbed-vit", m=6, k=3, seed=8)
    runner = load(export_onnx(model, tmp_path / "vit.onnx", backbone=bb, max_batch=3), backend="onnxruntime",
                  threads=1)
    for batch in (1, 3):
        images = torch.randint(0, 256, (batch, 3, 64, 64), dtype=torch.uint8)
        got, ref = runner(images), reference(model, bb, images)
        for name in OUTPUTS:
            assert_close(got[name], ref[name], atol=1e-4, rtol=0, what=f"batch {batch} {name}")


def test_float_input_fp16_and_dynamo(tmp_path):
    from fastcbm.deploy.graph import ExplainedSALF

    model, bb = make_salf(m=4, k=3, seed=4)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    ref = reference(model, bb, images)
    # float32 pixels 0..1 through the dynamo exporter (opset 18)
    p = export_onnx(model, tmp_path / "f.onnx", input_dtype="float32", opset=18, backbone=bb, outputs=("logits",))
    got = load(p, backend="onnxruntime", threads=1)(images.float().div(255).numpy())
    assert list(got) == ["logits"] and read_metadata(p)["exporter"] == "dynamo"
    assert_close(torch.from_numpy(got["logits"]), ref["logits"], atol=1e-4, rtol=0, what="float32 input")
    # fp16: every weight of the graph is half, the outputs are fp32 and close to the fp32 model
    import onnx

    p16 = export_onnx(model, tmp_path / "h.onnx", precision="fp16", backbone=bb)
    proto = onnx.load(str(p16))
    conv_w = {n.input[1] for n in proto.graph.node if n.op_type == "Conv"}
    dtypes = {i.data_type for i in proto.graph.initializer if i.name in conv_w}
    assert dtypes == {onnx.TensorProto.FLOAT16}, dtypes
    got16 = load(p16, backend="onnxruntime", threads=1)(images.numpy())
    assert got16["logits"].dtype == np.float32
    scale = ref["logits"].abs().max().item()
    assert np.abs(got16["logits"] - ref["logits"].numpy()).max() < 0.05 * scale
    with pytest.raises(ValueError, match="outputs must be a non-empty subset"):
        ExplainedSALF(model, mean=bb.mean, std=bb.std, outputs=("heatmap",))
    with pytest.raises(ValueError, match="dynamo exporter needs opset >= 18"):
        export_onnx(model, tmp_path / "x.onnx", exporter="dynamo", opset=17, backbone=bb)
    with pytest.raises(ValueError, match="input_dtype must be one of"):
        export_onnx(model, tmp_path / "x.onnx", input_dtype="int8", backbone=bb)


def test_clip_image_tower_matches(tmp_path):
    from fastcbm.models import load_clip

    clip, _, _ = load_clip("testbed")
    path = export_clip_onnx("testbed", tmp_path / "clip.onnx", max_batch=8)
    meta = read_metadata(path)
    assert meta["kind"] == "clip_image" and meta["input"]["dtype"] == "normalized" and meta["outputs"] == ["embedding"]
    runner = load(path, backend="onnxruntime", threads=1)
    for batch in (1, 7):
        x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref = clip.encode_image(x)
        assert_close(runner(x)["embedding"], ref, atol=1e-4, rtol=0, what=f"embedding batch {batch}")


# -- TensorRT: pure-Python parts with a fake module ----------------------------------------------------------------
def test_tensorrt_import_guard_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(T.TensorRTUnavailableError) as info:
        T.import_tensorrt()
    assert "\n" not in str(info.value) and "TensorRT is not available" in str(info.value)


def test_profile_shapes_and_cache_key():
    p = T.profile_shapes(224, 32)
    assert p.min == (1, 3, 224, 224) and p.opt == (8, 3, 224, 224) and p.max == (32, 3, 224, 224)
    assert T.profile_shapes(64, 4, opt_batch=1).opt[0] == 1 and T.profile_shapes(64, 2).opt[0] == 2
    with pytest.raises(ValueError, match="opt_batch must be in"):
        T.profile_shapes(64, 4, opt_batch=5)
    with pytest.raises(ValueError, match="max_batch must be"):
        T.profile_shapes(64, 0)
    gpu = {"name": "NVIDIA H200", "capability": "9.0"}
    key = T.engine_cache_key("a" * 64, gpu, "10.9.0", p)
    assert key == T.engine_cache_key("a" * 64, dict(gpu), "10.9.0", T.profile_shapes(224, 32))
    others = [T.engine_cache_key("b" * 64, gpu, "10.9.0", p),
              T.engine_cache_key("a" * 64, {"name": "NVIDIA H100", "capability": "9.0"}, "10.9.0", p),
              T.engine_cache_key("a" * 64, gpu, "11.0.0", p),
              T.engine_cache_key("a" * 64, gpu, "10.9.0", T.profile_shapes(224, 64))]
    assert len({key, *others}) == 5
    tc = T.timing_cache_path(T.default_cache_dir(), gpu, "10.9.0")
    assert tc.name == "timing-nvidia-h200-sm9.0-trt10-9-0.cache"


def _fake_trt(version: str):
    return types.SimpleNamespace(__version__=version)


def test_engine_container_and_mismatch(tmp_path, monkeypatch, testbed_export):
    _, _, onnx_path = testbed_export
    from fastcbm.files import file_sha256

    gpu = {"name": "NVIDIA H200", "capability": "9.0"}
    header = {"engine_format": T.ENGINE_FORMAT, "gpu": gpu, "tensorrt": "10.9.0", "onnx_sha256": "0" * 64,
              "onnx_path": str(tmp_path / "gone.onnx"), "max_batch": 8,
              "profile": {"min": [1, 3, 64, 64], "opt": [8, 3, 64, 64], "max": [8, 3, 64, 64]},
              "metadata": read_metadata(onnx_path)}
    eng = T.write_engine_file(tmp_path / "m.engine", header, b"\x00serialized\xff")
    assert T.read_engine_header(eng) == json.loads(json.dumps(header)) and T.read_engine_bytes(eng) == b"\x00serialized\xff"
    (tmp_path / "x.engine").write_bytes(b"plain TensorRT bytes")
    with pytest.raises(ValueError, match="not a fastcbm TensorRT engine"):
        T.read_engine_header(tmp_path / "x.engine")
    assert T.engine_mismatch(header, gpu, "10.9.0") is None
    assert "TensorRT 10.9.0, this is TensorRT 11.0" in T.engine_mismatch(header, gpu, "11.0")
    assert "this GPU is NVIDIA H100" in T.engine_mismatch(header, {"name": "NVIDIA H100", "capability": "9.0"}, "10.9.0")

    # another GPU, the ONNX is gone: a clear error naming both and the rebuild command, never a crash
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt("10.9.0"))
    monkeypatch.setattr(T, "gpu_identity", lambda device=0: {"name": "NVIDIA L4", "capability": "8.9"})
    with pytest.raises(ValueError, match=r"built for NVIDIA H200 .*this GPU is NVIDIA L4.*fastcbm export"):
        T.load_engine_file(eng)
    # the ONNX it came from is still there (same sha256): rebuilt, not refused
    header.update(onnx_path=str(onnx_path), onnx_sha256=file_sha256(onnx_path))
    T.write_engine_file(eng, header, b"old")
    calls = []

    def fake_build(src, out, **kw):
        calls.append((str(src), kw))
        return T.write_engine_file(out, dict(header, gpu={"name": "NVIDIA L4", "capability": "8.9"}), b"new")

    monkeypatch.setattr(T, "build_engine", fake_build)
    new_header, data = T.load_engine_file(eng)
    assert data == b"new" and new_header["gpu"]["name"] == "NVIDIA L4"
    assert calls == [(str(onnx_path), {"max_batch": 8, "opt_batch": 8, "cache_dir": None, "device": 0})]


def test_runtime_engine_without_tensorrt_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    eng = T.write_engine_file(tmp_path / "m.engine", {"engine_format": T.ENGINE_FORMAT}, b"")
    with pytest.raises(T.TensorRTUnavailableError, match="TensorRT is not available"):
        load(eng)
    with pytest.raises(ValueError, match="only backend 'tensorrt'"):
        load(eng, backend="onnxruntime")


def test_precompute_with_onnxruntime_engine(tmp_path):
    """``precompute(engine="onnxruntime")`` encodes with the exported tower: the cache equals the torch one up to the
    fp16 storage rounding, and the manifest says which engine wrote it."""
    from PIL import Image

    from fastcbm.precompute import precompute
    from tests.test_precompute import tiny_clip

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 36 + i, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    clip = tiny_clip()
    kw = {"grid": 2, "batch_size": 4, "shard_size": 8, "device": "cpu", "num_workers": 0, "progress": False,
          "model_name": "tiny"}
    files = sorted(str(p) for p in tmp_path.glob("*.png"))
    ref = precompute(files, clip, tmp_path / "torch", **kw)
    got = precompute(files, clip, tmp_path / "ort", engine="onnxruntime", **kw)
    assert got.manifest["encoder_engine"] == "onnxruntime-cpu"
    assert_close(got.prompt_embeddings(), ref.prompt_embeddings(), atol=2e-3, rtol=0, what="prompt embeddings")
    assert_close(got.global_norms(), ref.global_norms(), atol=0, rtol=1e-4, what="global norms")
    with pytest.raises(ValueError, match="engine must be"):
        precompute(files, clip, tmp_path / "bad", engine="tvm", **kw)
    if "tensorrt" not in sys.modules:  # here: TensorRT is not installed, one line says so
        with pytest.raises(ValueError, match="engine 'tensorrt': TensorRT is not available"):
            precompute(files, clip, tmp_path / "bad", engine="tensorrt", **kw)


# -- GPU (skipped here; bench/gpu_check.sh runs them) --------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_runners_keep_cuda_tensors(tmp_path):
    """TensorRT (where installed) and onnxruntime's CUDA provider (where installed): CUDA tensors in and out, fp32
    engine within 1e-4 of PyTorch, fp16 engine close, CUDA-graph replays equal to the first run."""
    import onnxruntime as ort

    model, bb = make_salf(seed=7)
    path = export_onnx(model, tmp_path / "m.onnx", backbone=bb, max_batch=8)
    images = torch.randint(0, 256, (7, 3, 64, 64), dtype=torch.uint8)
    ref = reference(model, bb, images)
    x = images.cuda()
    runners = []
    if "CUDAExecutionProvider" in ort.get_available_providers():
        runners.append(load(path, backend="onnxruntime", device="cuda"))
    try:
        T.import_tensorrt()
        runners.append(load(path, backend="tensorrt", cache_dir=tmp_path / "cache"))
    except T.TensorRTUnavailableError:
        pass
    if not runners:
        pytest.skip("neither TensorRT nor onnxruntime-gpu is installed")
    for runner in runners:
        first = runner(x)
        again = runner(x)
        third = runner(x)  # TensorRT: replayed from the CUDA graph captured on the second call
        for name in OUTPUTS:
            assert first[name].is_cuda, (runner.backend, name)
            assert_close(first[name], ref[name], atol=1e-4, rtol=0, what=f"{runner.backend} {name}")
            assert torch.equal(third[name], again[name]), (runner.backend, name)
        with pytest.raises(ValueError, match="above the maximum of 8"):
            runner(torch.zeros(9, 3, 64, 64, dtype=torch.uint8, device="cuda"))


class _FakeTRT:
    """Just enough of the TensorRT 10 builder API to check what fastcbm asks of it."""

    __version__ = "10.9.0"

    def __init__(self):
        self.calls = []
        fake = self

        class Flag:
            STRONGLY_TYPED = 2

        class BuilderFlag:
            TF32 = 7

        class MemoryPoolType:
            WORKSPACE = 0

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Cache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return b"timing:" + self.data

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("workspace", size))

            def clear_flag(self, flag):
                fake.calls.append(("clear_flag", flag))

            def add_optimization_profile(self, profile):
                fake.calls.append(("profile", profile.shapes))

            def create_timing_cache(self, data):
                return Cache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache

            def get_timing_cache(self):
                return self.cache

        class Profile:
            def set_shape(self, name, mn, opt, mx):
                self.shapes = (name, tuple(mn), tuple(opt), tuple(mx))

        class Network:
            def get_input(self, i):
                return types.SimpleNamespace(name="images")

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls.append(("network_flags", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build",))
                return b"ENGINE"

        class OnnxParser:
            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                fake.calls.append(("parse", path))
                return True

        self.NetworkDefinitionCreationFlag, self.BuilderFlag, self.MemoryPoolType = Flag, BuilderFlag, MemoryPoolType
        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser


def test_build_engine_with_a_fake_tensorrt(tmp_path, monkeypatch, testbed_export):
    """The builder gets a strongly typed network, no TF32, the batch 1..N profile and the timing cache; a second
    build is an engine-cache hit; the container's header names GPU, TensorRT version and the ONNX hash."""
    _, _, onnx_path = testbed_export
    fake = _FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(T, "gpu_identity", lambda device=0: {"name": "NVIDIA H200", "capability": "9.0"})
    out = T.build_engine(onnx_path, tmp_path / "m.engine", max_batch=4, opt_batch=1, cache_dir=tmp_path / "c")
    assert ("network_flags", 1 << 2) in fake.calls and ("clear_flag", 7) in fake.calls
    assert ("profile", ("images", (1, 3, 64, 64), (1, 3, 64, 64), (4, 3, 64, 64))) in fake.calls
    header = T.read_engine_header(out)
    assert T.read_engine_bytes(out) == b"ENGINE" and header["tensorrt"] == "10.9.0"
    assert header["gpu"]["name"] == "NVIDIA H200" and header["max_batch"] == 4
    assert header["metadata"]["concepts"] == read_metadata(onnx_path)["concepts"]
    timing = list((tmp_path / "c").glob("timing-*.cache"))
    assert len(timing) == 1 and timing[0].read_bytes() == b"timing:"
    fake.calls.clear()
    T.build_engine(onnx_path, None, max_batch=4, opt_batch=1, cache_dir=tmp_path / "c")
    assert ("build",) not in fake.calls, "same ONNX, GPU, TensorRT and profile: served from the engine cache"
    with pytest.raises(ValueError, match="above the ONNX export's 8"):
        T.build_engine(onnx_path, None, max_batch=9, cache_dir=tmp_path / "c")
