"""The study's three questions as statsmodels tests, each saying exactly what it tests, each with a summary().

- calibration: does capacity predict efficiency, and is it biased? WLS of log fitted efficiency on log
  predicted capacity (leave-one-format-out), weighted by the inverse bootstrap variance of the fitted value;
  slope and intercept with intervals and the joint F-test of slope = 1 and intercept = 0.
- composability: does eff(AB) = eff(A) eff(B)? A Wald test of log eff(AB) - log eff(A) - log eff(B) = 0 with
  the variance from the bootstrap covariance of the three log efficiencies.
- paired differences: is a format's loss different from the baseline's at equal (N, D)? A linear mixed model
  of log loss on format with a random intercept per (N, D) cell (seeds nest in cells), Holm-adjusted p-values
  over the formats tested.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import statsmodels.api as sm
import statsmodels.formula.api as smf
from scipy import stats
from statsmodels.stats.multitest import multipletests

from capscale.capacity import BASELINE, InputError
from capscale.capacity.paths import strict_json
from capscale.capacity.results import Summary
from .names import eff_key
from .verdicts import format_p


@dataclass
class Calibration:
    result: object          # statsmodels RegressionResults (WLS)
    joint: object           # the F-test of slope = 1, intercept = 0
    level: float

    @property
    def slope(self) -> tuple[float, float, float]:
        lo, hi = self.result.conf_int(1 - self.level).loc["log_predicted"]
        return float(self.result.params["log_predicted"]), float(lo), float(hi)

    @property
    def intercept(self) -> tuple[float, float, float]:
        lo, hi = self.result.conf_int(1 - self.level).loc["const"]
        return float(self.result.params["const"]), float(lo), float(hi)

    @property
    def joint_p(self) -> float:
        return float(self.joint.pvalue)

    def verdict(self) -> str:
        (s, slo, shi), (c, clo, chi) = self.slope, self.intercept
        pct = f"{self.level:.0%}"
        return (f"calibration slope {s:.2f} [{slo:.2f}, {shi:.2f}], intercept {c:+.2f} [{clo:+.2f}, {chi:+.2f}] ({pct}); "
                f"joint test slope = 1 and intercept = 0: p = {format_p(self.joint_p)} ({'rejected' if self.joint_p < 1 - self.level else 'not rejected'} "
                f"at {1 - self.level:.0%})")

    def coefficients(self) -> pd.DataFrame:
        r, ci = self.result, self.result.conf_int(1 - self.level)
        return pd.DataFrame({"term": ["intercept", "slope"], "estimate": r.params.to_numpy(), "s.e.": r.bse.to_numpy(),
                             "t": r.tvalues.to_numpy(), "p": r.pvalues.to_numpy(), "lo": ci[0].to_numpy(),
                             "hi": ci[1].to_numpy()})

    def summary(self) -> Summary:
        return Summary("calibration regression: log fitted eff on log predicted eff (WLS, bootstrap variances)",
                       [("formats", int(self.result.nobs)), ("R-squared", f"{self.result.rsquared:.3g}"),
                        ("joint F-test of slope = 1, intercept = 0",
                         f"F = {float(np.squeeze(self.joint.fvalue)):.3g}, p = {format_p(self.joint_p)}"),
                        ("intervals", f"{self.level:.0%}")],
                       self.coefficients(), [self.verdict()])

    def as_json(self) -> dict:
        value_ci = lambda t: {"value": t[0], "ci": [t[1], t[2]]}  # noqa: E731
        return {"slope": value_ci(self.slope), "intercept": value_ci(self.intercept), "joint_p": self.joint_p,
                "level": self.level,
                "n_formats": int(self.result.nobs), "verdict": self.verdict()}


def calibration(table: pd.DataFrame, samples: pd.DataFrame, level: float = 0.95) -> Calibration:
    """`table`: the validation table (format, fitted, predicted); `samples`: bootstrap replicates (eff[format])."""
    if len(table) < 3:
        raise InputError("the calibration regression needs at least 3 compressed formats")
    y = np.log(table["fitted"].to_numpy(float))
    x = pd.DataFrame({"log_predicted": np.log(table["predicted"].to_numpy(float))})
    variances = np.array([np.log(samples[eff_key(f)]).var(ddof=1) for f in table["format"]])
    weights = 1.0 / np.maximum(variances, 1e-8)
    result = sm.WLS(y, sm.add_constant(x), weights=weights).fit()
    joint = result.f_test("log_predicted = 1, const = 0")
    return Calibration(result, joint, level)


@dataclass
class Composability:
    table: pd.DataFrame
    level: float

    def summary(self) -> Summary:
        return Summary("composition: Wald tests of log eff(AB) = log eff(A) + log eff(B)",
                       [("covariance", "bootstrap replicates of the three log efficiencies"),
                        ("intervals", f"{self.level:.0%}, of the ratio eff(AB) / (eff(A) eff(B))")], self.table)

    def as_json(self) -> dict:
        return strict_json({"test": "Wald test of multiplying efficiencies", "level": self.level, "results": [
            {"combined": r.combined, "part1": r.part1, "part2": r.part2,
             "ratio": {"value": r.ratio, "ci": [r.ratio_lo, r.ratio_hi]}, "log_ratio_se": r.log_ratio_se,
             "wald_z": r.wald_z, "p": r.p, "verdict": r.verdict} for r in self.table.itertuples()]})


def composability_wald(pairs: list[tuple[str, str, str]], eff: dict, samples: pd.DataFrame,
                       level: float = 0.95) -> Composability:
    """For each (combined, part1, part2): the log ratio, its bootstrap s.e. (a' S a, S the covariance of the three
    log efficiencies), the Wald z and p, and the ratio's normal-theory interval."""
    rows = []
    z_crit = stats.norm.ppf(0.5 + level / 2)
    for combined, part1, part2 in pairs:
        logs = np.log(samples[[eff_key(combined), eff_key(part1), eff_key(part2)]].to_numpy(float))
        a = np.array([1.0, -1.0, -1.0])
        se = float(np.sqrt(a @ np.cov(logs, rowvar=False) @ a))
        d = float(np.log(eff[combined]) - np.log(eff[part1]) - np.log(eff[part2]))
        z = d / se
        rows.append({"combined": combined, "part1": part1, "part2": part2, "ratio": float(np.exp(d)),
                     "ratio_lo": float(np.exp(d - z_crit * se)), "ratio_hi": float(np.exp(d + z_crit * se)),
                     "log_ratio_se": se, "wald_z": z, "p": float(2 * stats.norm.sf(abs(z))),
                     "verdict": "not shown to differ from multiplying" if 2 * stats.norm.sf(abs(z)) >= 1 - level
                     else "does not multiply"})
    return Composability(pd.DataFrame(rows), level)


@dataclass
class PairedDifferences:
    table: pd.DataFrame
    result: object          # statsmodels MixedLMResults
    level: float

    def summary(self) -> Summary:
        return Summary("paired differences against the baseline at shared (N, D) cells (mixed model)",
                       [("per format", f"log-loss difference, {self.level:.0%} interval, Holm-adjusted p over the "
                                       "formats, Wilcoxon signed-rank p on cell means beside it")],
                       self.table, preface=str(self.result.summary()))

    def as_json(self) -> dict:
        rows = [{"format": r["format"], "log_loss_diff": {"value": r.get("log_loss_diff"),
                                                          "ci": [r.get("lo"), r.get("hi")]},
                 **{k: r.get(k) for k in ("p", "p_holm", "wilcoxon_p", "cells", "differs", "note")}}
                for r in self.table.to_dict(orient="records")]
        return strict_json({"test": "paired differences (mixed model)", "level": self.level, "results": rows})


MIN_SHARED_CELLS = 2  # a format enters a paired comparison on at least this many (N, D) cells shared with the baseline


def shared_cells(runs: pd.DataFrame, baseline: str) -> pd.Series:
    """Per format: how many (N, D) cells it shares with the baseline (the only cells a paired test may use)."""
    cells = runs.groupby(["format", "params", "tokens"]).size().unstack("format").notna()
    if baseline not in cells:
        return pd.Series(0, index=sorted(set(runs["format"]) - {baseline}))
    return cells.drop(columns=baseline).loc[cells[baseline]].sum().astype(int)


def not_compared_reason(n: int, baseline: str) -> str:
    return (f"not compared: no (N, D) cell shared with {baseline}" if n == 0 else
            f"not compared: {n} (N, D) cell shared with {baseline} (at least {MIN_SHARED_CELLS} needed)")


def paired_mixed(runs: pd.DataFrame, baseline: str = BASELINE, level: float = 0.95) -> PairedDifferences:
    """log loss ~ format (treatment-coded against the baseline) + random intercept per (N, D) cell, on the cells the
    baseline was trained at only: a format is compared where it shares cells with the baseline, never through other
    formats' cells. Formats with fewer than MIN_SHARED_CELLS shared cells are rows with the reason, no estimate."""
    shared = shared_cells(runs, baseline)
    entered = set(shared[shared >= MIN_SHARED_CELLS].index)
    data = runs[["format", "params", "tokens", "loss"]].copy()
    data["log_loss"] = np.log(data["loss"])
    data["cell"] = data["params"].astype(str) + "|" + data["tokens"].astype(str)
    base_cells = set(data.loc[data["format"] == baseline, "cell"])
    data = data[data["cell"].isin(base_cells) & data["format"].isin(entered | {baseline})]
    data["fmt"] = pd.Categorical(data["format"], categories=[baseline] + sorted(entered))
    if data["cell"].nunique() < 3:
        raise InputError("the paired mixed model needs runs at 3 or more (N, D) cells shared with the baseline")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' convergence chatter; the estimates are checked by tests
        result = smf.mixedlm("log_loss ~ fmt", data, groups=data["cell"]).fit(reml=True)
    ci = result.conf_int(1 - level)
    rows = []
    for name in result.params.index:
        if not name.startswith("fmt[T."):
            continue
        fmt = name[len("fmt[T."):-1]
        cells = data.pivot_table(index="cell", columns="format", values="log_loss", aggfunc="mean")[[baseline, fmt]].dropna()
        diff = cells[fmt] - cells[baseline]
        wilcoxon = float(stats.wilcoxon(diff).pvalue) if len(diff) >= 2 and diff.abs().sum() > 0 else float("nan")
        rows.append({"format": fmt, "log_loss_diff": float(result.params[name]), "lo": float(ci.loc[name, 0]),
                     "hi": float(ci.loc[name, 1]), "p": float(result.pvalues[name]), "cells": len(diff),
                     "wilcoxon_p": wilcoxon, "note": ""})
    table = pd.DataFrame(rows)
    if len(table):
        table["p_holm"] = multipletests(table["p"], method="holm")[1]
        table["differs"] = table["p_holm"] < 1 - level
    missing = [{"format": f, "cells": int(n), "note": not_compared_reason(int(n), baseline), "differs": False}
               for f, n in shared.items() if f not in entered]
    if missing:
        table = pd.concat([table, pd.DataFrame(missing)], ignore_index=True)
    return PairedDifferences(table, result, level)
