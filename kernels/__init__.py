"""Triton kernels of fastcbm; installed as ``fastcbm.kernels`` (there is no top-level ``kernels`` package).

Modules here import triton at import time, so import them lazily from the dispatchers. On CPU-only machines set
``TRITON_INTERPRET=1`` before importing triton to run them in the interpreter (small fp32 shapes only).
"""
