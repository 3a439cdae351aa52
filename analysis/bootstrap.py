"""Nonparametric bootstrap of a law fit, refitted in parallel over cores, seeded per replicate (reproducible for
a seed whatever the number of workers). Failed refits are counted, not hidden.

Two resampling units: `formats` (runs resampled with replacement within each format, so every format keeps
its run count) and `cells` (whole (N, D, seed) cells resampled with all their formats together: every format
at a cell shares the seed's initialisation and data order, a pairing the per-format bootstrap ignores)."""
from __future__ import annotations

import os
from functools import partial
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .parallel import chunked_map
from .names import RESAMPLING_UNITS

ONE_SIGMA = 0.6826894921370859  # the probability within one sd of a normal's mean


@dataclass
class BootstrapResult:
    samples: pd.DataFrame   # one row per successful replicate, one column per fitted value
    n_failed: int
    level: float = 0.95
    replicates: list | None = None  # the index b of each row's replicate (its resample's seed is [seed, b])
    unit: str = "formats"           # the resampling unit

    def tails(self, level: float | None = None) -> tuple[float, float]:
        """The quantiles bounding the central `level` (default: this result's) of the replicates."""
        level = level or self.level
        return (1 - level) / 2, 1 - (1 - level) / 2

    def intervals(self, point: dict | None = None, level: float | None = None) -> pd.DataFrame:
        """value (the point fit, if given), standard error and percentile interval of every fitted number. The
        standard error is half the central 68.3% range of the replicates (the sd where they are normal): a few
        replicates that run off along a ridge (A -> 1e28 with E at its bound) do not make it meaningless."""
        lo, hi = self.tails(level)
        sigma = (self.samples.quantile(0.5 + ONE_SIGMA / 2) - self.samples.quantile(0.5 - ONE_SIGMA / 2)) / 2
        table = pd.DataFrame({"se": sigma, "lo": self.samples.quantile(lo),
                              "hi": self.samples.quantile(hi)})
        if point is not None:
            table.insert(0, "value", pd.Series(point))
        return table


def resample(runs: pd.DataFrame, rng: np.random.Generator, unit: str = "formats") -> pd.DataFrame:
    if unit == "cells":
        keys = ["params", "tokens"] + (["seed"] if "seed" in runs.columns else [])
        cells = [group for _, group in runs.groupby(keys, sort=True)]
        parts = [cells[i] for i in rng.integers(0, len(cells), len(cells))]
        out = pd.concat(parts)
    else:  # positions of each format in order of appearance; one row selection for all of them
        codes = pd.factorize(runs["format"])[0]
        groups = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)]
        out = runs.iloc[np.concatenate([idx[rng.integers(0, len(idx), len(idx))] for idx in groups])]
    out.attrs = {**runs.attrs, "bootstrap_resample": True}  # check_identifiable: the full table passed
    return out


def _refit(law_cls, law_params, runs, seed, start, unit, replicates):
    results = []
    for b in replicates:
        rng = np.random.default_rng([seed, b])
        try:
            law, sample = law_cls(**law_params), resample(runs, rng, unit)
            fit = law.fit(sample, start=start) if start is not None else law.fit(sample)
            values = fit.values()
            results.append(values if all(np.isfinite(v) for v in values.values()) else None)
        except Exception:  # a replicate that cannot be fitted (e.g. a degenerate resample) is counted as failed
            results.append(None)
    return results


def bootstrap(law, runs: pd.DataFrame, n_boot: int = 200, seed: int = 0, n_jobs: int | None = None,
              progress: bool = True, warm: bool = True, unit: str = "formats", level: float = 0.95) -> BootstrapResult:
    """Refit `law` (an unfitted or fitted estimator; its parameters are reused) on n_boot resamples.

    `warm`: a fitted decoupled law's refits start from its optimum (falling back to the global search when that
    does not converge). Only where the fit is well identified: where an estimate sits at a bound (E at 0, say)
    the objective has other basins along a flat ridge, a warm start stays in the full-data one, and the intervals
    of alpha, E and A come out too narrow (measured on the shipped study: by ~3 standard errors). Such fits are
    refitted by the global search every time."""
    n_jobs = n_jobs or min(os.cpu_count() or 1, 8)
    identified = not getattr(law, "warnings_", ["not fitted"])
    start = getattr(law, "theta_", None) if warm and identified else None
    if unit not in RESAMPLING_UNITS:
        raise ValueError(f"resampling unit must be one of {RESAMPLING_UNITS}, got {unit!r}")
    work = partial(_refit, type(law), law.bootstrap_params(), runs, seed, start, unit)
    bar = tqdm(total=n_boot, desc=f"bootstrap {law.name}", disable=not progress, leave=False)
    values = chunked_map(work, range(n_boot), n_jobs, n_chunks=n_jobs * 4, done=bar.update)
    bar.close()
    rows = [v for v in values if v is not None]
    return BootstrapResult(pd.DataFrame(rows), n_boot - len(rows), level,
                           [b for b, v in enumerate(values) if v is not None], unit)


def refit_replicates(law, runs: pd.DataFrame, seed: int, replicates: list, unit: str = "formats",
                     warm: bool = True) -> list:
    """The values of bootstrap replicates `replicates` of `law` on `runs`, refitted exactly as `bootstrap` fits them
    (same resample seeds, same start): what a saved fit's replicates are checked against."""
    identified = not getattr(law, "warnings_", ["not fitted"])
    start = getattr(law, "theta_", None) if warm and identified else None
    return _refit(type(law), law.bootstrap_params(), runs, seed, start, unit, replicates)


def prediction_interval(fit, boot: BootstrapResult, new: pd.DataFrame, level: float = 0.95,
                        seed: int = 0) -> pd.DataFrame:
    """Loss predictions for new (params, tokens, format) rows: point value and an interval combining the
    bootstrap spread of the law with the fit's residual scatter (a resampled log residual per replicate). Each
    replicate predicts through the law's own `predict_values`, backward formats and token-dependent costs included."""
    rng = np.random.default_rng(seed)
    sims = np.array([fit.predict_values(values, new) * np.exp(rng.choice(fit.residuals_, size=len(new)))
                     for _, values in boot.samples.iterrows()])
    lo, hi = np.nanquantile(sims, [(1 - level) / 2, 1 - (1 - level) / 2], axis=0)
    return new.assign(predicted=fit.predict(new), lo=lo, hi=hi)
