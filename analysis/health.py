"""Is a fit healthy enough to read efficiencies from it?

Efficiencies come out of the law as eff = (A_f / A)^(-1/alpha), so anything that loosens alpha (an
irreducible loss E that the data cannot pin down, a misfit larger than the run-to-run scatter) widens every
efficiency interval. These checks say which of that is happening, and which formats the bootstrap
intervals actually tell apart.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .laws import E_AT_BOUND
from .names import eff_key
from .runs import token_budgets
from .verdicts import format_interval


MISFIT_OVER_SCATTER = 1.5  # a law that fits leaves residuals near the seed-to-seed scatter; more is structure it misses


REPEAT_TOLERANCE = 1e-4  # losses of one cell closer than this are one run recorded twice, not a repeat
MIN_REPEAT_CELLS = 3      # below this many repeated cells the seed scatter is "not measured"


def _scatter(runs: pd.DataFrame) -> tuple[float, int]:
    """(pooled standard deviation of log loss over genuine repeats, how many cells hold them): cells (format, N, D)
    with two or more runs whose losses are not all identical to REPEAT_TOLERANCE. NaN with fewer than
    MIN_REPEAT_CELLS such cells: too few to compare a misfit with."""
    loss = runs["loss"].astype(float)
    keys = [runs[c] for c in ("format", "params", "tokens")]
    log_loss = np.log(loss)
    groups = log_loss.groupby(keys)
    by_loss = loss.groupby(keys)
    repeated = (groups.transform("size") > 1) & (by_loss.transform("max") - by_loss.transform("min") > REPEAT_TOLERANCE)
    cells = int(runs[repeated].groupby(["format", "params", "tokens"]).ngroups) if repeated.any() else 0
    if cells < MIN_REPEAT_CELLS:
        return float("nan"), cells
    deviation = (log_loss - groups.transform("mean"))[repeated]
    return float(np.sqrt(np.sum(deviation ** 2) / (repeated.sum() - cells))), cells


def repeat_cells(runs: pd.DataFrame) -> int:
    """How many (format, N, D) cells hold genuine repeats (seeds whose losses differ)."""
    return _scatter(runs)[1]


def seed_scatter(runs: pd.DataFrame) -> float:
    """Pooled standard deviation of log loss over genuine repeats (`repeat_cells`); NaN with fewer than
    MIN_REPEAT_CELLS such cells: too few to compare a misfit with."""
    return _scatter(runs)[0]


E_PROFILE_SHARES = (0.0, 0.1, 0.2, 0.3, 0.4)  # E held at these shares of the smallest loss, for the profile


def e_profile(law, runs: pd.DataFrame, shares=E_PROFILE_SHARES) -> pd.DataFrame:
    """The decoupled law refitted with E held at each share of the smallest loss: E, the residual RMSE, the
    exponents, and how far the efficiencies moved from the fit at the first share (`max_eff_shift`). Flat where
    the runs cannot identify E; what a held E (`fix_E`) rests on."""
    from .laws import DecoupledLaw
    rows, first = [], None
    for share in shares:
        fitted = DecoupledLaw(law.baseline, law.delta, fix_E=share * float(runs["loss"].min())).fit(runs)
        first = first or fitted.eff_
        rows.append({"E": share * float(runs["loss"].min()), "rmse_log": fitted.rmse_log_,
                     "alpha": fitted.params_["alpha"], "beta": fitted.params_["beta"],
                     "max_eff_shift": max(abs(fitted.eff_[f] - first[f]) for f in first)})
    return pd.DataFrame(rows)


def _held_e_detail(law, runs: pd.DataFrame) -> str:
    """Why a held E may stand: what the runs say about E around it."""
    profile = e_profile(law, runs)
    best = profile.loc[profile["rmse_log"].idxmin()]
    return (f"held at {law.fix_E:.4g} (fix_E), not fitted; refitted with E from 0 to {profile['E'].iloc[-1]:.3g} the "
            f"residual RMSE goes {profile['rmse_log'].iloc[0]:.4f} to {profile['rmse_log'].iloc[-1]:.4f} (least at "
            f"E = {best['E']:.3g}) and no efficiency moves more than {profile['max_eff_shift'].max():.3f}")


def efficiency_interval(intervals: pd.DataFrame, fmt: str) -> tuple:
    """(lo, hi) of a format's efficiency (the baseline's, fixed at 1, is the point (1, 1))."""
    return tuple(intervals.loc[eff_key(fmt), ["lo", "hi"]])


def disjoint(intervals: pd.DataFrame, a: str, b: str) -> bool:
    """Whether two formats' efficiency intervals do not overlap."""
    (lo_a, hi_a), (lo_b, hi_b) = efficiency_interval(intervals, a), efficiency_interval(intervals, b)
    return hi_a < lo_b or hi_b < lo_a


def resolved_chain(intervals: pd.DataFrame, formats) -> list:
    """A largest set of formats whose efficiency intervals are pairwise disjoint, in increasing order: how many
    levels of efficiency the study resolves (interval scheduling: greedy by upper end is optimal)."""
    chain, last_hi = [], -np.inf
    for f in sorted(formats, key=lambda f: efficiency_interval(intervals, f)[1]):
        lo, hi = efficiency_interval(intervals, f)
        if lo > last_hi:
            chain.append(f)
            last_hi = hi
    return chain


E_IDENTIFIED_RATIO = 2.0  # E is identified when its interval is narrow: hi / lo at most this (and lo above the floor)


def _e_row(law, runs, boot, intervals) -> tuple:
    floor = E_AT_BOUND * runs["loss"].min()
    e = law.params_["E"]
    if getattr(law, "fix_E", None) is not None:
        return ("irreducible loss E", f"{law.fix_E:g}", "reported", _held_e_detail(law, runs))
    if e <= floor:
        return ("irreducible loss E", f"{e:.4g}", "weak",
                "at its lower bound 0: alpha and E trade off; larger models, more tokens, or --fix-E")
    if intervals is None:
        return ("irreducible loss E", f"{e:.4g}", "reported", "no bootstrap interval, so whether the runs identify E "
                "is not measured")
    lo, hi = intervals.loc["E", "lo"], intervals.loc["E", "hi"]
    at_bound = float((boot.samples["E"] <= floor).mean())
    narrow = lo > floor and hi <= E_IDENTIFIED_RATIO * lo
    return ("irreducible loss E", f"{e:.4g} {format_interval(lo, hi)}", "ok" if narrow and at_bound < 0.5 else "weak",
            ("identified" if narrow else f"not identified: its interval spans {hi / max(lo, 1e-300):.3g}x")
            + f" (rule: interval above {E_AT_BOUND:g}x the smallest loss and hi/lo <= {E_IDENTIFIED_RATIO:g}); at its "
              f"bound in {at_bound:.0%} of bootstrap refits")


def _mean_residual_row(name: str, by: pd.Series, what: str, scatter: float, label) -> tuple:
    worst = by.abs().idxmax()
    return (name, f"{by[worst]:+.4f} at {label(worst)}",
            "reported" if np.isnan(scatter) else ("ok" if abs(by[worst]) <= scatter else "weak"),
            "seed scatter not measured" if np.isnan(scatter) else
            f"observed - predicted log loss, mean over its runs, of {len(by)} {what} (ok up to the seed scatter "
            f"{scatter:.4f})")


def unphysical_eff_d(law) -> dict:
    """{backward configuration: effD} of those above 1 (a backward format cannot make tokens worth more than exact
    gradients), where the law fits more than one; {} otherwise."""
    eff_d = getattr(law, "eff_d_", {})
    return {g: v for g, v in eff_d.items() if v > 1.0} if len(eff_d) > 1 else {}


def fit_health(law, runs: pd.DataFrame, boot=None, replicates: pd.DataFrame | None = None,
               level: float = 0.95) -> pd.DataFrame:
    """One row per check: what was measured and a verdict ('ok', 'weak' or 'reported'). `boot` is the
    law's BootstrapResult, for intervals and for how often refits put E at its bound; `replicates` are
    extra runs repeating some of `runs` with other seeds (not fitted), for the seed-to-seed scatter. Residuals are
    read by model size, by token budget and by format; the paired drift test (`constancy`) asks whether a format's
    cost changes with tokens per parameter."""
    from .constancy import constancy_test
    intervals = boot.intervals(law.values()) if boot is not None and len(boot.samples) else None
    rows = [_e_row(law, runs, boot, intervals)]
    pooled = runs if replicates is None else pd.concat([runs, replicates])
    scatter, cells = _scatter(pooled)
    rows.append(("residual RMSE, log loss", f"{law.rmse_log_:.4f}",
                 "reported" if np.isnan(scatter) else ("ok" if law.rmse_log_ <= MISFIT_OVER_SCATTER * scatter else "weak"),
                 f"seed scatter not measured: {cells} cell(s) with genuine repeats (at least {MIN_REPEAT_CELLS} needed)"
                 if np.isnan(scatter) else
                 f"{law.rmse_log_ / scatter:.2f}x the seed-to-seed scatter {scatter:.4f} from {cells} repeated cells "
                 f"(ok up to {MISFIT_OVER_SCATTER}x)"))
    observed_minus_predicted = pd.Series(-law.residuals_, index=runs.index)
    by_size = observed_minus_predicted.groupby(runs["params"]).mean()
    rows.append(_mean_residual_row("largest mean residual of one model size", by_size, "sizes", scatter,
                                   lambda n: f"N = {n:,.0f}"))
    by_budget = observed_minus_predicted.groupby(token_budgets(runs)).mean()
    rows.append(_mean_residual_row("largest mean residual of one token budget", by_budget, "token budgets per "
                                   "parameter", scatter, lambda r: f"D/N = {r:g}"))
    by_format = observed_minus_predicted.groupby(runs["format"]).mean()
    rows.append(_mean_residual_row("largest mean residual of one format", by_format, "formats", scatter, str))
    drift = constancy_test(law, runs, level)
    tested = drift.tested
    rows.append((drift.check_name(), f"{len(drift.drifting)} of {len(tested)} formats drift" if len(tested) else
                 "not measured", "reported" if not len(tested) else ("weak" if drift.drifting else "ok"),
                 drift.brief()))
    unphysical = unphysical_eff_d(law)
    if len(getattr(law, "eff_d_", {})) > 1:
        rows.append(("data efficiencies at most 1", f"{len(unphysical)} above 1", "weak" if unphysical else "ok",
                     ("unphysical: a backward format cannot make tokens worth more than exact gradients; "
                      + ", ".join(f"effD[{g}] = {v:.3f}" for g, v in unphysical.items())
                      + " (a token-dependent forward cost forced into effD, or too few budgets)") if unphysical else
                     "every backward configuration's effD <= 1"))
    if intervals is not None:
        others = [f for f in law.formats_ if f != law.baseline]
        apart = [f for f in others if disjoint(intervals, f, law.baseline)]
        rows.append((f"efficiency intervals excluding the baseline '{law.baseline}'", f"{len(apart)} of {len(others)}",
                     "reported", "not separated: " + (", ".join(sorted(set(others) - set(apart))) or "none")))
        chain = resolved_chain(intervals, law.formats_)
        rows.append(("most formats with mutually disjoint intervals", f"{len(chain)} of {len(law.formats_)}",
                     "reported", " < ".join(chain)))
    return pd.DataFrame(rows, columns=["check", "value", "verdict", "detail"])
