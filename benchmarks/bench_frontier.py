"""A 300-design frontier on this machine, cold (no GMSE cache) and warm (cached), against the time of one
default `capscale gmse` Monte Carlo measurement (4M samples) as the baseline in the same run.

    python benchmarks/bench_frontier.py
"""
import tempfile
import time
import os

from capscale.analysis.frontier import expand, frontier
from capscale.capacity import gmse

FAMILIES = ["int{1..8}(group={16,32,64,128,256},scale_format={fp16,e8m0,e4m3},scale={absmax,rms})",
            "{1:4,2:4,4:8}+int{1..8}(group={32,128})", "{fp4_e2m1,fp6_e2m3,fp6_e3m2,fp8_e4m3,fp8_e5m2}",
            "{mxfp4,mxfp6_e2m3,mxfp6_e3m2,mxfp8_e4m3,mxfp8_e5m2}", "nf4(group={32,64})"]

if __name__ == "__main__":
    n = len({s for f in FAMILIES for s in expand(f)})
    start = time.perf_counter()
    gmse("int4(group=32)")
    baseline = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as cache:
        os.environ["CAPSCALE_CACHE"] = cache
        start = time.perf_counter()
        cold = frontier(FAMILIES, progress=False)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        frontier(FAMILIES, progress=False)
        warm_s = time.perf_counter() - start
    print(f"{n} designs ({len(cold.table)} measured, {len(cold.skipped)} skipped): cold {cold_s:.1f} s "
          f"({cold_s / baseline:.1f}x one default gmse call of {baseline:.2f} s), cached {warm_s:.2f} s; "
          f"target: under 60 s cold")
