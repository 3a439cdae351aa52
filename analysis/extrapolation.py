"""Does the law predict runs it was not fitted on, where users extrapolate? Two hold-outs:

- `params`: fitted without the largest model size, asked for it (the classic check);
- `tokens`: fitted on the lower half of the token budgets per parameter, asked for the upper half: where a format's
  cost grows with D/N (the efficiency is not a constant) a constant-efficiency law fails here, one way.

Errors are log(predicted) - log(observed) per held-out run, read separately for the baseline and the compressed
formats, and as the error of each compressed run's gap to the baseline at the same (N, D) (the part a law of
formats is responsible for: the baseline's own error along D cancels)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from capscale.capacity import InputError

from .runs import MIN_RUNS_PER_FORMAT

HOLD_OUTS = ("params", "tokens")
MIN_TRAIN_BUDGETS = 3  # token budgets per parameter (doublings) a token hold-out keeps for fitting


def token_split(runs: pd.DataFrame) -> float | None:
    """The tokens per parameter at and below which a token hold-out fits: the lower half of the distinct budgets
    (rounded to doublings), at least MIN_TRAIN_BUDGETS of them, one doubling held out at least; None if too few."""
    levels = np.unique(np.round(np.log2(runs["tokens"] / runs["params"])))
    keep = max(MIN_TRAIN_BUDGETS, int(np.ceil(len(levels) / 2)))
    if len(levels) <= keep:
        return None
    return float(2.0 ** (levels[keep - 1] + 0.5))


def split(runs: pd.DataFrame, hold_out: str = "params") -> tuple[pd.DataFrame, pd.DataFrame, str] | None:
    """(fitted runs, held-out runs, what was held out), formats with too few fitted points left out of both; None
    where the table cannot be split (fewer than 3 sizes, or too few token budgets)."""
    if hold_out not in HOLD_OUTS:
        raise InputError(f"hold-out: expected one of {HOLD_OUTS}, got {hold_out!r}")
    if hold_out == "params":
        if runs["params"].nunique() <= 2:
            return None
        largest = runs["params"].max()
        inside, what = runs["params"] < largest, f"largest model size (N = {largest:.4g})"
    else:
        cut = token_split(runs)
        if cut is None:
            return None
        inside = runs["tokens"] / runs["params"] <= cut
        what = f"token budgets above {cut:.0f} tokens per parameter (fitted at or below)"
    below = runs[inside]
    points = below[["format", "params", "tokens"]].drop_duplicates()["format"].value_counts()
    kept = runs["format"].isin(points[points >= MIN_RUNS_PER_FORMAT].index)
    return runs[kept & inside], runs[kept & ~inside], what


def extrapolation_check(law, runs: pd.DataFrame, hold_out: str = "params") -> pd.DataFrame | None:
    """`law` refitted on the kept runs, predicting the held-out ones: per-run relative and log errors, and for
    compressed runs the error of their gap to the baseline at the same cell (NaN where the baseline lacks it)."""
    parts = split(runs, hold_out)
    if parts is None:
        return None
    train, held, what = parts
    if held.empty:
        return None
    fitted = law.clone().fit(train)
    pred = fitted.predict(held)
    out = held[["format", "params", "tokens", "loss"]].assign(predicted=pred, rel_error=pred / held["loss"] - 1,
                                                              log_error=np.log(pred) - np.log(held["loss"]))
    base = out[out["format"] == law.baseline].groupby(["params", "tokens"])["log_error"].mean()
    cell = pd.MultiIndex.from_arrays([out["params"], out["tokens"]])
    out["gap_error"] = np.where(out["format"] == law.baseline, np.nan,
                                out["log_error"].to_numpy() - base.reindex(cell).to_numpy())
    out.attrs.update(hold_out=hold_out, what=what, baseline=law.baseline, law=law.name, n_fitted=len(train))
    return out


def extrapolation_errors(check: pd.DataFrame) -> dict:
    """Mean |error| alone hides a bias: the signed mean, how many held-out runs err on its side, the same for the
    compressed runs against the baseline's own error, and the gap error."""
    e = check["rel_error"]
    side = int((np.sign(e) == np.sign(e.mean())).sum())
    baseline = check.attrs.get("baseline")
    is_base = check["format"] == baseline
    log_e = check["log_error"]
    gap = check["gap_error"].dropna()
    out = {"hold_out": check.attrs.get("hold_out", "params"), "held_out": check.attrs.get("what", ""),
           "law": check.attrs.get("law"), "held_out_params": float(check["params"].max()),
           "mean_abs_rel_error": float(e.abs().mean()), "max_abs_rel_error": float(e.abs().max()),
           "mean_rel_error": float(e.mean()), "same_sign": side, "n": len(e),
           "baseline_mean_abs_log_error": float(log_e[is_base].abs().mean()) if is_base.any() else None,
           "compressed_mean_abs_log_error": float(log_e[~is_base].abs().mean()) if (~is_base).any() else None,
           "compressed_mean_log_error": float(log_e[~is_base].mean()) if (~is_base).any() else None,
           "gap_mean_error": float(gap.mean()) if len(gap) else None,
           "gap_above": int((gap > 0).sum()), "gap_n": len(gap)}
    text = (f"mean |error| {e.abs().mean():.2%}, signed mean {e.mean():+.2%} ({side} of {len(e)} on that side"
            f"{', all biased one way' if side == len(e) else ''}), max |error| {e.abs().max():.2%}")
    if out["baseline_mean_abs_log_error"] is not None and out["compressed_mean_abs_log_error"] is not None:
        text += (f"; compressed runs {out['compressed_mean_abs_log_error']:.4f} mean |log error| against the baseline's "
                 f"{out['baseline_mean_abs_log_error']:.4f}")
    if len(gap):
        text += (f"; gap to the baseline at the same (N, D) mispredicted by {out['gap_mean_error']:+.4f} on average "
                 f"({out['gap_above']} of {len(gap)} over-predicted)")
    out["text"] = text
    return out
