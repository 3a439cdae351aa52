"""One results object for a fit: `capscale.fit(runs, ...) -> LawFit`, in the manner of statsmodels' results.

A LawFit owns everything a fit's later questions need (the runs, the fitted law, its bootstrap replicates, the
confidence level and the seed) so that nothing threads them by hand: intervals (`conf_int`), a paste-able
`summary()`, predictions with intervals, fit health, the capacity validation, composability tests, law
comparison, paired comparisons, extrapolation, saving and reloading, and the report all start from it.
Plotting libraries load only with `report()`.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from capscale.capacity import BASELINE, InputError
from capscale.capacity.results import Summary

from .bootstrap import BootstrapResult, bootstrap as run_bootstrap, prediction_interval
from .health import unphysical_eff_d
from .laws import DecoupledLaw, ScalingLaw, make_law
from .names import LAW_NAMES, FitWarning, eff_d_key, eff_key
from .solver import exponent_at_edge


EFF_PLAUSIBLE = 1.5  # a fitted efficiency above this is warned about: more likely a table's mistake than a format


def _finite(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


class LawFit:
    """A fitted law with its bootstrap. Build one with `capscale.fit(...)` or `LawFit.load(path, runs)`."""

    def __init__(self, runs: pd.DataFrame, law: ScalingLaw, boot: BootstrapResult | None = None, seed: int = 0,
                 level: float = 0.95):
        self.runs, self.law, self.boot, self.seed = runs, law, boot, seed
        self.level = boot.level if boot is not None else level
        self._validations: dict = {}  # rho form -> Validation (leave-one-format-out refits: computed once)

    # -- the fitted numbers -----------------------------------------------------------------------------------
    @property
    def params(self) -> dict:
        return dict(self.law.params_)

    @property
    def eff(self) -> dict:
        """Efficiency per format (formula laws: evaluated at each format's capacity)."""
        return dict(self.law.eff_) if hasattr(self.law, "eff_") else {}

    @property
    def baseline(self) -> str:
        return self.law.baseline

    @property
    def has_intervals(self) -> bool:
        return self.boot is not None and len(self.boot.samples) > 0

    def conf_int(self, level: float | None = None) -> pd.DataFrame:
        """The one interval accessor: every fitted number (`eff[int4]`, `alpha`, ...) with its value, bootstrap
        standard error and percentile interval (value, se, lo, hi); refused without bootstrap replicates."""
        if not self.has_intervals:
            raise InputError("no bootstrap replicates: fit with bootstrap > 0 for intervals")
        return self.boot.intervals(self.law.values(), level)

    def _intervals(self) -> pd.DataFrame | None:
        return self.conf_int() if self.has_intervals else None

    @property
    def warnings(self) -> list[str]:
        """What a reader should know before trusting the numbers: weak estimates, refits that would not converge."""
        law, boot = self.law, self.boot
        out = list(law.warnings_)
        if boot is not None and boot.n_failed > 0.05 * (len(boot.samples) + boot.n_failed):
            out.append(f"{boot.n_failed} of {len(boot.samples) + boot.n_failed} bootstrap refits failed: the fit is "
                       "fragile and its intervals understate the uncertainty")
        implausible = {f: v for f, v in self.eff.items() if v > EFF_PLAUSIBLE}
        if implausible:
            out.append("efficiency above " + f"{EFF_PLAUSIBLE:g}, implausible (a format worth more parameters than it "
                       "has): " + ", ".join(f"eff[{f}] = {v:.3g}" for f, v in implausible.items())
                       + "; check the table's labels and losses")
        unphysical = unphysical_eff_d(law)
        if unphysical:
            out.append("data efficiency above 1, unphysical (a backward format cannot make tokens worth more than exact "
                       "gradients): " + ", ".join(f"effD[{g}] = {v:.3f}" for g, v in unphysical.items())
                       + "; a forward cost that grows with D/N forced into effD, or too few token budgets")
        drift = self.drift_test()
        if drift.drifting:
            out.append(f"{drift.check_name()}: rejected for {', '.join(drift.drifting)} (paired drift test, Holm-adjusted; "
                       f"`drift_test()`): their loss gap to '{self.baseline}' changes with tokens per parameter in a way the "
                       + ("constant-efficiency law cannot express, so its efficiencies mislead where it extrapolates in "
                          "D/N; compare the drift and qat-error laws (compare_laws)"
                          if self.law.name == DecoupledLaw.name else f"{self.law.name} law does not model"))
        if boot is not None and len(boot.samples) and {"alpha", "beta"} <= set(boot.samples):
            edge = exponent_at_edge(boot.samples[["alpha", "beta"]]).any(axis=1).mean()
            if edge > 0.05:
                out.append(f"{edge:.0%} of bootstrap refits put alpha or beta at the edge of the range searched: those "
                           "resamples lack the distinct sizes or token budgets that identify the law (with --resample "
                           "cells, too few (N, D) cells), so the intervals are wide or unbounded")
        return out

    def summary(self) -> Summary:
        law, table = self.law, self._intervals()
        rows = []
        for name, value in law.values().items():
            lo, hi, se = (table.loc[name, ["lo", "hi", "se"]] if table is not None and name in table.index
                          else (np.nan, np.nan, np.nan))
            if name == "E" and getattr(law, "fix_E", None) is not None:  # held, not estimated (0: the search floor)
                value, lo, hi, se = law.fix_E, np.nan, np.nan, np.nan
            rows.append({"": name, "value": value, "s.e.": se, f"[{(1 - self.level) / 2:g}": lo,
                         f"{1 - (1 - self.level) / 2:g}]": hi})
        formula = law.formula_text
        if len(getattr(law, "eff_d_", {})) > 1:
            formula = ("loss = A (N effN)^-alpha + B (D effD)^-beta + E (eff[f]: effN per forward pair; effD[g] per "
                       "backward configuration, exact gradients 1)")
        header = [("law", f"{law.name}: {formula}, Huber (delta {law.delta:g}) on log loss"), ("runs", law.n_runs_), ("objective (Huber on log loss)", f"{law.objective_:.6g}"),
                  ("residual RMSE, log loss", f"{law.rmse_log_:.4g}"), ("baseline", law.baseline),
                  *([("irreducible loss E", f"held at {law.fix_E:g} (fix_E), not fitted")]
                    if getattr(law, "fix_E", None) is not None else []),
                  ("bootstrap", "none" if self.boot is None else
                   f"{len(self.boot.samples)} refits ({self.boot.n_failed} failed), seed {self.seed}, "
                   f"{self.level:.0%} percentile intervals")]
        return Summary(f"capscale {law.name} law fit", header, pd.DataFrame(rows),
                       [f"warning: {w}" for w in self.warnings])

    def as_json(self) -> dict:
        table = self._intervals()

        def p(name, value):
            if table is None or name not in table.index:
                return {"value": float(value), "se": None, "ci": None}
            row = table.loc[name]
            return {"value": float(value), "se": _finite(row["se"]), "ci": [_finite(row["lo"]), _finite(row["hi"])]}
        law, boot = self.law, self.boot
        return {"law": law.name, "n_runs": law.n_runs_, "objective": law.objective_, "rmse_log_loss": law.rmse_log_,
                "rmse_loss": law.rmse_loss_, "level": self.level,
                "params": {k: p(k, v) for k, v in law.params_.items()},
                "eff": {k: p(eff_key(k), v) for k, v in self.eff.items()},
                "eff_d": {k: p(eff_d_key(k), v) for k, v in getattr(law, "eff_d_", {}).items()},
                "bootstrap": None if boot is None else {"replicates": len(boot.samples) + boot.n_failed,
                                                         "failed": boot.n_failed, "seed": self.seed},
                "warnings": self.warnings}

    # -- predictions ------------------------------------------------------------------------------------------
    def predict(self, new: pd.DataFrame, interval: bool = False):
        """Loss of runs (format, params, tokens) under the fitted law; with `interval`, a frame with the
        prediction and its interval (`bootstrap.prediction_interval`: the refits' spread and the residual scatter)."""
        point = self.law.predict(new)
        if not interval:
            return point
        if self.boot is None or not hasattr(self.law, "predict_values"):
            raise InputError(f"prediction intervals need bootstrap > 0 and a law that predicts from its replicates "
                             f"(decoupled, drift, qat-error); this is the {self.law.name} law"
                             + ("" if self.boot is None else " (refit with --law decoupled)"))
        table = prediction_interval(self.law, self.boot, new, self.level, self.seed)
        return pd.DataFrame({"loss": point, "lo": table["lo"], "hi": table["hi"]}, index=new.index)

    def predict_format(self, spec: str | None, a_format: str | None, params: float, tokens: float,
                       form: str = "tanh") -> dict:
        """Efficiency and loss of a format never trained: rho fitted on the trained formats (the fit's validation,
        computed once per form), then the law."""
        from .validate import predict_from_validation
        return predict_from_validation(self.validate(form, progress=False), spec, a_format, params, tokens, self.seed)

    # -- the questions a fit answers --------------------------------------------------------------------------
    def health(self, replicates: pd.DataFrame | None = None) -> pd.DataFrame:
        from .health import fit_health
        return fit_health(self.law, self.runs, self.boot, replicates)

    def validate(self, form: str = "tanh", progress: bool = True, n_jobs: int | None = None):
        """Capacity against efficiency: rho fitted to the efficiencies, each format predicted leaving it out.
        Computed once per form and kept: the fit does not change."""
        from .validate import validate
        if form not in self._validations:
            self._validations[form] = validate(self.runs, form=form, law=self.law, boot=self.boot, n_boot=0,
                                               progress=progress, n_jobs=n_jobs)
        return self._validations[form]

    def check_constants(self, constants: str = "published") -> pd.DataFrame:
        """Fitted efficiencies against rho(GMSE) at given constants (no refit: any number of formats)."""
        from .validate import check_constants
        return check_constants(self, constants)

    def calibration(self, validation):
        """The calibration regression of a validation (None where the replicates or formats are too few)."""
        from .statistics import calibration
        if validation is None or self.boot is None or len(self.boot.samples) <= 2 or len(validation.table) < 3:
            return None
        return calibration(validation.table, self.boot.samples, self.level)

    def compose(self):
        """Combined formats against their parts: the ratio table, with Wald tests where there are replicates."""
        from .compose import compose_runs
        from .statistics import composability_wald
        table = compose_runs(self.law.eff_, self.boot)
        if table.empty or self.boot is None or len(self.boot.samples) <= 2:
            return table, None
        pairs = list(table[["combined", "part1", "part2"]].itertuples(index=False, name=None))
        wald = composability_wald(pairs, self.law.eff_, self.boot.samples, self.level)
        return table, wald

    def compare_laws(self, hold_out: str | None = "tokens") -> pd.DataFrame:
        """How well each law fits these runs, every law on the same rows (a law fitted on a subset, as Frantar's on
        the pure-sparsity runs, says so in `same_rows`; one that cannot fit this table gives its reason in `note`),
        and with `hold_out` ('tokens' or 'params') each law refitted without the largest token budgets (or model
        size) and its prediction errors there: mean |log error| of the held-out baseline and compressed runs, the
        compressed runs' signed mean, and the error of their gap to the baseline at the same cell."""
        from .extrapolation import extrapolation_check, extrapolation_errors
        rows = []
        for name in LAW_NAMES:
            row = {"law": name, "parameters": np.nan, "runs": np.nan, "same_rows": False, "objective": np.nan,
                   "rmse_log_loss": np.nan, "rmse_loss": np.nan, "note": ""}
            try:
                fitted = self.law if name == self.law.name else make_law(
                    name, baseline=self.baseline, delta=self.law.delta).fit(self.runs)
            except InputError as err:  # no sparsity runs for Frantar's, labels without capacity, too few budgets
                rows.append({**row, "note": f"not fitted: {err}"})
                continue
            row.update(parameters=_n_constants(fitted), runs=fitted.n_runs_, same_rows=fitted.n_runs_ == len(self.runs),
                       objective=fitted.objective_, rmse_log_loss=fitted.rmse_log_, rmse_loss=fitted.rmse_loss_)
            if not row["same_rows"]:
                row["note"] = f"fitted on {fitted.n_runs_} of the {len(self.runs)} runs: not comparable"
            if hold_out is not None and row["same_rows"]:
                try:
                    check = extrapolation_check(fitted, self.runs, hold_out)
                except InputError as err:
                    check, row["note"] = None, f"hold-out not fitted: {err}"
                if check is not None:
                    e = extrapolation_errors(check)
                    row.update(held_out=e["held_out"], heldout_baseline_mae=e["baseline_mean_abs_log_error"],
                               heldout_compressed_mae=e["compressed_mean_abs_log_error"],
                               heldout_compressed_bias=e["compressed_mean_log_error"],
                               heldout_gap_bias=e["gap_mean_error"],
                               heldout_gap_over=f"{e['gap_above']} of {e['gap_n']}")
            rows.append(row)
        return pd.DataFrame(rows)

    def paired(self) -> pd.DataFrame:
        from .compare import paired_comparison
        return paired_comparison(self.runs, self.baseline, self.level)

    def paired_mixed(self):
        from .statistics import paired_mixed
        try:
            return paired_mixed(self.runs, self.baseline, self.level)
        except InputError:
            return None

    def extrapolation(self, hold_out: str = "params") -> tuple[pd.DataFrame | None, dict | None]:
        """The law refitted without the largest models (`hold_out="params"`) or the largest token budgets per
        parameter ("tokens"), predicting them (None, None where the table cannot be split so)."""
        from .extrapolation import extrapolation_check, extrapolation_errors
        table = extrapolation_check(self.law, self.runs, hold_out)
        return (None, None) if table is None else (table, extrapolation_errors(table))

    def drift_test(self):
        """The paired drift test (`analysis.constancy`): does each format's cost change with tokens per parameter
        beyond what this law models? Computed once per fit."""
        if getattr(self, "_drift", None) is None:
            from .constancy import constancy_test
            self._drift = constancy_test(self.law, self.runs, self.level)
        return self._drift

    def plan(self, memory: float | None = None, flops: float | None = None, tokens: float | None = None,
             formats=None, speedup: dict | None = None):
        """The loss-optimal (format, N, D) at a budget (weight bytes, training FLOPs, tokens), ranked, with
        bootstrap intervals and win shares (`analysis.plan`)."""
        from .plan import Budget, plan
        return plan(self, Budget(memory, flops, tokens), formats, speedup)

    # -- files ------------------------------------------------------------------------------------------------
    def save(self, path: "str | Path", overwrite: bool = False) -> Path:
        """Save to a new file (or one capscale saved a fit in; any with `overwrite`)."""
        from .fitfile import save_fit
        return save_fit(path, self.law, self.boot, self.runs, self.seed, overwrite)

    @classmethod
    def load(cls, path: "str | Path", runs: pd.DataFrame, level: float | None = None) -> "LawFit":
        """A fit saved by `save` (or `capscale fit -o`), verified, refused for other data than it fitted; its
        intervals at `level` (default: the level it was saved with), read from its saved replicates."""
        from .fitfile import load_fit
        law, boot, seed = load_fit(path, runs)
        if boot is not None and level is not None:
            boot.level = level
        return cls(runs, law, boot, seed, level or 0.95)

    def report(self, folder: "str | Path", **options):
        """The full report into `folder` (see `analysis.report.build_report` for the options)."""
        from .report import build_report
        return build_report(self, folder, **options)

    def __repr__(self) -> str:
        boot = "no bootstrap" if self.boot is None else f"{len(self.boot.samples)} bootstrap refits"
        return f"<LawFit {self.law.name}: {self.law.n_runs_} runs, {len(self.eff)} formats, {boot}>"


def _n_constants(law) -> int:
    """Constants a law fits: its optimiser's vector where it has one (one A per format, B per backward configuration,
    E, the exponents, drifts or k's), plus a chosen saturation; else its named constants."""
    if hasattr(law, "theta_"):
        return len(law.theta_) + int("saturation" in law.params_) - int(getattr(law, "fix_E", None) is not None)
    return len(law.params_)


def fit(runs, law: str = "decoupled", bootstrap: int = 200, level: float = 0.95, baseline: str = BASELINE,
        resample: str = "formats", seed: int = 0, delta: float = 1e-3, n_jobs: int | None = None,
        progress: bool = True, **law_options) -> LawFit:
    """Fit a scaling law to a run table (a path or a frame from `load_runs`) and bootstrap it: the LawFit."""
    from .runs import load_runs
    runs = runs if isinstance(runs, pd.DataFrame) and "format" in runs else load_runs(runs, baseline=baseline)
    if law not in LAW_NAMES:
        raise InputError(f"unknown law '{law}'; choose from {', '.join(LAW_NAMES)}")
    fitted = make_law(law, baseline=baseline, delta=delta, **law_options).fit(runs)
    boot = run_bootstrap(fitted, runs, bootstrap, seed, n_jobs=n_jobs, progress=progress, unit=resample,
                         level=level) if bootstrap else None
    result = LawFit(runs, fitted, boot, seed, level)
    for text in result.warnings:  # in Python too, not only in .warnings (the command line prints its own)
        warnings.warn(text, FitWarning, stacklevel=2)
    return result
