"""Import shims for third-party packages.

torchvision is published only as a CUDA build. With the CPU build of torch, ``import torchvision`` fails with
``operator torchvision::nms does not exist``: its registration code looks up operator schemas that its compiled
library (which needs CUDA libraries) would have defined. Declaring the two missing schemas lets the pure-Python parts
(transforms, models) import; open_clip needs exactly those. We apply this only when the plain import has failed
with that error, and only declare the schemas, never implementations: calling ``torchvision.ops.nms`` still fails.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
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


class _ReadyLoader(importlib.abc.Loader):
    """Hands the import system a module that :func:`import_torchvision` has already imported."""

    def __init__(self, module: ModuleType):
        self.module = module
        self.spec = module.__spec__

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        module.__spec__ = self.spec  # the import system overwrote it with ours: give back torchvision's own


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Routes the first ``import torchvision`` through :func:`import_torchvision` (one-shot, removes itself)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "torchvision":
            return None
        remove_torchvision_hook()
        try:
            module = import_torchvision()
        except Exception:
            return None  # let the ordinary import run and raise its own error
        return importlib.util.spec_from_loader("torchvision", _ReadyLoader(module))


_finder: _TorchvisionFinder | None = None


def install_torchvision_hook() -> None:
    """After this, a plain ``import torchvision`` anywhere works on CPU torch with the CUDA torchvision wheel (the
    shim above is applied on the first import, and only if that import needs it). Costs nothing until then;
    ``import fastcbm`` installs it."""
    global _finder
    if "torchvision" in sys.modules or _finder is not None:
        return
    _finder = _TorchvisionFinder()
    sys.meta_path.insert(0, _finder)


def remove_torchvision_hook() -> None:
    global _finder
    if _finder is not None and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    _finder = None


from fastcbm.errors import WeightsUnavailableError  # noqa: E402,F401  (re-exported: its home is fastcbm.errors)


_DOWNLOAD_LOGGERS = ("huggingface_hub", "urllib3", "timm", "open_clip", "filelock")


class quiet_downloads:
    """Silence the per-retry warnings of the download stacks (huggingface_hub retries each file with a warning per
    attempt when offline) unless debug logging (``-vv``) is on: a failure then surfaces as one
    :class:`WeightsUnavailableError` line instead of pages of retries."""

    def __enter__(self):
        import warnings

        self._levels = {}
        if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
            return self
        for name in _DOWNLOAD_LOGGERS:
            lg = logging.getLogger(name)
            self._levels[name] = lg.level
            lg.setLevel(logging.ERROR)
        self._warn = warnings.catch_warnings()
        self._warn.__enter__()
        warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc):
        if self._levels:
            self._warn.__exit__(*exc)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        return False
