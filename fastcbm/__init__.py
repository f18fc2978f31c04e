"""fastcbm: concept bottleneck models and concept explanations for vision models, fast.

Public entry points live in submodules (``fastcbm.metrics``, ``fastcbm.models``, ...); importing ``fastcbm`` itself
stays light (no open_clip, no triton).
"""

from __future__ import annotations

__version__ = "0.1.0"

from fastcbm.backends import BACKENDS, BackendUnavailableError, available_backends  # noqa: E402

__all__ = ["__version__", "BACKENDS", "BackendUnavailableError", "available_backends"]
