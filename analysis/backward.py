"""Backward-pass formats in a fit: each configuration's data efficiency effD with its interval, its format's
Gaussian error split into bias and variance, the exploratory regression of effD on them, and the effN-effD
plane of the configurations trained."""
from __future__ import annotations

import numpy as np
import pandas as pd

from capscale.capacity import InputError
from capscale.capacity.gmse import error_split
from capscale.capacity.runtable import NO_BACKWARD

from .names import eff_d_key, eff_key
from .runs import run_sides

SPLIT_SAMPLES = 1 << 18


def has_backward(law) -> bool:
    return len(getattr(law, "eff_d_", {})) > 1


def backward_table(fit) -> pd.DataFrame:
    """One row per backward configuration: effD and its interval, the runs, and where its label is one spec (the
    same format for all three operands) that format's GMSE, squared bias and variance on Gaussian data."""
    intervals = fit.conf_int() if fit.has_intervals else None
    _, backward = run_sides(fit.runs)
    rows = []
    for label, value in fit.law.eff_d_.items():
        lo, hi = ((intervals.loc[eff_d_key(label), "lo"], intervals.loc[eff_d_key(label), "hi"])
                  if intervals is not None and eff_d_key(label) in intervals.index else (np.nan, np.nan))
        split = None
        if label != NO_BACKWARD and "=" not in label.split("(")[0]:  # one spec, not g=..,gw=..
            try:
                split = error_split(label, samples=SPLIT_SAMPLES)
            except InputError:
                split = None
        rows.append({"backward": label, "effD": value, "effD_lo": lo if label != NO_BACKWARD else 1.0,
                     "effD_hi": hi if label != NO_BACKWARD else 1.0, "runs": int((backward == label).sum()),
                     "gmse": 0.0 if label == NO_BACKWARD else split.gmse if split else np.nan,
                     "bias_sq": 0.0 if label == NO_BACKWARD else split.bias_sq if split else np.nan,
                     "variance": 0.0 if label == NO_BACKWARD else split.variance if split else np.nan})
    table = pd.DataFrame(rows)
    table["bias_share"] = (table["bias_sq"] / table["gmse"]).where(table["gmse"] > 0)
    return table


def backward_sentence(table: pd.DataFrame, level: float) -> str:
    """The verdict: each configuration's effD with its interval, worst first."""
    from .verdicts import format_interval
    rows = table[table["backward"] != NO_BACKWARD].sort_values("effD")
    parts = [f"{r.backward} {r.effD:.3f} {format_interval(r.effD_lo, r.effD_hi)}" for r in rows.itertuples()]
    return (f"Data efficiency effD ({level:.0%} intervals; exact gradients 1): " + "; ".join(parts)
            + ". effD multiplies the tokens: 0.5 means the run learnt as much as with half the data and exact "
              "gradients (section 3b).")


def effd_regression(table: pd.DataFrame):
    """Exploratory OLS of log effD on log GMSE and the bias share of the backward formats (statsmodels); None
    with fewer configurations of known GMSE than its coefficients plus two residual degrees of freedom."""
    import statsmodels.formula.api as smf
    rows = table[(table["backward"] != NO_BACKWARD) & table["gmse"].gt(0)].assign(
        log_effD=lambda d: np.log(d["effD"]), log_gmse=lambda d: np.log(d["gmse"]))
    formula = "log_effD ~ log_gmse + bias_share" if rows["bias_share"].nunique() > 1 else "log_effD ~ log_gmse"
    if len(rows) < formula.count("+") + 4:  # the coefficients and at least two residual degrees of freedom
        return None
    return smf.ols(formula, data=rows).fit()


def efficiency_plane(fit, table: pd.DataFrame):
    """Each trained (forward, backward) configuration at (effN of its forward pair, effD of its backward
    configuration), with both intervals: a format that costs parameters moves left, one that costs data moves down."""
    from .plots import plt
    forward, backward = run_sides(fit.runs)
    pairs = pd.DataFrame({"forward": forward, "backward": backward}).drop_duplicates()
    intervals = fit.conf_int() if fit.has_intervals else None
    effd = table.set_index("backward")
    fig, ax = plt.subplots(figsize=(10.0, 5.4))
    colours = dict(zip(effd.index, plt.get_cmap("tab10").colors * 3))
    markers = dict(zip(sorted(set(forward), key=lambda f: f != fit.baseline), "o^sDvP*X" * 3))
    for _, r in pairs.iterrows():
        x = fit.law.eff_[r["forward"]]
        xlo, xhi = ((intervals.loc[eff_key(r["forward"]), "lo"], intervals.loc[eff_key(r["forward"]), "hi"])
                    if intervals is not None else (x, x))
        y, ylo, yhi = effd.loc[r["backward"], ["effD", "effD_lo", "effD_hi"]]
        ax.errorbar(x, y, xerr=[[max(x - xlo, 0)], [max(xhi - x, 0)]], yerr=[[max(y - ylo, 0)], [max(yhi - y, 0)]],
                    fmt=markers[r["forward"]], color=colours[r["backward"]], ms=8, capsize=2, lw=1)
    for g, c in colours.items():
        ax.plot([], [], "s", color=c, label=f"backward: {g}")
    for f, m in markers.items():
        ax.plot([], [], m, color="#555555", ls="", label=f"forward: {f}")
    ax.axhline(1, color="grey", ls="--", lw=0.8)
    ax.axvline(1, color="grey", ls="--", lw=0.8)
    ax.set(xlabel="parameter efficiency effN (forward pair)", ylabel="data efficiency effD (backward formats)",
           title="Where each configuration loses: parameters (left) or data (down)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig
