"""Fan work out over forked processes, in interleaved chunks so that every chunk mixes early and late items."""
from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Sequence


def chunked_map(work: Callable[[list], list], items: Sequence, n_jobs: int, n_chunks: int,
                done: Callable[[int], None] | None = None) -> list:
    """`work(chunk)` returns one result per item of its chunk; the results come back in the items' order.
    `done(k)` is called as each chunk of k items finishes (a progress bar's update)."""
    n_chunks = max(1, min(n_chunks, len(items)))
    chunks = [list(items[i::n_chunks]) for i in range(n_chunks)]
    results = [None] * len(items)

    def collect(outputs):
        for i, out in enumerate(outputs):
            results[i::n_chunks] = out
            if done:
                done(len(out))

    if n_jobs == 1 or n_chunks == 1:
        collect(map(work, chunks))
    else:
        with ProcessPoolExecutor(min(n_jobs, n_chunks), mp_context=mp.get_context("fork")) as pool:
            collect(pool.map(work, chunks))
    return results
