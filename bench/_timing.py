"""Timing and memory helpers shared by the bench scripts."""

from __future__ import annotations

import statistics


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    """(median, p10, p90) of the timed repeats (all three the single value when there is one)."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(sorted(xs), n=10, method="inclusive")
    return statistics.median(xs), q[0], q[-1]


def rss_kib(field: str) -> int:
    """A memory field of ``/proc/self/status`` in KiB (``VmRSS``, ``VmHWM``, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_start(cuda: bool) -> int:
    """Start measuring a step's peak extra memory; returns the baseline for :func:`peak_extra_bytes`.
    GPU: memory allocated now, peak statistics reset. CPU: resident set now, after resetting the kernel's high-water
    mark (``/proc/self/clear_refs`` ← 5; run with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed buffers leave RSS)."""
    if cuda:
        import torch

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_kib("VmRSS") * 1024


def peak_extra_bytes(cuda: bool, base: int) -> int:
    """Peak memory since :func:`peak_start` beyond its baseline, in bytes."""
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated() - base
    return rss_kib("VmHWM") * 1024 - base
