"""``fastcbm.deploy.load(path, backend=...)``: one runner for exported graphs, TensorRT engines and saved SALF-CBM
folders, called on numpy arrays or torch tensors and returning a dict of named outputs.

- numpy in → numpy out; a CPU tensor in → CPU tensors out; a CUDA tensor in → CUDA tensors out with no host copy
  (onnxruntime I/O binding on the CUDA execution provider; TensorRT tensor addresses).
- ``backend="auto"``: TensorRT (an ``.engine``; an ``.onnx`` when TensorRT and a GPU are present), then onnxruntime
  (CUDA, then CPU execution provider), then torch (a saved SALF-CBM folder; ``torch.compile`` on CUDA where it works).
  A saved folder is exported to ONNX once (cached by the model's bytes) when an ONNX backend is asked for or chosen.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from fastcbm.errors import InvalidArgument, InvalidFile, MissingFile

log = logging.getLogger("fastcbm.deploy")

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")


def check_images(images: Any, meta: dict) -> None:
    """One clear line when ``images`` do not match what the graph was exported for."""
    inp = meta["input"]
    size, max_batch = int(meta["input_size"]), int(meta.get("max_batch") or 0)
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[1] != 3 or shape[2] != size or shape[3] != size:
        raise InvalidArgument(f"images must have shape [N, 3, {size}, {size}] (the exported input size), got {list(shape)}")
    want = "uint8" if inp["dtype"] == "uint8" else "float32"
    got = str(images.dtype).replace("torch.", "")
    if got != want:
        what = {"uint8": "uint8 pixels 0-255", "float32": "float32 pixels 0-1",
                "normalized": "float32 normalised pixels"}[inp["dtype"]]
        raise InvalidArgument(f"images must be {what} (the graph's input dtype), got dtype {got}")
    if shape[0] < 1:
        raise InvalidArgument("images: an empty batch")
    if max_batch and shape[0] > max_batch:
        raise InvalidArgument(f"batch of {shape[0]} images is above the maximum of {max_batch} this graph was exported/built "
                              "for: split the batch or export again with a larger --max-batch")


class Runner:
    """Callable: ``runner(images) -> {output name: array}``. ``metadata`` is the export's description (concept and
    class names, grid, input size and dtype, ...); ``backend`` says what runs it."""

    backend: str = ""
    metadata: dict

    @property
    def input_size(self) -> int:
        return int(self.metadata["input_size"])

    @property
    def input_dtype(self) -> str:
        return self.metadata["input"]["dtype"]

    @property
    def max_batch(self) -> int:
        return int(self.metadata.get("max_batch") or 0)

    @property
    def output_names(self) -> list[str]:
        return list(self.metadata["outputs"])

    def __call__(self, images: Any) -> dict:
        check_images(images, self.metadata)
        return self._run(images)

    def _run(self, images: Any) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r}, outputs={self.output_names})"


# -- onnxruntime -------------------------------------------------------------------------------------------------
class OnnxRuntimeRunner(Runner):
    """An onnxruntime session over an exported graph.

    ``spin`` (default False): whether idle intra-op threads busy-wait for the next op. Spinning saves microseconds
    on one lone session, but every session owns its own thread pool, so two sessions in one process (the classifier
    and the CLIP tower, or a logits-only and an explained graph) burn each other's cores: measured on 2 cores,
    ResNet-50 batch 1 took 108 ms with two interleaved spinning sessions and 66 ms without spinning (65 ms for one
    spinning session alone).
    """

    def __init__(self, path: str | os.PathLike, *, device: str | None = None, threads: int | None = None,
                 providers: list[str] | None = None, spin: bool = False):
        import onnxruntime as ort

        from fastcbm.deploy.onnx_export import read_metadata

        self.path = Path(path)
        self.metadata = read_metadata(path)
        available = ort.get_available_providers()
        if providers is None:
            want_cuda = device is None or str(device).startswith("cuda")
            providers = (["CUDAExecutionProvider"] if want_cuda and "CUDAExecutionProvider" in available else [])
            providers.append("CPUExecutionProvider")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = int(threads)
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        self.providers = self.session.get_providers()
        self.backend = "onnxruntime-cuda" if self.providers[0] == "CUDAExecutionProvider" else "onnxruntime-cpu"
        self.input_name = self.session.get_inputs()[0].name
        self._out = [o.name for o in self.session.get_outputs()]
        self._out_shapes = {o.name: o.shape for o in self.session.get_outputs()}

    def _run(self, images: Any) -> dict:
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a hard dependency of fastcbm
            torch = None
        if torch is not None and isinstance(images, torch.Tensor):
            static = all(isinstance(d, int) for shape in self._out_shapes.values() for d in shape[1:])
            if images.is_cuda and self.backend == "onnxruntime-cuda" and static:
                return self._run_cuda(images)
            outs = self.session.run(self._out, {self.input_name: images.detach().cpu().contiguous().numpy()})
            return {n: torch.from_numpy(o).to(images.device) for n, o in zip(self._out, outs)}
        outs = self.session.run(self._out, {self.input_name: np.ascontiguousarray(images)})
        return dict(zip(self._out, outs))

    def _run_cuda(self, images) -> dict:
        """I/O binding: the input and preallocated outputs stay on the GPU (UNTESTED here: needs a CUDA EP)."""
        import torch

        x = images.contiguous()
        n = x.shape[0]
        binding = self.session.io_binding()
        dev = x.device.index or 0
        binding.bind_input(self.input_name, "cuda", dev, _np_dtype(x.dtype), tuple(x.shape), x.data_ptr())
        outs = {}
        for name in self._out:
            shape = tuple(n if not isinstance(d, int) else d for d in self._out_shapes[name])
            t = torch.empty(shape, dtype=torch.float32, device=x.device)
            binding.bind_output(name, "cuda", dev, np.float32, shape, t.data_ptr())
            outs[name] = t
        torch.cuda.current_stream(x.device).synchronize()  # x must be ready: ORT runs on its own stream
        self.session.run_with_iobinding(binding)
        return outs


def _np_dtype(torch_dtype) -> Any:
    import torch

    return {torch.uint8: np.uint8, torch.float32: np.float32, torch.float16: np.float16}[torch_dtype]


# -- TensorRT ----------------------------------------------------------------------------------------------------
class TensorRTRunner(Runner):
    """A TensorRT engine (UNTESTED here: needs TensorRT and a GPU). numpy / CPU inputs are copied to the GPU once and
    the outputs back; CUDA inputs stay on the GPU."""

    backend = "tensorrt"

    def __init__(self, path: str | os.PathLike, *, device: int = 0, cuda_graphs: bool = True,
                 cache_dir: str | os.PathLike | None = None):
        from fastcbm.deploy import tensorrt as T

        path = Path(path)
        if path.suffix == ".onnx":  # build (or fetch from the engine cache) for this GPU
            path = T.build_engine(path, cache_dir=cache_dir, device=device)
        header, engine = T.load_engine_file(path, device=device, cache_dir=cache_dir)
        self.path = path
        self.metadata = dict(header["metadata"], max_batch=header.get("max_batch"))
        self.session = T.TensorRTSession(header, engine, device=device, cuda_graphs=cuda_graphs)

    def _run(self, images: Any) -> dict:
        import torch

        if isinstance(images, torch.Tensor):
            outs = self.session.run(images)
            return outs if images.is_cuda else {n: t.cpu() for n, t in outs.items()}
        outs = self.session.run(torch.from_numpy(np.ascontiguousarray(images)))
        return {n: t.cpu().numpy() for n, t in outs.items()}


# -- torch -------------------------------------------------------------------------------------------------------
class TorchRunner(Runner):
    """A saved SALF-CBM folder run by PyTorch through the same graph module the export traces
    (:class:`fastcbm.deploy.graph.ExplainedSALF`). ``compile``: ``"auto"`` uses ``torch.compile`` on CUDA (and falls
    back to eager if compiling fails), True/False force it."""

    backend = "torch"

    def __init__(self, folder: str | os.PathLike, *, device: str | None = None, input_dtype: str = "uint8",
                 compile: bool | str = "auto", max_batch: int = 0):
        import torch

        import fastcbm
        from fastcbm.deploy.graph import ExplainedSALF
        from fastcbm.models import load_backbone
        from fastcbm.salf.model import SALFCBM, read_config

        config = read_config(folder)
        backbone = load_backbone(config.backbone, pretrained=config.backbone_pretrained)
        model = SALFCBM.load(folder, backbone=backbone.model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.graph = ExplainedSALF(model, mean=backbone.mean, std=backbone.std, input_dtype=input_dtype).eval()
        self.graph.to(self.device)
        self.fn = self.graph
        if compile is True or (compile == "auto" and self.device.type == "cuda"):
            try:
                self.fn = torch.compile(self.graph)
            except Exception as exc:  # noqa: BLE001 - compile is an optimisation
                log.warning("torch.compile unavailable (%s); running eager", exc)
        self.backend = "torch-compile" if self.fn is not self.graph else "torch"
        size = int(backbone.input_size)
        self.metadata = {
            "format": "fastcbm.torch", "fastcbm_version": fastcbm.__version__, "kind": "salf",
            "concepts": list(config.concepts), "class_names": list(config.class_names), "grid": list(config.grid),
            "input": {"name": "images", "dtype": input_dtype, "shape": ["batch", 3, size, size],
                      "mean": list(backbone.mean), "std": list(backbone.std)},
            "input_size": size, "outputs": list(self.graph.outputs), "precision": "fp32", "max_batch": max_batch,
        }

    def _run(self, images: Any) -> dict:
        import torch

        as_numpy = not isinstance(images, torch.Tensor)
        x = torch.from_numpy(np.ascontiguousarray(images)) if as_numpy else images
        device = x.device
        with torch.inference_mode():
            try:
                outs = self.fn(x.to(self.device))
            except Exception as exc:
                if self.fn is self.graph:
                    raise
                log.warning("torch.compile failed (%s); running eager", str(exc).splitlines()[0][:200])
                self.fn, self.backend = self.graph, "torch"
                outs = self.fn(x.to(self.device))
        named = dict(zip(self.graph.outputs, outs))
        if as_numpy:
            return {n: t.cpu().numpy() for n, t in named.items()}
        return {n: t.to(device) for n, t in named.items()}


# -- load --------------------------------------------------------------------------------------------------------
def _is_model_folder(path: Path) -> bool:
    return path.is_dir()


def _folder_onnx(folder: Path, cache_dir: str | os.PathLike | None, input_dtype: str, precision: str) -> Path:
    """Export a saved folder to ONNX once, cached under a key of its bytes."""
    from fastcbm.deploy.onnx_export import export_onnx
    from fastcbm.files import file_sha256
    from fastcbm.deploy.tensorrt import cache_root

    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        h.update(file_sha256(folder / name).encode())
    h.update(f"{input_dtype}/{precision}".encode())
    root = (Path(cache_dir) if cache_dir else cache_root()) / "onnx"
    path = root / f"{h.hexdigest()[:32]}.onnx"
    if not path.is_file():
        export_onnx(folder, path, input_dtype=input_dtype, precision=precision)
    return path


def load(path: str | os.PathLike, backend: str = "auto", *, device: str | None = None, threads: int | None = None,
         input_dtype: str = "uint8", cache_dir: str | os.PathLike | None = None, cuda_graphs: bool = True,
         compile: bool | str = "auto") -> Runner:
    """A runner for ``path``: an ONNX file from :func:`fastcbm.deploy.export_onnx`, a TensorRT ``.engine`` from
    ``fastcbm export --format tensorrt``, or a saved SALF-CBM folder. See the module docstring for ``auto``.
    ``device``: "cpu" | "cuda" | "cuda:N" (default: CUDA when present). ``threads``: onnxruntime intra-op threads.
    ``input_dtype`` applies to a folder (the dtype of the images the runner will get). ``cache_dir``: root of the
    exported-ONNX (``onnx/``) and TensorRT engine (``tensorrt/``) caches (default ``~/.cache/fastcbm`` or
    ``$FASTCBM_CACHE_DIR``)."""
    from fastcbm.deploy.onnx_export import read_metadata
    from fastcbm.deploy.tensorrt import MAGIC, TensorRTUnavailableError

    if backend not in BACKENDS:
        raise InvalidArgument(f"backend must be one of {BACKENDS}, got {backend!r}")
    path = Path(path)
    if not path.exists():
        raise MissingFile(f"{path} not found")
    gpu_index = int(str(device).split(":")[1]) if device and ":" in str(device) else 0
    trt_cache = Path(cache_dir) / "tensorrt" if cache_dir else None
    if _is_model_folder(path):
        from fastcbm.salf.model import read_config

        read_config(path)  # a folder that is not a saved model: one clear line
        if backend == "torch":
            return TorchRunner(path, device=device, input_dtype=input_dtype, compile=compile)
        if backend == "auto":
            try:
                onnx_path = _folder_onnx(path, cache_dir, input_dtype, "fp32")
            except Exception as exc:  # noqa: BLE001 - export is an optimisation for auto: fall back to torch
                log.warning("ONNX export of %s failed (%s); using torch", path, str(exc).splitlines()[0][:200])
                return TorchRunner(path, device=device, input_dtype=input_dtype, compile=compile)
        else:
            onnx_path = _folder_onnx(path, cache_dir, input_dtype, "fp32")
        return load(onnx_path, backend, device=device, threads=threads, cache_dir=cache_dir, cuda_graphs=cuda_graphs)
    with open(path, "rb") as fh:
        is_engine = fh.read(len(MAGIC)) == MAGIC
    if is_engine:
        if backend not in ("auto", "tensorrt"):
            raise InvalidFile(f"{path} is a TensorRT engine: only backend 'tensorrt' (or 'auto') runs it")
        return TensorRTRunner(path, device=gpu_index, cuda_graphs=cuda_graphs, cache_dir=trt_cache)
    read_metadata(path)  # a clear error for a file that is not a fastcbm ONNX export
    if backend == "torch":
        raise InvalidFile(f"{path}: backend 'torch' runs a saved SALF-CBM folder, not an ONNX file")
    if backend == "tensorrt":
        return TensorRTRunner(path, device=gpu_index, cuda_graphs=cuda_graphs, cache_dir=trt_cache)
    if backend == "auto" and (device is None or str(device).startswith("cuda")):
        try:
            return TensorRTRunner(path, device=gpu_index, cuda_graphs=cuda_graphs, cache_dir=trt_cache)
        except TensorRTUnavailableError as exc:
            log.info("%s", exc)
        except RuntimeError as exc:  # a graph TensorRT cannot parse or build: auto still serves it
            log.warning("TensorRT failed (%s); using onnxruntime", str(exc).splitlines()[0][:200])
    return OnnxRuntimeRunner(path, device=device, threads=threads)
