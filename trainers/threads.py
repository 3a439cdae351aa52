"""How many CPU threads a run gets by default: what its matmuls can use, and no more than the cores free.

torch's default (every core) is wrong on a machine with other work: the threads wait for each other (the
README's 20k-parameter run took 154 s with the default under load and 9.6 s with one thread), so the threads
are the cores not busy; and a small model's matmuls gain nothing from many threads, so its size caps them.
`benchmarks/bench_threads.py` measures the rule against every setting, idle and beside a busy process.
"""
from __future__ import annotations

import os

# Caps by model size (non-embedding parameters) for machines with many free cores: below 300k at most 2
# threads, below 5M at most 4. On 2 idle cores two threads were faster at every size measured (20k: 72k vs
# 53k tokens/s), so the free cores, not the size, decide on small machines.
SIZE_CAPS = ((3e5, 2), (5e6, 4))
MAX_THREADS = 1024  # torch crashes (a segmentation fault) when asked for 100,000 threads; no machine has that many


def free_cores() -> int:
    """The cores this process may use, less the work already running on the machine (1-minute load average)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def default_threads(n_params: float, cores: int | None = None) -> int:
    """Threads for a model of `n_params` non-embedding parameters on `cores` free cores (default: measured)."""
    cap = next((most for below, most in SIZE_CAPS if n_params < below), 1 << 20)
    return max(1, min(cap, free_cores() if cores is None else cores))
