"""Benchmark: NRA (official + paper) and EPG backends vs the authors' per-pixel loop and a per-threshold loop.

    python bench/metrics.py                # CPU: 200 maps at 224x224; naive loops on 20 maps, extrapolated per map
    python bench/metrics.py --device cuda  # GPU: 10,000 maps
    python bench/metrics.py --quick

Prints a table (median and p10/p90 seconds per call over N maps, maps/s, speed-up vs the baselines measured in the
same run) and appends rows to bench/results/metrics.csv.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import time
from pathlib import Path
from _timing import quantiles

import torch
import torch.nn.functional as F

import fastcbm
from fastcbm.backends import backend_problem, implemented
from fastcbm.metrics import epg, nra
from fastcbm.metrics.baselines import loop_paper_nra, naive_official_nra

RESULTS = Path(__file__).resolve().parent / "results" / "metrics.csv"


# ---- baselines: the authors' per-pixel loop and a per-threshold loop (fastcbm.metrics.baselines) ----------
# ---- timing ------------------------------------------------------------------------------------------------------
def timed(fn, repeats: int, device: torch.device) -> list[float]:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()  # warm-up (Triton compilation, caches, thread pool)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times



def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_data(n: int, size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth saliency-like maps (14x14 upsampled, no resize inside the timed call) and blob masks."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 14, 14, generator=gen)
    maps = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    maps = maps + 1e-3 * torch.rand(n, size, size, generator=gen)
    blob = F.interpolate(torch.rand(n, 1, 7, 7, generator=gen), size=(size, size), mode="bilinear")[:, 0]
    masks = blob > 0.7
    return maps.to(device), masks.to(device)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=None, help="maps per call (default 200 on CPU, 10000 on GPU)")
    ap.add_argument("--size", type=int, default=224, help="mask side length (default 224)")
    ap.add_argument("--naive-n", type=int, default=20, help="maps for the Python-loop baselines (extrapolated)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="small run: 40 maps, 5 naive maps, 3 repeats")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    n = args.n or (10_000 if device.type == "cuda" else 200)
    naive_n, repeats = args.naive_n, args.repeats
    if args.quick:
        n, naive_n, repeats = min(n, 40), min(naive_n, 5), 3
    maps, masks = make_data(n, args.size, device)
    # the Triton interpreter on CPU is a correctness tool, far too slow to time at 224x224
    def runnable(op: str, variant: str = "default") -> list[str]:  # from the op registry
        return [b for b in implemented(op, variant)
                if backend_problem(b, device) is None and not (b == "triton" and device.type == "cpu")]

    rows = []
    x_np, m_np = maps[:naive_n].float().cpu().numpy(), masks[:naive_n].cpu().numpy()
    for metric, variant, base_name, base_fn in (
        ("nra_official", "official", "naive per-pixel loop", naive_official_nra),
        ("nra_paper", "paper", "per-threshold loop", loop_paper_nra),
    ):
        t = timed(lambda: [base_fn(x_np[i], m_np[i]) for i in range(naive_n)], 1, device)
        base_per_map = t[0] / naive_n
        rows.append((metric, f"{base_name} (extrapolated from {naive_n} maps)", base_per_map * n,
                     base_per_map * n, base_per_map * n, 1.0))
        for b in runnable("metrics.nra", variant):
            med, p10, p90 = quantiles(timed(lambda: nra(maps, masks, variant=variant, backend=b), repeats, device))
            rows.append((metric, b, med, p10, p90, base_per_map * n / med))
    ref_epg = None
    for b in runnable("metrics.epg"):
        med, p10, p90 = quantiles(timed(lambda: epg(maps, masks, backend=b), repeats, device))
        ref_epg = ref_epg or med
        rows.append(("epg", b, med, p10, p90, ref_epg / med))

    hw = hardware(device)
    print(f"fastcbm {fastcbm.__version__}, torch {torch.__version__}, {hw}; {n} maps of {args.size}x{args.size}, "
          f"{repeats} timed repeats after a warm-up")
    print(f"baselines run on {naive_n} maps and are extrapolated linearly to {n} maps; "
          "speed-up: NRA vs its loop baseline, EPG vs the reference backend")
    print(f"{'metric':<13} {'implementation':<48} {'median s':>10} {'p10 s':>10} {'p90 s':>10} {'maps/s':>11} "
          f"{'speed-up':>9}")
    for metric, impl, med, p10, p90, ratio in rows:
        print(f"{metric:<13} {impl:<48} {med:>10.4f} {p10:>10.4f} {p90:>10.4f} {n / med:>11.1f} {ratio:>8.1f}x")

    if not args.no_csv:
        from _rows import append_rows

        date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        append_rows(RESULTS, [{"date": date, "hardware": hw, "torch": torch.__version__, "fastcbm": fastcbm.__version__,
                               "device": device.type, "metric": metric, "implementation": impl, "n_maps": n,
                               "size": args.size, "median_s": med, "p10_s": p10, "p90_s": p90, "maps_per_s": n / med,
                               "speedup": ratio, "quick": args.quick}
                              for metric, impl, med, p10, p90, ratio in rows])


if __name__ == "__main__":
    main()
