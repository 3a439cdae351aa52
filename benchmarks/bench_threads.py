"""The default thread count (trainers/threads.py) against every setting, at three model sizes, on an idle
machine and beside a competing busy process: training tokens/s of the default over the best setting's
(target: within 10%, i.e. a ratio >= 0.90).

Run: python benchmarks/bench_threads.py [--steps 40] [--busy-only | --idle-only]
"""
import argparse
import multiprocessing as mp
import os
import time

import torch

from capscale.trainers.compression_config import Compression
from capscale.trainers.data import load_tokens, random_batch
from capscale.trainers.compress import compressed_decoder
from capscale.trainers.model import config_for_params
from capscale.trainers.threads import default_threads
from capscale.trainers.train import _optimizer

SIZES = (20_000, 400_000, 3_000_000)


def tokens_per_s(params: int, threads: int, steps: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = compressed_decoder(config_for_params(params), Compression(w_format="int4", a_format="int4"))
    opt = _optimizer(model, 1e-3, 0.1, "matrices")
    data, gen = load_tokens(), torch.Generator().manual_seed(0)
    batch = 16
    for step in range(steps + 3):  # 3 warm-up steps
        if step == 3:
            start = time.perf_counter()
        x, y = random_batch(data.train, batch, 128, gen)
        model(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch * 128 / (time.perf_counter() - start)


def busy():
    while True:
        pass


def measure(label: str, steps: int) -> None:
    """The default is chosen when the phase starts, as a user's run chooses at launch (the benchmark's own
    measurements would otherwise raise the load average it reads)."""
    cores = len(os.sched_getaffinity(0))
    defaults = {params: default_threads(params) for params in SIZES}
    print(f"{label}: load average {os.getloadavg()[0]:.2f} at the start; defaults {defaults}")
    for params in SIZES:
        chosen = defaults[params]
        rates = {t: tokens_per_s(params, t, steps) for t in sorted({1, 2, cores, chosen})}
        best = max(rates, key=rates.get)
        print(f"{label:>6}  N~{params:>9,}  " + "  ".join(f"{t} threads {r:>8,.0f} tok/s" for t, r in rates.items())
              + f"  | default {chosen} thread(s): {rates[chosen] / rates[best]:.2f} of the best ({best})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--busy-only", action="store_true")
    parser.add_argument("--idle-only", action="store_true")
    args = parser.parse_args()
    print(f"load average now {os.getloadavg()[0]:.2f} on {len(os.sched_getaffinity(0))} cores")
    if not args.busy_only:
        for _ in range(36):  # idle: wait (up to 3 minutes) for earlier work to leave the load average
            if os.getloadavg()[0] < 0.5:
                break
            time.sleep(5)
        measure("idle", args.steps)
    if not args.idle_only:
        competitor = mp.get_context("spawn").Process(target=busy, daemon=True)
        competitor.start()
        time.sleep(65)  # the 1-minute load average sees it, as it would see a user's other work
        try:
            measure("busy", args.steps)
        finally:
            competitor.terminate()


if __name__ == "__main__":
    main()
