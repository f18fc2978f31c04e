"""fastcbm: concept bottleneck models and concept explanations for vision models, fast.

Public entry points live in submodules (``fastcbm.metrics``, ``fastcbm.models``, ...); importing ``fastcbm`` itself
stays light (no open_clip, no triton).
"""

from __future__ import annotations

__version__ = "0.1.0"

from fastcbm.compat import install_torchvision_hook  # noqa: E402

# `import fastcbm` then `import torchvision` works on CPU torch too (the CUDA-only torchvision wheel; fastcbm.compat)
install_torchvision_hook()

from fastcbm.backends import BACKENDS, BackendUnavailableError, available_backends  # noqa: E402

__all__ = ["__version__", "BACKENDS", "BackendUnavailableError", "available_backends"]
