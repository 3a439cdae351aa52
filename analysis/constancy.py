"""Is a format's efficiency constant across token budgets? The paired drift test.

Under a law that fits, a format's residual (observed - predicted log loss) has no trend in tokens per parameter
r = D/N beyond the baseline's at the same (N, D). So at every (N, D) cell a format shares with the baseline the
test takes d = residual(format) - residual(baseline) (seeds averaged per cell) and regresses it by OLS on
log2 r with one intercept per model size:

    d = a_N + slope log2(D/N) + noise

`slope` is how much the format's log-loss gap, beyond what the law predicts, grows per doubling of tokens per
parameter; t-test of slope = 0, Holm-adjusted across the formats tested. The pairing removes whatever the law
gets wrong at a cell for every format (the baseline's own misfit along D), the per-size intercepts whatever it
gets wrong per size. For a law with a constant efficiency (decoupled) a rejection says the efficiency is not
constant; for a token-dependent law (drift, qat-error) it says drift is left that the law does not model.

A format enters only on cells it shares with the baseline and needs two token budgets among them and a degree of
freedom left; otherwise it is listed as not tested, with the reason. The effect size is also given as the change
of efficiency per doubling, d log eff = -slope L / (alpha A (N eff)^-alpha) at the format's cells (the law's
local sensitivity of log loss to log efficiency). Its size on tables simulated with a constant efficiency is
measured in tests/test_drift.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

from capscale.capacity.paths import strict_json
from capscale.capacity.results import Summary

from .laws import DecoupledLaw
from .runs import run_sides, token_budgets
from .verdicts import format_interval, format_p

CHECK_NAME = "efficiency constant across token budgets"
CHECK_NAME_TOKEN_LAW = "no drift left across token budgets"


@dataclass
class ConstancyTest:
    table: pd.DataFrame   # one row per format: cells, sizes, ratios, slope [lo, hi], p, p_holm, eff change, verdict
    level: float
    law: str
    baseline: str

    @property
    def tested(self) -> pd.DataFrame:
        return self.table[self.table["p"].notna()]

    @property
    def drifting(self) -> list:
        t = self.tested
        return list(t.loc[t["p_holm"] < 1 - self.level, "format"])

    def check_name(self) -> str:
        return CHECK_NAME if self.law == DecoupledLaw.name else CHECK_NAME_TOKEN_LAW

    def sentence(self) -> str:
        t = self.tested
        untested = self.table[self.table["p"].isna()]
        shown = 3  # a few reasons in the sentence; every format's is in the test's table
        tail = ("; not tested: " + "; ".join(f"{r.format} ({r.reason})" for r in untested.head(shown).itertuples())
                + (f"; and {len(untested) - shown} more (the drift-test table gives each reason)"
                   if len(untested) > shown else "") if len(untested) else "")
        if not len(t):
            return (f"Not tested: no format shares (N, D) cells with '{self.baseline}' at two token budgets with a "
                    f"degree of freedom left for a drift{tail}.")
        head = (f"{len(self.drifting)} of {len(t)} formats' cost changes with tokens per parameter beyond the {self.law} "
                f"law (paired drift test against '{self.baseline}' at shared (N, D) cells, OLS on log2 D/N with a "
                f"per-size intercept, Holm-adjusted at {1 - self.level:.0%})")
        parts = [f"{r.format} {r.slope:+.4f} {format_interval(r.lo, r.hi, '+.4f')} log loss per doubling, "
                 f"p = {format_p(r.p_holm)}" + (f", efficiency {r.eff_change:+.1%} per doubling"
                                                if np.isfinite(r.eff_change) else "")
                 for r in t.sort_values("p").itertuples()]
        return f"{head}: " + "; ".join(parts) + tail + "."

    def brief(self) -> str:
        """The verdict in one line: which formats drift, with their slopes (the health table's detail)."""
        t = self.tested
        if not len(t):
            return self.sentence()
        drifting = t[t["format"].isin(self.drifting)].sort_values("p")
        return (f"paired drift test against '{self.baseline}' (Holm, {1 - self.level:.0%}): "
                + ("; ".join(f"{r.format} {r.slope:+.4f} log loss per doubling of D/N (p = {format_p(r.p_holm)})"
                             for r in drifting.itertuples()) if len(drifting) else "no format drifts")
                + f"; {len(t) - len(drifting)} of {len(t)} tested formats show no drift")

    def summary(self) -> Summary:
        return Summary(f"paired drift test against '{self.baseline}' under the {self.law} law",
                       [("test", "each format's residual minus the baseline's at shared (N, D) cells, OLS on log2 D/N "
                                 f"with one intercept per size; Holm-adjusted at {1 - self.level:.0%}"),
                        ("verdict", self.brief())], self.table)

    def as_json(self) -> dict:
        rows = [{"format": r.format, "cells": r.cells, "sizes": r.sizes, "ratios": r.ratios, "slope": r.slope,
                 "ci": [r.lo, r.hi], "p": r.p, "p_holm": r.p_holm, "eff_change_per_doubling": r.eff_change,
                 "verdict": r.verdict, "reason": r.reason} for r in self.table.itertuples()]
        return strict_json({"test": "paired drift test", "law": self.law, "baseline": self.baseline,
                            "level": self.level, "drifting": self.drifting, "results": rows})


def _cell_residuals(runs: pd.DataFrame, residuals) -> pd.DataFrame:
    """observed - predicted log loss, averaged over the runs of each (format, N, D) cell."""
    frame = pd.DataFrame({"format": runs["format"].to_numpy(), "params": runs["params"].to_numpy(float),
                          "tokens": runs["tokens"].to_numpy(float), "forward": run_sides(runs)[0].to_numpy(),
                          "loss": runs["loss"].to_numpy(float), "res": -np.asarray(residuals, float)})
    return frame.groupby(["format", "params", "tokens"], as_index=False).agg(
        res=("res", "mean"), loss=("loss", "mean"), forward=("forward", "first"))


def _sensitivity(law, forward: str, cells: pd.DataFrame) -> float:
    """d log loss / d log eff at the format's cells under the law: -alpha A (N eff)^-alpha / L, averaged."""
    p, eff = getattr(law, "params_", {}), getattr(law, "eff_", {})
    if not {"A", "alpha"} <= set(p) or forward not in eff or forward == law.baseline:  # backward-only: no effN to move
        return float("nan")
    term = p["A"] * (cells["params"].to_numpy() * eff[forward]) ** -p["alpha"]
    return float(np.mean(-p["alpha"] * term / cells["loss"].to_numpy()))


def constancy_test(law, runs: pd.DataFrame, level: float = 0.95) -> ConstancyTest:
    """The paired drift test (module docstring) on a fitted law's residuals over `runs`, one row per format."""
    cells = _cell_residuals(runs, law.residuals_)
    baseline = law.baseline
    base = cells[cells["format"] == baseline].set_index(["params", "tokens"])["res"]
    rows = []
    for fmt, group in cells[cells["format"] != baseline].groupby("format", sort=True):
        key = list(zip(group["params"], group["tokens"]))
        shared = group[[k in base.index for k in key]]
        ratios = np.log2(shared["tokens"] / shared["params"])
        budgets = token_budgets(shared).nunique()
        sizes = shared["params"].nunique()
        row = {"format": fmt, "cells": len(shared), "sizes": sizes, "ratios": budgets, "slope": np.nan,
               "lo": np.nan, "hi": np.nan, "p": np.nan, "eff_change": np.nan, "eff_lo": np.nan, "eff_hi": np.nan,
               "verdict": "not tested", "reason": ""}
        dof = len(shared) - sizes - 1
        if not len(shared):
            row["reason"] = f"no (N, D) cell shared with '{baseline}'"
        elif budgets < 2:
            row["reason"] = f"its {len(shared)} cell(s) shared with '{baseline}' lie at one token budget per parameter"
        elif dof < 1:
            row["reason"] = (f"{len(shared)} shared cells at {sizes} size(s) leave no degree of freedom for the drift "
                             "(train more token budgets)")
        else:
            d = shared["res"].to_numpy() - base.loc[list(zip(shared["params"], shared["tokens"]))].to_numpy()
            sizes_codes = pd.factorize(shared["params"])[0]
            design = np.column_stack([np.eye(sizes)[sizes_codes], ratios.to_numpy()])
            coef, *_ = np.linalg.lstsq(design, d, rcond=None)
            resid = d - design @ coef
            sigma2 = float(resid @ resid) / dof
            cov = sigma2 * np.linalg.pinv(design.T @ design)
            slope, se = float(coef[-1]), float(np.sqrt(cov[-1, -1]))
            half = stats.t.ppf(0.5 + level / 2, dof) * se
            p = float(2 * stats.t.sf(abs(slope) / se, dof)) if se > 0 else (0.0 if slope else 1.0)
            sens = _sensitivity(law, shared["forward"].iloc[0], shared)
            row.update(slope=slope, lo=slope - half, hi=slope + half, p=p,
                       eff_change=np.expm1(slope / sens) if sens else np.nan,
                       eff_lo=np.expm1((slope + half) / sens) if sens else np.nan,
                       eff_hi=np.expm1((slope - half) / sens) if sens else np.nan)
        rows.append(row)
    table = pd.DataFrame(rows, columns=["format", "cells", "sizes", "ratios", "slope", "lo", "hi", "p", "eff_change",
                                        "eff_lo", "eff_hi", "verdict", "reason"])
    table["p_holm"] = np.nan
    tested = table["p"].notna()
    if tested.any():
        table.loc[tested, "p_holm"] = multipletests(table.loc[tested, "p"], method="holm")[1]
        table.loc[tested, "verdict"] = np.where(table.loc[tested, "p_holm"] < 1 - level, "drifts", "no drift detected")
    return ConstancyTest(table, level, law.name, baseline)


def best_supported_law(runs: pd.DataFrame, baseline: str, delta: float = 1e-3, level: float = 0.95,
                       **decoupled_options) -> tuple[str, str]:
    """(law name, why): the decoupled law unless the paired drift test rejects a constant efficiency for some format;
    then whichever token-dependent law (drift, qat-error) predicts the held-out largest token budgets best (mean
    |log error| of the compressed runs; the lower objective on all runs where the budgets are too few to hold out)."""
    from .extrapolation import extrapolation_check
    from .laws import make_law
    from .names import TOKEN_LAWS
    decoupled = DecoupledLaw(baseline, delta, **decoupled_options).fit(runs)
    test = constancy_test(decoupled, runs, level)
    if not test.drifting:
        return "decoupled", (f"the decoupled law: the paired drift test rejects a constant efficiency for none of the "
                             f"{len(test.tested)} format(s) it could test")
    scores = {}
    for name in TOKEN_LAWS:
        try:
            law = make_law(name, baseline=baseline, delta=delta)
            check = extrapolation_check(law, runs, "tokens")
            compressed = None if check is None else check.loc[check["format"] != baseline, "log_error"]
            scores[name] = (float(compressed.abs().mean()), "held-out largest token budgets, mean |log error| "
                            "of the compressed runs") if compressed is not None and len(compressed) else \
                (law.fit(runs).objective_, "objective on all runs")
        except ValueError:
            continue
    if not scores:
        return "decoupled", "the decoupled law: no token-dependent law could be fitted to these runs"
    name = min(scores, key=lambda k: scores[k][0])
    return name, (f"the {name} law: the paired drift test rejects a constant efficiency for "
                  f"{', '.join(test.drifting)}, and of the token-dependent laws it scores best ("
                  + ", ".join(f"{k} {v[0]:.4g}" for k, v in scores.items()) + f"; {scores[name][1]})")
