"""ONNX export of an explained SALF-CBM and of a CLIP image tower, with the labels a runner needs in the file.

Exporter facts this relies on (DESIGN §5): the dynamo exporter freezes a traced batch of 1, so the example batch is 2
and the batch dimension is declared dynamic; its lowest opset is 18 (asking it for 17 fails to down-convert a
``ReduceMean``). The default, opset 17, goes through the TorchScript exporter (which needs the
``nn.MultiheadAttention`` fast path off): on this project's models it gives the same graph to 1e-5 and exports 5-15×
faster (testbed SALF-CBM: 1.7 s against 9-25 s). ``exporter="dynamo"`` (opset >= 18) is the other path; should the
TorchScript exporter be gone from a future torch, ``"auto"`` falls back to dynamo at opset 18.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from fastcbm.deploy.graph import (
    INPUT_DTYPES,
    SALF_OUTPUTS,
    ClipImageTower,
    ExplainedSALF,
)
from fastcbm.errors import InvalidArgument, InvalidFile, MissingFile
from fastcbm.files import atomic_path

log = logging.getLogger("fastcbm.deploy")

META_KEY = "fastcbm"  # metadata_props key holding the JSON description
DEFAULT_OPSET = 17
EXPORTERS = ("auto", "torchscript", "dynamo")
DEFAULT_MAX_BATCH = 64


def _check_common(input_dtype: str, precision: str, max_batch: int, opset: int, exporter: str = "auto") -> None:
    if exporter not in EXPORTERS:
        raise InvalidArgument(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if exporter == "dynamo" and opset < 18:
        raise InvalidArgument(f"the dynamo exporter needs opset >= 18, got {opset}")
    if input_dtype not in INPUT_DTYPES:
        raise InvalidArgument(f"input_dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}")
    if precision not in ("fp32", "fp16"):
        raise InvalidArgument(f"precision must be 'fp32' or 'fp16', got {precision!r}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise InvalidArgument(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if opset < 17:
        raise InvalidArgument(f"opset must be >= 17, got {opset}")


def _backbone_spec(config) -> tuple[int, tuple, tuple]:
    """``(input_size, mean, std)`` of a SALF-CBM's backbone, from its name (random init: only the metadata is read)."""
    from fastcbm.models import load_backbone

    bb = load_backbone(config.backbone, pretrained=None)
    return int(bb.input_size), tuple(bb.mean), tuple(bb.std)


def _load_salf(model: Any):
    """A SALFCBM from an object or a saved model folder."""
    from fastcbm.salf.model import SALFCBM

    if isinstance(model, (str, os.PathLike)):
        return SALFCBM.load(model)
    if not isinstance(model, SALFCBM):
        raise TypeError(f"model must be a SALFCBM or a saved SALF-CBM folder, got {type(model).__name__}")
    return model


def export_onnx(model: Any, path: str | os.PathLike, *, input_dtype: str = "uint8", precision: str = "fp32",
                max_batch: int = DEFAULT_MAX_BATCH, opset: int = DEFAULT_OPSET,
                outputs: tuple[str, ...] = SALF_OUTPUTS, backbone: Any = None, input_size: int | None = None,
                mean: tuple | None = None, std: tuple | None = None, exporter: str = "auto") -> Path:
    """Export a trained SALF-CBM (an object or a saved folder) as ONE ONNX graph that predicts and explains.

    Input ``images [N, 3, S, S]`` (``input_dtype``: ``"uint8"`` 0..255, ``"float32"`` 0..1 or ``"normalized"``) at the
    backbone's input size S; outputs ``logits [N, K]``, ``concepts [N, M]``, ``concept_maps [N, M, Gy, Gx]``,
    ``contributions [N, M]`` (fp32; ``outputs`` picks a subset). The batch is dynamic (1..``max_batch``, recorded for
    runners and TensorRT profiles). ``precision="fp16"``: a reduced-precision graph (backbone and bottleneck in fp16).
    The backbone's input size, mean and std come from ``backbone`` (a :class:`fastcbm.models.Backbone`), the explicit
    arguments, or the backbone's name in the model's config. ``metadata_props["fastcbm"]`` records concept and class
    names, grid, input size/dtype/range, mean/std, outputs, precision, max batch and the fastcbm version.
    """
    _check_common(input_dtype, precision, max_batch, opset, exporter)
    model = _load_salf(model)
    if backbone is not None:
        input_size = input_size or int(backbone.input_size)
        mean, std = mean or tuple(backbone.mean), std or tuple(backbone.std)
    if input_size is None or mean is None or std is None:
        s, m, d = _backbone_spec(model.config)
        input_size, mean, std = input_size or s, mean or m, std or d
    graph = ExplainedSALF(model, mean=mean, std=std, input_dtype=input_dtype, precision=precision,
                          outputs=tuple(outputs)).eval()
    cfg = model.config
    meta = {"kind": "salf", "concepts": list(cfg.concepts), "class_names": list(cfg.class_names),
            "grid": list(cfg.grid), "backbone": cfg.backbone, "feature_layer": model.layer,
            "pooling": cfg.pooling}
    return _export(graph, path, meta=meta, input_size=int(input_size), mean=mean, std=std, input_dtype=input_dtype,
                   precision=precision, max_batch=max_batch, opset=opset, exporter=exporter)


def export_clip_onnx(model: Any, path: str | os.PathLike, *, pretrained: str | None = None, preprocess: Any = None,
                     input_dtype: str = "normalized", precision: str = "fp32", max_batch: int = DEFAULT_MAX_BATCH,
                     opset: int = DEFAULT_OPSET, model_name: str | None = None, exporter: str = "auto") -> Path:
    """Export a CLIP image tower (``model.encode_image``; a model or a :func:`fastcbm.models.load_clip` name) as an
    ONNX graph ``images [N, 3, S, S]`` → ``embedding [N, D]`` (fp32, un-normalised). ``input_dtype`` defaults to
    ``"normalized"``: the input space ``fastcbm precompute`` renders its ring prompts in."""
    from fastcbm.models.inputs import encoder_input_config

    _check_common(input_dtype, precision, max_batch, opset, exporter)
    if isinstance(model, str):
        from fastcbm.models import load_clip

        model_name = model_name or model
        model, preprocess, _ = load_clip(model, pretrained)
    model = model.eval().float()
    size, mean, std = encoder_input_config(model, preprocess)
    graph = ClipImageTower(model, mean=mean, std=std, input_dtype=input_dtype, precision=precision).eval()
    meta = {"kind": "clip_image", "model": model_name or type(model).__name__, "pretrained": pretrained}
    return _export(graph, path, meta=meta, input_size=size, mean=mean, std=std, input_dtype=input_dtype,
                   precision=precision, max_batch=max_batch, opset=opset, exporter=exporter)


def _export(graph: torch.nn.Module, path: str | os.PathLike, *, meta: dict, input_size: int, mean, std,
            input_dtype: str, precision: str, max_batch: int, opset: int, exporter: str) -> Path:
    import onnx

    import fastcbm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = torch.uint8 if input_dtype == "uint8" else torch.float32
    device = next(iter(graph.buffers()), torch.zeros(0)).device  # trace where the model lives (CPU or GPU)
    example = torch.zeros((2, 3, input_size, input_size), dtype=dtype, device=device)  # batch 2: 1 would be frozen
    names = list(graph.outputs)
    with atomic_path(path) as tmp:  # never a half-written model under the final name, never a temp file left
        auto = exporter == "auto"
        if auto:
            exporter = "torchscript" if opset < 18 else "dynamo"
        if exporter == "torchscript":
            try:
                _torchscript_export(graph, example, tmp, names, opset)
            except Exception as exc:  # a torch without the TorchScript exporter: use dynamo at 18
                if not auto:
                    raise
                log.warning("TorchScript ONNX export failed (%s: %s); using the dynamo exporter at opset 18",
                            type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
                exporter, opset = "dynamo", max(opset, 18)
        if exporter == "dynamo":
            _dynamo_export(graph, example, tmp, names, opset, max_batch)
        with torch.no_grad():  # the true output shapes: the exporter leaves e.g. the resized grid dims symbolic
            shapes = {n: tuple(t.shape) for n, t in zip(names, graph(example))}
        proto = onnx.load(str(tmp))
        # declare every output as [batch, static dims...] so runners (and TensorRT) can preallocate them
        for vi in list(proto.graph.input) + list(proto.graph.output):
            dims = vi.type.tensor_type.shape.dim
            if dims and not dims[0].HasField("dim_value"):
                dims[0].dim_param = "batch"
            for d, size in zip(list(dims)[1:], shapes.get(vi.name, ())[1:]):
                d.dim_value = int(size)
        description = {
            "format": "fastcbm.onnx", "version": 1, "fastcbm_version": fastcbm.__version__, **meta,
            "input": {"name": "images", "dtype": input_dtype, "shape": ["batch", 3, input_size, input_size],
                      "range": {"uint8": "0-255", "float32": "0-1", "normalized": "normalized"}[input_dtype],
                      "mean": [float(v) for v in mean], "std": [float(v) for v in std]},
            "input_size": input_size, "outputs": names, "precision": precision, "max_batch": max_batch,
            "opset": opset, "exporter": exporter,
        }
        del proto.metadata_props[:]
        for key, value in {META_KEY: json.dumps(description), "fastcbm_version": fastcbm.__version__,
                           "input_dtype": input_dtype, "input_size": str(input_size)}.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.producer_name = "fastcbm"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    log.info("exported %s (%s, %s, opset %d, max batch %d)", path, meta["kind"], precision, opset, max_batch)
    return path


def _dynamo_export(graph, example, tmp: Path, names: list[str], opset: int, max_batch: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation chatter; real failures raise
        torch.onnx.export(graph, (example,), str(tmp), dynamo=True, opset_version=opset, input_names=["images"],
                          output_names=names, dynamic_shapes={"images": {0: batch}}, optimize=True, verbose=False,
                          external_data=False)


def _torchscript_export(graph, example, tmp: Path, names: list[str], opset: int) -> None:
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # TorchScript cannot trace MHA's fused fast path
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (example,), str(tmp), dynamo=False, opset_version=opset, input_names=["images"],
                              output_names=names, dynamic_axes={"images": {0: "batch"}, **{n: {0: "batch"} for n in names}})
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def read_metadata(path: str | os.PathLike) -> dict:
    """The fastcbm description stored in an exported ONNX file (without loading its weights)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"{path} not found")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and friends: say what the file is not
        raise InvalidFile(f"{path}: not an ONNX file ({type(exc).__name__})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in props:
        raise InvalidFile(f"{path}: an ONNX file without fastcbm metadata (export it with fastcbm export)")
    return json.loads(props[META_KEY])
