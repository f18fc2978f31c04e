"""Import shims for third-party packages.

torchvision is published only as a CUDA build. With the CPU build of torch, ``import torchvision`` fails with
``operator torchvision::nms does not exist``: its registration code looks up operator schemas that its compiled
library (which needs CUDA libraries) would have defined. Declaring the two missing schemas lets the pure-Python parts
(transforms, models) import; open_clip needs exactly those. We apply this only when the plain import has failed
with that error, and only declare the schemas, never implementations: calling ``torchvision.ops.nms`` still fails.
"""

from __future__ import annotations

import importlib
import sys
import logging
from types import ModuleType

_MISSING_OP_MARKER = "torchvision::"
_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_library_handle = None  # keeps the torch.library.Library alive (its schemas vanish when it is garbage collected)
shim_applied = False


def _purge(prefix: str) -> None:
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


def _declare_torchvision_schemas() -> None:
    global _library_handle, shim_applied
    import torch

    if _library_handle is None:
        lib = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            try:
                lib.define(schema)
            except RuntimeError:  # already defined (a partial import got that far)
                pass
        _library_handle = lib
    shim_applied = True


def import_torchvision() -> ModuleType:
    """Import torchvision, declaring its missing operator schemas first if (and only if) the import needs that."""
    try:
        return importlib.import_module("torchvision")
    except (RuntimeError, ImportError) as exc:
        if _MISSING_OP_MARKER not in str(exc):
            raise
        first_error = exc
    _purge("torchvision")
    _declare_torchvision_schemas()
    try:
        module = importlib.import_module("torchvision")
    except Exception as exc:  # pragma: no cover - depends on the installed wheel
        raise ImportError(f"torchvision failed to import even with the CPU shim ({exc}); first error: {first_error}")
    logging.getLogger("fastcbm").info(
        "torchvision's compiled ops are unavailable with this torch build (CPU torch + CUDA torchvision); "
        "declared the nms/qnms schemas so transforms and models work (torchvision.ops will not)."
    )
    return module


def import_open_clip() -> ModuleType:
    """Import open_clip, going through :func:`import_torchvision` first so the CPU-torch case works."""
    try:
        import_torchvision()
    except ImportError:
        pass  # open_clip gives the clearer error below if it really needs torchvision
    try:
        return importlib.import_module("open_clip")
    except ImportError as exc:
        raise ImportError(f"open_clip is not installed ({exc}); pip install 'fastcbm[clip]'") from exc


def import_timm() -> ModuleType:
    """Import timm (which imports torchvision) through :func:`import_torchvision`."""
    try:
        import_torchvision()
    except ImportError:
        pass
    try:
        return importlib.import_module("timm")
    except ImportError as exc:
        raise ImportError(f"timm is not installed ({exc}); pip install 'fastcbm[clip]'") from exc
