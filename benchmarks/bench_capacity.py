"""Capacity speed: start-up of `capscale gmse int4` vs `python -c "import torch"` (target <= 1.3x); exact GMSE
vs per-interval numerical integration; Monte Carlo throughput and memory.

Run: python benchmarks/bench_capacity.py   (prints ratios against baselines measured in the same run)
"""
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
from scipy import integrate, optimize, stats

from capscale import capacity
from capscale.capacity import level_sets


def quad_grid_mse(levels, scale):
    """Baseline: integrate (x - level)^2 phi(x) numerically over every decision interval."""
    lv = np.sort(levels) * scale
    edges = np.concatenate([[-np.inf], (lv[1:] + lv[:-1]) / 2, [np.inf]])
    return sum(integrate.quad(lambda x, c=c: (x - c) ** 2 * stats.norm.pdf(x), a, b)[0]
               for a, b, c in zip(edges[:-1], edges[1:], lv))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def startup(repeats: int = 5) -> None:
    """Wall time of the whole command against importing torch alone, alternated so that load hits both alike."""
    commands = {"import torch": [sys.executable, "-c", "import torch"],
                "capscale gmse int4": [sys.executable, "-m", "capscale", "gmse", "int4"]}
    times = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    torch_s, gmse_s = (statistics.median(times[n]) for n in commands)
    print(f"start-up, median of {repeats}: `capscale gmse int4` {gmse_s:.2f} s, `python -c \"import torch\"` "
          f"{torch_s:.2f} s: ratio {gmse_s / torch_s:.2f} (target <= 1.3)")


def main():
    startup()
    levels = level_sets.uniform_levels(8)
    level_sets._optimal_scale_cached.cache_clear()
    exact, t_exact = timed(lambda: capacity.gmse("int8", exact=True).gmse)
    res, t_quad = timed(lambda: optimize.minimize_scalar(lambda c: quad_grid_mse(levels, c / 127.5),
                                                        bounds=(3.5, 4.5), method="bounded",
                                                        options={"xatol": 1e-6}))
    print(f"exact int8 GMSE with optimal scale: {exact:.6e} in {t_exact:.4f} s; "
          f"quad baseline {res.fun:.6e} in {t_quad:.2f} s; speed-up {t_quad / t_exact:.0f}x")

    for spec in ["int4", "int4(scale=rms)", "fp4_e2m1", "nvfp4", "vq(dim=2,bits=4)"]:
        capacity.gmse(spec, samples=1 << 16)  # warm caches (codebooks, optimal scales)
        n = 1 << 24 if "vq" not in spec else 1 << 22
        r, t = timed(lambda: capacity.gmse(spec, samples=n))
        print(f"Monte Carlo {spec:>18}: {n / t / 1e6:6.1f} M samples/s ({n} samples, GMSE {r.gmse:.5f})")

    capacity.gmse("int4", samples=1 << 20)
    rss_small = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    capacity.gmse("int4", samples=1 << 26)
    rss_large = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"peak RSS after 2^20 samples {rss_small / 1024:.0f} MiB, after 2^26 samples {rss_large / 1024:.0f} MiB "
          f"(ratio {rss_large / rss_small:.2f}: bounded memory)")


if __name__ == "__main__":
    main()
