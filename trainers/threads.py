"""How many CPU threads a run gets by default: what its matmuls can use, and no more than the cores free.

torch's default (every core) is right for large matmuls on an idle machine and wrong for the small models a
CPU study trains: their matmuls are too small to split, so extra threads only synchronise, and on a machine
with other work the threads wait for each other (the README's 20k-parameter run took 154 s with the default
under load and 9.6 s with one thread). `benchmarks/bench_threads.py` measures the rule against every setting.
"""
from __future__ import annotations

import os

ONE_THREAD_BELOW = 3e5   # non-embedding parameters: below this, one thread
TWO_THREADS_BELOW = 5e6  # below this, at most two


def free_cores() -> int:
    """The cores this process may use, less the work already running on the machine (1-minute load average)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def default_threads(n_params: float, cores: int | None = None) -> int:
    """Threads for a model of `n_params` non-embedding parameters on `cores` free cores (default: measured)."""
    wanted = 1 if n_params < ONE_THREAD_BELOW else 2 if n_params < TWO_THREADS_BELOW else 1 << 20
    return max(1, min(wanted, free_cores() if cores is None else cores))
