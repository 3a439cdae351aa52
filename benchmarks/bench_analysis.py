"""Law fitting speed and quality, baselines in the same run:
1. on the real Chinchilla data, variable projection vs a naive multi-start L-BFGS (the replication's approach:
   a grid of starting points, L-BFGS from each), then 200 bootstrap refits;
2. on the shipped study, 200 bootstrap refits as the toolkit did them when issue #12 was filed (serial, each refit
   the cold search: L-BFGS from the 4 best points of the exponent grid, uncentred, one NNLS per grid point) vs
   today's default (parallel over cores; the grid solved in batch, L-BFGS in centred coordinates from each local
   minimum of the grid, E floored at a millionth of the smallest loss): the speed-up, split into its algorithmic
   and parallel parts, and the intervals side by side (equal within Monte Carlo noise). Both use today's
   resampling (one row selection per replicate instead of a pandas group-by: 6 ms -> 0.3 ms), which makes the
   baseline faster too;
3. on the study without its 4x16 size (identified, so warm starts are allowed), warm vs cold refits.

Run: python benchmarks/bench_analysis.py [path/to/chinchilla_epoch_240.csv]
"""
import itertools
import os
import sys
import time

import numpy as np
from scipy import optimize, special
from threadpoolctl import threadpool_limits

from capscale import data
from capscale.analysis.bootstrap import bootstrap
from capscale.analysis.laws import DecoupledLaw
from capscale.analysis.solver import EXPONENT_GRID, huber_total, single_threaded_blas
from capscale.analysis.runs import load_runs

DEFAULT = data.path("reference", "chinchilla_epoch_240.csv")


def naive_multistart(runs, delta=1e-3):
    """L-BFGS on (a, b, e, alpha, beta) from a 4^5 grid of starts (numerical gradients)."""
    log_n, log_d = np.log(runs["params"].to_numpy()), np.log(runs["tokens"].to_numpy())
    log_l = np.log(runs["loss"].to_numpy())

    def objective(t):
        a, b, e, alpha, beta = t
        pred = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
        return special.huber(delta, pred - log_l).sum()

    best = None
    for start in itertools.product([0, 5, 10, 15], [0, 5, 10, 15], [-1, -0.5, 0, 0.5], [0, 0.5, 1, 1.5], [0, 0.5, 1, 1.5]):
        res = optimize.minimize(objective, start, method="L-BFGS-B")
        if best is None or res.fun < best.fun:
            best = res
    return best


def main():
    runs = load_runs(sys.argv[1] if len(sys.argv) > 1 else DEFAULT)
    start = time.perf_counter()
    fit = DecoupledLaw().fit(runs)
    t_fit = time.perf_counter() - start
    start = time.perf_counter()
    with threadpool_limits(1, "blas"):
        naive = naive_multistart(runs)
    t_naive = time.perf_counter() - start
    print(f"variable projection: objective {fit.objective_:.7e} in {t_fit:.2f} s "
          f"(alpha {fit.params_['alpha']:.5f}, beta {fit.params_['beta']:.5f}, E {fit.params_['E']:.4f})")
    a, b, e, alpha, beta = naive.x
    print(f"naive 1024-start L-BFGS: objective {naive.fun:.7e} in {t_naive:.2f} s "
          f"(alpha {alpha:.5f}, beta {beta:.5f}, E {np.exp(e):.4f}); speed-up {t_naive / t_fit:.0f}x")
    print("replication optimum: objective 1.018275e-03 (A 477.84, B 2143.86, E 1.8172, alpha 0.34731, beta 0.36718)")
    start = time.perf_counter()
    boot = bootstrap(fit, runs, n_boot=200, seed=0, progress=False)
    t_boot = time.perf_counter() - start
    se = boot.intervals()["se"]
    print(f"200 bootstrap refits in {t_boot:.1f} s ({boot.n_failed} failed): se alpha {se['alpha']:.4f} (replication 0.015), "
          f"beta {se['beta']:.4f} (0.021), E {se['E']:.4f} (0.026), A {se['A']:.1f} (124.5), B {se['B']:.0f} (1293)")
    study = load_runs(data.path("study_runs.jsonl"))
    print(f"shipped study: the fit's warnings {DecoupledLaw().fit(study).warnings_}: not identified, so its bootstrap "
          "refits always run the global search (warm starts would narrow alpha/E/A by ~3 s.e.)")
    issue_time_vs_now(study)
    warm_vs_cold(study[study["params"] != 13456], "shipped study without the 4x16 size (identified)")


class IssueTimeLaw(DecoupledLaw):
    """The decoupled fit as it was when issue #12 was filed (commit 4e5c336 and before): the baseline."""

    @single_threaded_blas
    def fit(self, runs, start=None):
        fi, log_n, log_d, log_l = self._prepare(runs)
        k, loss = len(self.formats_), np.exp(log_l)
        onehot, candidates = np.eye(k)[fi], []
        for alpha in EXPONENT_GRID:
            for beta in EXPONENT_GRID:
                design = np.column_stack([onehot * np.exp(-alpha * log_n)[:, None], np.exp(-beta * log_d),
                                          np.ones_like(log_n)])
                coef, _ = optimize.nnls(design / loss[:, None], np.ones_like(loss))
                pred = design @ coef
                if np.all(pred > 0):
                    candidates.append((huber_total(np.log(pred) - log_l, self.delta), alpha, beta, coef))
        best = None
        for _, alpha, beta, coef in sorted(candidates, key=lambda c: c[0])[:4]:
            logs = np.log(np.maximum(coef, 1e-12))
            res = optimize.minimize(self._objective, np.concatenate([logs, [alpha, beta]]), jac=True,
                                    args=(fi, log_n, log_d, log_l, k), method="L-BFGS-B",
                                    options={"maxiter": 20000, "ftol": 1e-15, "gtol": 1e-12})
            best = res if best is None or res.fun < best.fun else best
        return self._set(runs, best)


def issue_time_vs_now(runs, n_boot: int = 200):
    timed = {}
    for name, law, n_jobs in [("issue time", IssueTimeLaw().fit(runs), 1), ("now, serial", DecoupledLaw().fit(runs), 1),
                              ("now", DecoupledLaw().fit(runs), None)]:
        start = time.perf_counter()
        timed[name] = (law, bootstrap(law, runs, n_boot=n_boot, seed=0, progress=False, n_jobs=n_jobs),
                       time.perf_counter() - start)
    then, serial, now = (timed[k][2] for k in ("issue time", "now, serial", "now"))
    print(f"shipped study ({len(runs)} runs), {n_boot} bootstrap refits: issue time {then:.1f} s (serial), now "
          f"{serial:.1f} s serial and {now:.1f} s by default ({os.cpu_count()} cores): speed-up {then / now:.1f}x "
          f"(target >= 10x) = {then / serial:.1f}x per refit x {serial / now:.1f}x from parallel workers")
    compare_intervals(timed["issue time"][1], "issue time", timed["now"][1], "now", timed["now"][0].values())


def warm_vs_cold(runs, name: str, n_boot: int = 200):
    law = DecoupledLaw().fit(runs)
    timed = {}
    for warm in (False, True):
        start = time.perf_counter()
        timed[warm] = (bootstrap(law, runs, n_boot=n_boot, seed=0, progress=False, warm=warm),
                       time.perf_counter() - start)
    (cold, t_cold), (hot, t_warm) = timed[False], timed[True]
    print(f"{name} ({len(runs)} runs): {n_boot} bootstrap refits cold {t_cold:.1f} s, warm-started "
          f"{t_warm:.1f} s: speed-up {t_cold / t_warm:.1f}x; failed {cold.n_failed} / {hot.n_failed}")
    compare_intervals(cold, "cold", hot, "warm", law.values())


def compare_intervals(first, first_name, second, second_name, point):
    a, b = first.intervals(point), second.intervals(point)
    print(f"  {'value':<16} {first_name + ' 95% interval':>22} {second_name + ' 95% interval':>22}  "
          "max |end difference| / se")
    for v in a.index:
        shift = max(abs(a.at[v, "lo"] - b.at[v, "lo"]), abs(a.at[v, "hi"] - b.at[v, "hi"]))
        ratio = f"{shift / a.at[v, 'se']:.2f}" if a.at[v, "se"] > 0 else "-"
        print(f"  {v:<16} [{a.at[v, 'lo']:9.4g}, {a.at[v, 'hi']:9.4g}] [{b.at[v, 'lo']:9.4g}, {b.at[v, 'hi']:9.4g}]  {ratio}")


if __name__ == "__main__":
    main()
