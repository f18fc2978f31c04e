"""TensorRT engines from fastcbm's ONNX graphs: strongly typed (TensorRT 10 and 11), one optimisation profile for
batch 1..N, an engine cache keyed by GPU, TensorRT version and the ONNX file's sha256, and a timing cache.

Precision is the ONNX graph's own: TensorRT 11 removed weak typing (``BuilderFlag.FP16`` is gone), so fp16 engines are
built from the reduced-precision graph ``export_onnx(..., precision="fp16")`` writes, and every network is created
``STRONGLY_TYPED`` (TensorRT 10 has the flag too, so one code path serves both).

An engine file (``.engine``) is a small container: ``MAGIC``, a 4-byte little-endian header length, a JSON header (the
ONNX metadata, GPU name and compute capability, TensorRT version, the ONNX sha256, the profile) and the serialized
engine. The header is read before TensorRT touches the bytes, so an engine built for another GPU or TensorRT version
is rebuilt (when its ONNX file is at hand) or refused with one clear line, never deserialized into a crash.

GPU-only: nothing below the import guard runs on the CPU-only development machines; the pure-Python parts (cache key,
profile shapes, container, error messages) are unit-tested with a fake module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastcbm.errors import InvalidArgument, InvalidFile, MissingFile
from fastcbm.files import atomic_path, atomic_write_bytes

log = logging.getLogger("fastcbm.deploy.tensorrt")

MAGIC = b"FASTCBM-TRT1\n"
ENGINE_FORMAT = 1


class TensorRTUnavailableError(RuntimeError):
    """``import tensorrt`` failed (or there is no CUDA device): the message is one line."""


def import_tensorrt():
    """The ``tensorrt`` module, or :class:`TensorRTUnavailableError` with one line saying why not."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install raising OSError on its libraries
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise TensorRTUnavailableError(f"TensorRT is not available (import tensorrt failed: {msg}); "
                                       "use backend='onnxruntime' or 'torch'") from None
    return trt


def trt_version(trt) -> str:
    return str(getattr(trt, "__version__", "unknown"))


def gpu_identity(device: int = 0) -> dict:
    """``{"name", "capability"}`` of a CUDA device (what an engine is specific to)."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailableError("TensorRT needs a CUDA device and none is available; "
                                       "use backend='onnxruntime' or 'torch'")
    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}"}


# -- pure-Python parts --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """An optimisation profile for the ``images`` input: ``min``/``opt``/``max`` shapes ``(N, 3, S, S)``."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def profile_shapes(input_size: int, max_batch: int, opt_batch: int | None = None) -> Profile:
    """Batch 1..``max_batch`` at ``input_size``; kernels are tuned at ``opt_batch`` (default min(8, max_batch))."""
    if not isinstance(max_batch, int) or max_batch < 1:
        raise InvalidArgument(f"max_batch must be an integer >= 1, got {max_batch!r}")
    opt = min(8, max_batch) if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise InvalidArgument(f"opt_batch must be in [1, max_batch={max_batch}], got {opt}")
    shape = (3, int(input_size), int(input_size))
    return Profile((1, *shape), (opt, *shape), (max_batch, *shape))


def engine_cache_key(onnx_sha256: str, gpu: dict, version: str, profile: Profile) -> str:
    """The cache key of an engine: what makes two builds interchangeable (GPU model and capability, TensorRT version,
    the exact ONNX bytes, the profile). Precision is in the ONNX bytes."""
    blob = json.dumps({"onnx": onnx_sha256, "gpu": gpu, "tensorrt": version, "profile": [profile.min, profile.opt,
                                                                                         profile.max]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cache_root() -> Path:
    """``$FASTCBM_CACHE_DIR`` or ``~/.cache/fastcbm`` (exported ONNX files under ``onnx/``, engines ``tensorrt/``)."""
    return Path(os.environ.get("FASTCBM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastcbm"))


def default_cache_dir() -> Path:
    return cache_root() / "tensorrt"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()


def timing_cache_path(cache_dir: Path, gpu: dict, version: str) -> Path:
    """One timing cache per GPU model and TensorRT version (tactic timings are reusable across networks)."""
    return Path(cache_dir) / f"timing-{_slug(gpu['name'])}-sm{gpu['capability']}-trt{_slug(version)}.cache"


def write_engine_file(path: str | os.PathLike, header: dict, engine: bytes) -> Path:
    """Write the container atomically (a temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = json.dumps(header).encode()
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(MAGIC)
        fh.write(struct.pack("<I", len(head)))
        fh.write(head)
        fh.write(engine)
    return path


def read_engine_header(path: str | os.PathLike) -> dict:
    """The JSON header of an engine container (no TensorRT needed)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"{path} not found")
    with open(path, "rb") as fh:
        if fh.read(len(MAGIC)) != MAGIC:
            raise InvalidFile(f"{path}: not a fastcbm TensorRT engine (export one with "
                              "'fastcbm export MODEL_DIR --format tensorrt --out FILE')")
        (n,) = struct.unpack("<I", fh.read(4))
        try:
            return json.loads(fh.read(n))
        except json.JSONDecodeError:
            raise InvalidFile(f"{path}: corrupt engine header") from None


def read_engine_bytes(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as fh:
        fh.read(len(MAGIC))
        (n,) = struct.unpack("<I", fh.read(4))
        fh.seek(n, os.SEEK_CUR)
        return fh.read()


def engine_mismatch(header: dict, gpu: dict, version: str) -> str | None:
    """Why an engine cannot run here (one line), or None."""
    built_gpu, built_trt = header.get("gpu", {}), header.get("tensorrt")
    if header.get("engine_format") != ENGINE_FORMAT:
        return f"engine container format {header.get('engine_format')} (this fastcbm reads {ENGINE_FORMAT})"
    if built_trt != version:
        return f"built with TensorRT {built_trt}, this is TensorRT {version}"
    if built_gpu.get("name") != gpu["name"] or built_gpu.get("capability") != gpu["capability"]:
        return (f"built for {built_gpu.get('name')} (sm {built_gpu.get('capability')}), this GPU is {gpu['name']} "
                f"(sm {gpu['capability']})")
    return None


# -- building (GPU) -----------------------------------------------------------------------------------------------
def build_engine(onnx_path: str | os.PathLike, out: str | os.PathLike | None = None, *, max_batch: int | None = None,
                 opt_batch: int | None = None, cache_dir: str | os.PathLike | None = None, workspace_gb: float = 4.0,
                 device: int = 0, force: bool = False, tf32: bool = False) -> Path:
    """Build (or fetch from the engine cache) a strongly typed engine for an ONNX file written by
    :func:`fastcbm.deploy.export_onnx` and return the engine file's path (``out``, or the cache entry).

    ``max_batch`` defaults to the export's; the profile covers batch 1..max_batch at the export's input size.
    The engine cache lives in ``cache_dir`` (default ``~/.cache/fastcbm/tensorrt`` or ``$FASTCBM_CACHE_DIR``),
    keyed by :func:`engine_cache_key`; the timing cache sits next to it. ``tf32``: let fp32 layers use TF32 tensor
    cores (faster, ~1e-3 relative error); off by default so an fp32 engine matches PyTorch fp32.
    """
    import shutil

    from fastcbm.deploy.onnx_export import read_metadata
    from fastcbm.files import file_sha256

    meta = read_metadata(onnx_path)  # also: a clear error for a missing / foreign file, before TensorRT
    trt = import_tensorrt()
    gpu = gpu_identity(device)
    version = trt_version(trt)
    max_batch = int(max_batch or meta.get("max_batch") or 1)
    if max_batch > int(meta.get("max_batch") or max_batch):
        raise InvalidArgument(f"max_batch {max_batch} is above the ONNX export's {meta['max_batch']}: export again with "
                              "a larger --max-batch")
    profile = profile_shapes(int(meta["input_size"]), max_batch, opt_batch)
    sha = file_sha256(onnx_path)
    key = engine_cache_key(sha, gpu, version + ("+tf32" if tf32 else ""), profile)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cached = cache / f"{key}.engine"
    if cached.is_file() and not force:
        log.info("engine cache hit %s", cached)
    else:
        engine = _build_serialized(trt, onnx_path, profile, cache, gpu, version, workspace_gb, tf32)
        header = {"engine_format": ENGINE_FORMAT, "onnx_sha256": sha, "onnx_path": str(Path(onnx_path).resolve()),
                  "gpu": gpu, "tensorrt": version, "profile": {"min": profile.min, "opt": profile.opt,
                                                                 "max": profile.max},
                  "max_batch": max_batch, "metadata": meta}
        write_engine_file(cached, header, engine)
    if out is None:
        return cached
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, out)
    return out


def _build_serialized(trt, onnx_path, profile: Profile, cache: Path, gpu: dict, version: str,
                      workspace_gb: float, tf32: bool = False) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # strongly typed: the ONNX dtypes decide precision (TRT 10 needs the flag; were a later version to drop the flag,
    # strong typing is its only mode)
    strong = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    flags = 1 << int(strong) if strong is not None else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors[:500]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):  # TF32 is on by default: an fp32 engine should be fp32
        config.clear_flag(trt.BuilderFlag.TF32)
    opt_profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    opt_profile.set_shape(name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(opt_profile)
    tc_path = timing_cache_path(cache, gpu, version)
    timing = config.create_timing_cache(tc_path.read_bytes() if tc_path.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=True)  # a stale cache costs time, never correctness
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(tc_path, memoryview(config.get_timing_cache().serialize()))
    return bytes(memoryview(serialized))


def load_engine_file(path: str | os.PathLike, *, device: int = 0, rebuild: bool = True,
                     cache_dir: str | os.PathLike | None = None) -> tuple[dict, bytes]:
    """``(header, engine bytes)`` of an engine that runs on this GPU and TensorRT: a mismatched engine is rebuilt from
    its ONNX file when that file still exists with the same sha256 (and ``rebuild``), otherwise a ValueError says
    what it was built for and how to rebuild it."""
    from fastcbm.files import file_sha256

    header = read_engine_header(path)
    trt = import_tensorrt()
    gpu = gpu_identity(device)
    why = engine_mismatch(header, gpu, trt_version(trt))
    if why is None:
        return header, read_engine_bytes(path)
    src = Path(header.get("onnx_path", ""))
    if rebuild and src.is_file() and file_sha256(src) == header.get("onnx_sha256"):
        log.warning("%s: %s; rebuilding from %s", path, why, src)
        rebuilt = build_engine(src, path, max_batch=header.get("max_batch"), opt_batch=header["profile"]["opt"][0],
                               cache_dir=cache_dir, device=device)
        return read_engine_header(rebuilt), read_engine_bytes(rebuilt)
    raise InvalidFile(f"{path}: {why}; rebuild it here with 'fastcbm export MODEL_DIR --format tensorrt --out {path}'")


# -- running (GPU) ------------------------------------------------------------------------------------------------
class TensorRTSession:
    """A deserialized engine with one execution context; :meth:`run` takes a CUDA tensor and returns CUDA tensors
    (no host copies). Fixed shapes are replayed from a CUDA graph captured on their second call (``cuda_graphs``).

    UNTESTED here (no GPU, no TensorRT on the development machines): verified only where bench/gpu_check.sh runs."""

    def __init__(self, header: dict, engine: bytes, *, device: int = 0, cuda_graphs: bool = True):
        import torch

        trt = import_tensorrt()
        self.trt, self.header, self.device = trt, header, torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine)
        if self.engine is None:
            raise InvalidArgument("TensorRT could not deserialize the engine (built for another GPU or version?): "
                                  "rebuild it with 'fastcbm export MODEL_DIR --format tensorrt'")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.stream = torch.cuda.Stream(device=self.device)
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple, Any] = {}
        self._seen: set[tuple] = set()

    def _torch_dtype(self, name: str):
        import torch

        trt = self.trt
        table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
                 trt.DataType.UINT8: torch.uint8, trt.DataType.INT64: torch.int64}
        return table[self.engine.get_tensor_dtype(name)]

    def _enqueue(self, x, outs: dict) -> None:
        name = self.inputs[0]
        self.context.set_input_shape(name, tuple(x.shape))
        self.context.set_tensor_address(name, x.data_ptr())
        for n, t in outs.items():
            self.context.set_tensor_address(n, t.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")

    def _alloc(self, x) -> dict:
        import torch

        self.context.set_input_shape(self.inputs[0], tuple(x.shape))
        return {n: torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self._torch_dtype(n),
                               device=self.device) for n in self.outputs}

    def run(self, x) -> dict:
        import torch

        x = x.to(self.device, non_blocking=True).contiguous()
        key = (tuple(x.shape), x.dtype)
        torch.cuda.current_stream(self.device).synchronize()  # x was produced on the caller's stream
        if self.cuda_graphs and key in self._graphs:
            static_in, outs, graph = self._graphs[key]
            static_in.copy_(x)
            graph.replay()
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            return {n: t.clone() for n, t in outs.items()}
        outs = self._alloc(x)
        with torch.cuda.stream(self.stream):
            self._enqueue(x, outs)
        if self.cuda_graphs and key in self._seen:  # second call with this shape: capture it for the next ones
            try:
                static_in = x.clone()
                g_outs = self._alloc(static_in)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    self._enqueue(static_in, g_outs)
                self._graphs[key] = (static_in, g_outs, graph)
            except Exception as exc:  # noqa: BLE001 - capture is an optimisation: keep running without it
                log.warning("CUDA graph capture failed (%s); running without CUDA graphs", exc)
                self.cuda_graphs = False
        self._seen.add(key)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return outs
