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
