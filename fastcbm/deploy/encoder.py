"""A CLIP image tower run by an exported graph, for ``fastcbm precompute --engine onnxruntime|tensorrt``.

:func:`engine_encoder` exports the tower once (input: the normalised images precompute renders its ring prompts in)
and returns an object with the two things precompute uses: ``encode_image(x [B, 3, S, S]) -> [B, D]`` and ``visual``
(the original tower, for its input size and output width). Precompute's bytes then come from onnxruntime / TensorRT
instead of PyTorch: equal to fp32 PyTorch within ~1e-5 before the fp16 storage rounding.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastcbm.errors import InvalidArgument

log = logging.getLogger("fastcbm.deploy")

ENGINES = ("torch", "onnxruntime", "tensorrt")


class EngineEncoder:
    """``encode_image`` through a :func:`fastcbm.deploy.load` runner, in chunks of at most its maximum batch."""

    def __init__(self, runner, visual: Any, workdir: Any = None):
        self.runner, self.visual, self._workdir = runner, visual, workdir
        self.engine = runner.backend

    def eval(self) -> EngineEncoder:
        return self

    def to(self, *_args, **_kwargs) -> EngineEncoder:
        return self

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``[B, 3, S, S]`` (any float dtype, any device) → embeddings ``[B, D]`` fp32 on the same
        device (CUDA stays on the GPU with a GPU runner)."""
        x = x.float()
        gpu_runner = self.runner.backend in ("tensorrt", "onnxruntime-cuda")
        outs = []
        for lo in range(0, x.shape[0], self.runner.max_batch or x.shape[0]):
            chunk = x[lo:lo + (self.runner.max_batch or x.shape[0])].contiguous()
            if gpu_runner and chunk.is_cuda:
                outs.append(self.runner(chunk)["embedding"])
            else:
                emb = self.runner(chunk.cpu().numpy())["embedding"]
                outs.append(torch.from_numpy(np.asarray(emb)).to(x.device))
        return torch.cat(outs)


def engine_encoder(model: torch.nn.Module, preprocess: Any, engine: str, *, device: torch.device | str = "cpu",
                   max_batch: int = 64, dtype: torch.dtype = torch.float32, model_name: str | None = None,
                   workdir: str | Path | None = None) -> EngineEncoder:
    """Export ``model``'s image tower and load it with ``engine`` ("onnxruntime" or "tensorrt"; TensorRT engines are
    cached by GPU, TensorRT version and ONNX hash). A reduced-precision (fp16) graph when ``dtype`` is not fp32 on a
    GPU, mirroring precompute's autocast. The ONNX file lives in ``workdir`` (default: a temporary folder kept as long
    as the encoder)."""
    from fastcbm.deploy.onnx_export import export_clip_onnx
    from fastcbm.deploy.runtime import load
    from fastcbm.deploy.tensorrt import (
        TensorRTUnavailableError,
        gpu_identity,
        import_tensorrt,
    )

    if engine not in ENGINES or engine == "torch":
        raise InvalidArgument(f"engine must be 'onnxruntime' or 'tensorrt' here ('torch' needs no export), got {engine!r}")
    if engine == "tensorrt":  # before the export: say in one line why it cannot run here
        try:
            import_tensorrt()
            gpu_identity()
        except TensorRTUnavailableError as exc:
            raise InvalidArgument(f"engine 'tensorrt': {exc}") from None
    device = torch.device(device)
    precision = "fp16" if device.type == "cuda" and dtype != torch.float32 else "fp32"
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fastcbm-engine-")
        workdir = tmp.name
    cpu_model = copy.deepcopy(model).cpu().float().eval()  # the caller's model stays where it is
    path = export_clip_onnx(cpu_model, Path(workdir) / "clip_image.onnx", preprocess=preprocess,
                            input_dtype="normalized", precision=precision, max_batch=int(max_batch),
                            model_name=model_name)
    del cpu_model
    runner = load(path, backend=engine, device=str(device))
    log.info("precompute encodes with %s (%s graph, max batch %d)", runner.backend, precision, max_batch)
    return EngineEncoder(runner, getattr(model, "visual", None), tmp)
