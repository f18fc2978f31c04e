"""Deployment: one exported graph that predicts *and* explains (ONNX, TensorRT), and a runtime with fallbacks.

- :func:`export_onnx` — a trained SALF-CBM → ONE ONNX graph: raw pixels → ``logits``, ``concepts``,
  ``concept_maps``, ``contributions``; :func:`export_clip_onnx` — a CLIP image tower (what precompute encodes with).
- :func:`build_engine` — a strongly typed TensorRT engine from such a graph (guarded: a clear error without TensorRT).
- :func:`load` — a runner (TensorRT → onnxruntime → torch) called on numpy arrays or torch tensors.

Importing this package is light: onnx, onnxruntime and tensorrt are imported when used.
"""

from __future__ import annotations

from fastcbm.deploy.graph import INPUT_DTYPES, SALF_OUTPUTS
from fastcbm.deploy.onnx_export import export_clip_onnx, export_onnx, read_metadata
from fastcbm.deploy.runtime import BACKENDS, Runner, check_images, load
from fastcbm.deploy.tensorrt import TensorRTUnavailableError, build_engine

__all__ = ["BACKENDS", "INPUT_DTYPES", "SALF_OUTPUTS", "Runner", "TensorRTUnavailableError", "build_engine",
           "check_images", "export_clip_onnx", "export_onnx", "load", "read_metadata"]
