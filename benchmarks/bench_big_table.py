"""Memory and time of a fit as the table grows (issue 17: a 200k-row table must fit under 1 GB).

Each size is fitted (`capscale fit TABLE --bootstrap 0`, in-process API) in its own fresh interpreter, which
reports its own peak resident memory; the baseline is the same fit of a 2,000-row table in the same run, so the
ratio shows what the rows themselves cost (the interpreter, torch and pandas are ~0.3 GB of either).

Run: python benchmarks/bench_big_table.py [ROWS ...]   (default: 2000 200000)
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

CHILD = """
import json, resource, sys, time
from capscale.analysis.lawfit import fit
started = time.perf_counter()
result = fit(sys.argv[1], bootstrap=0, progress=False)
print(json.dumps({"seconds": time.perf_counter() - started, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "eff_int4": result.eff["int4"]}))
"""


def table(rows: int, path: Path) -> Path:
    """Five formats, sizes 1e4..1e7, four token ratios, the decoupled law with 0.3% noise."""
    rng = np.random.default_rng(0)
    eff = {"bf16": 1.0, "int8": 0.98, "int4": 0.8, "int2": 0.4, "2:4": 0.55}
    formats = rng.choice(list(eff), rows)
    n = np.exp(rng.uniform(np.log(1e4), np.log(1e7), rows)).round()
    d = (n * rng.choice([20, 50, 100, 200], rows)).round()
    e = np.array([eff[f] for f in formats])
    loss = (400 * (n * e) ** -0.34 + 400 * d ** -0.28 + 1.7) * np.exp(rng.normal(0, 0.003, rows))
    pd.DataFrame({"format": formats, "params": n, "tokens": d, "loss": loss, "seed": np.arange(rows)}).to_csv(path, index=False)
    return path


def main():
    sizes = [int(s) for s in sys.argv[1:]] or [2000, 200_000]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for rows in sizes:
            path = table(rows, Path(folder) / f"runs-{rows}.csv")
            out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
            results[rows] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[rows]
            print(f"{rows:>9,} rows: {r['seconds']:7.1f} s, peak {r['peak_mib']:7.0f} MiB, eff[int4] {r['eff_int4']:.4f}")
    base = results[sizes[0]]
    for rows in sizes[1:]:
        r = results[rows]
        print(f"{rows:,} vs {sizes[0]:,} rows: time x{r['seconds'] / base['seconds']:.1f}, "
              f"peak x{r['peak_mib'] / base['peak_mib']:.2f} (+{r['peak_mib'] - base['peak_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
