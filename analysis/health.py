"""Is a fit healthy enough to read efficiencies from it?

Efficiencies come out of the law as eff = (A_f / A)^(-1/alpha), so anything that loosens alpha (an
irreducible loss E that the data cannot pin down, a misfit larger than the run-to-run scatter) widens every
efficiency interval. These checks say which of that is happening, and which formats the bootstrap
intervals actually tell apart.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .laws import E_AT_BOUND, eff_key
from .verdicts import format_interval


MISFIT_OVER_SCATTER = 1.5  # a law that fits leaves residuals near the seed-to-seed scatter; more is structure it misses


def seed_scatter(runs: pd.DataFrame) -> float:
    """Pooled standard deviation of log loss over runs that differ only in seed (NaN without repeats)."""
    log_loss = np.log(runs["loss"])
    groups = log_loss.groupby([runs[c] for c in ("format", "params", "tokens")])
    repeated = groups.transform("size") > 1
    dof = repeated.sum() - (groups.size() > 1).sum()
    if dof == 0:
        return float("nan")
    deviation = (log_loss - groups.transform("mean"))[repeated]
    return float(np.sqrt(np.sum(deviation ** 2) / dof))


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


def fit_health(law, runs: pd.DataFrame, boot=None, replicates: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per check: what was measured and a verdict ('ok', 'weak' or 'reported'). `boot` is the
    law's BootstrapResult, for intervals and for how often refits put E at its bound; `replicates` are
    extra runs repeating some of `runs` with other seeds (not fitted), for the seed-to-seed scatter."""
    intervals = boot.intervals(law.values()) if boot is not None and len(boot.samples) else None
    floor = E_AT_BOUND * runs["loss"].min()
    e = law.params_["E"]
    value, detail = f"{e:.4g}", "identified" if e > floor else ("at its lower bound 0: alpha and E trade off; "
                                                                  "larger models, more tokens, or --fix-E")
    at_bound = 0.0
    if intervals is not None:
        value += " " + format_interval(intervals.loc["E", "lo"], intervals.loc["E", "hi"])
        at_bound = float((boot.samples["E"] <= floor).mean())
        detail += f"; at its bound in {at_bound:.0%} of bootstrap refits"
    verdict = "ok" if e > floor and at_bound < 0.5 else "weak"
    if getattr(law, "fix_E", None) is not None:
        value, verdict, detail = f"{law.fix_E:g}", "reported", _held_e_detail(law, runs)
    rows = [("irreducible loss E", value, verdict, detail)]
    scatter = seed_scatter(runs if replicates is None else pd.concat([runs, replicates]))
    rows.append(("residual RMSE, log loss", f"{law.rmse_log_:.4f}",
                 "reported" if np.isnan(scatter) else ("ok" if law.rmse_log_ <= MISFIT_OVER_SCATTER * scatter else "weak"),
                 "no repeated seeds to compare with" if np.isnan(scatter) else
                 f"{law.rmse_log_ / scatter:.2f}x the seed-to-seed scatter {scatter:.4f} (ok up to {MISFIT_OVER_SCATTER}x)"))
    by_size = pd.Series(-law.residuals_, index=runs.index).groupby(runs["params"]).mean()  # observed - predicted
    worst = by_size.abs().idxmax()
    rows.append(("largest mean residual of one model size", f"{by_size[worst]:+.4f} at N = {worst:,.0f}",
                 "reported" if np.isnan(scatter) else ("ok" if abs(by_size[worst]) <= scatter else "weak"),
                 "no repeated seeds to compare with" if np.isnan(scatter) else
                 f"observed - predicted log loss, mean over the size's runs, of {len(by_size)} sizes (ok up to the "
                 f"seed scatter {scatter:.4f}): a shape the law misses trains off it at every format"))
    if intervals is not None:
        others = [f for f in law.formats_ if f != law.baseline]
        apart = [f for f in others if disjoint(intervals, f, law.baseline)]
        rows.append((f"efficiency intervals excluding the baseline '{law.baseline}'", f"{len(apart)} of {len(others)}",
                     "reported", "not separated: " + (", ".join(sorted(set(others) - set(apart))) or "none")))
        chain = resolved_chain(intervals, law.formats_)
        rows.append(("most formats with mutually disjoint intervals", f"{len(chain)} of {len(law.formats_)}",
                     "reported", " < ".join(chain)))
    return pd.DataFrame(rows, columns=["check", "value", "verdict", "detail"])
