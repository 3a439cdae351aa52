"""The verdict a report leads with: plain sentences generated from the results, each with its numbers, its
interval and the test it comes from. The same sentences head report.md and report.html, the demo's output and
results.json; and the provenance that makes a report reproducible."""
from __future__ import annotations

import hashlib
import math
import platform
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from capscale.capacity.provenance import invoked_command, package_version

from .fitfile import fingerprint


def format_interval(lo, hi, spec: str = ".3g") -> str:
    """'[lo, hi]', or '' where there is no interval (no bootstrap)."""
    return "" if pd.isna(lo) else f"[{lo:{spec}}, {hi:{spec}}]"


P_FLOOR = 1e-16  # below double precision's resolution of 1 - p: printed as "< 1e-16", never as 0 or 1e-250


def format_p(p) -> str:
    """A p-value as a reader should see it: two significant digits, '< 1e-16' below what is meaningful."""
    return "n/a" if p is None or pd.isna(p) else ("< 1e-16" if p < P_FLOOR else f"{p:.2g}")


def capacity_sentence(validation, calibration, capacity_omitted) -> str:
    if validation is None:
        return f"Not tested: {capacity_omitted}"
    t = validation.table.dropna(subset=["inside"])
    loo = (f"{int(t['inside'].sum())} of {len(t)} formats' leave-one-format-out predictions fall inside their fitted "
           f"{validation.level:.0%} interval ({int(t['overlap'].sum())} of {len(t)} intervals overlap)") if len(t) else \
        "no bootstrap, so no leave-one-format-out verdicts"
    if calibration is None:
        return f"{loo}."
    (s, slo, shi), (c, clo, chi) = calibration.slope, calibration.intercept
    rejected = calibration.joint_p < 1 - calibration.level
    if rejected:
        lead = "Capacity does not predict efficiency without bias here"
    elif slo <= 0:
        lead = ("No bias detected, but the calibration slope's interval reaches 0: these runs cannot show that "
                "capacity predicts efficiency")
    elif slo <= 1 <= shi and clo <= 0 <= chi:
        lead = "Capacity predicts efficiency, with no bias detected"
    else:  # the joint test passes while one interval alone misses its value: say which, in its direction
        off = []
        if not slo <= 1 <= shi:
            off.append(f"the slope's interval lies {'below' if shi < 1 else 'above'} 1")
        if not clo <= 0 <= chi:
            off.append(f"the intercept's interval lies {'below' if chi < 0 else 'above'} 0")
        lead = (f"Capacity predicts efficiency (slope above 0) and the joint test detects no bias, but "
                f"{' and '.join(off)}: predictions are biased at the extremes")
    return (f"{lead}: calibration slope {s:.2f} {format_interval(slo, shi, '.2f')}, intercept {c:+.2f} "
            f"{format_interval(clo, chi, '+.2f')} "
            f"({calibration.level:.0%}; WLS of log fitted on log predicted efficiency), joint test of slope 1 and "
            f"intercept 0 p = {format_p(calibration.joint_p)}; {loo}.")


def differences_sentence(mixed, baseline: str) -> str:
    if mixed is None or mixed.table.empty:
        return "Not tested: the paired mixed model needs runs at 3 or more (N, D) cells."
    t = mixed.table
    absent = t[t["log_loss_diff"].isna()] if "log_loss_diff" in t else t
    t = t[t["log_loss_diff"].notna()] if "log_loss_diff" in t else t.iloc[:0]
    tail = "; ".join(f"{r.format} ({r.note.removeprefix('not compared: ')})" for r in absent.itertuples())
    if t.empty:
        return f"Not tested: no format shares enough (N, D) cells with '{baseline}': {tail}."
    differ, same = t[t["differs"]], t[~t["differs"].astype(bool)]
    worst = t.loc[t["log_loss_diff"].idxmax()]
    text = (f"{len(differ)} of {len(t)} formats differ from '{baseline}' at equal (N, D) (mixed model with a random "
            f"intercept per cell, on the {int(t['cells'].max())} or fewer cells each shares with '{baseline}', "
            f"Holm-adjusted at {1 - mixed.level:.0%})")
    if len(same):
        text += f"; not distinguishable from it: {', '.join(same['format'])}"
    return (text + f". Largest loss penalty: {worst['format']}, {100 * (math.exp(worst['log_loss_diff']) - 1):+.1f}% "
                   f"{format_interval(100 * (math.exp(worst['lo']) - 1), 100 * (math.exp(worst['hi']) - 1), '+.1f')} loss"
                   + (f". Not compared: {tail}." if tail else "."))


def composition_sentence(wald, comp: pd.DataFrame) -> str:
    if wald is None:
        return ("Not tested: no combined format was trained with both its parts." if comp.empty else
                "Not tested: no bootstrap replicates for the Wald test.")
    parts = [f"{r.combined} = {r.part1} x {r.part2}: ratio {r.ratio:.2f} {format_interval(r.ratio_lo, r.ratio_hi, '.2f')}, p = "
             f"{format_p(r.p)} ({r.verdict})" for r in wald.table.itertuples()]
    n_multiply = int((wald.table["p"] >= 1 - wald.level).sum())
    return (f"{n_multiply} of {len(parts)} compositions are consistent with multiplying capacities (Wald test of "
            f"log eff(AB) = log eff(A) + log eff(B), {wald.level:.0%}): " + "; ".join(parts) + ".")


def drift_sentence(drift, token_holdout: dict | None) -> str:
    """The paired drift test's sentence and, where the token budgets allow it, how the law predicts the held-out
    largest ones."""
    text = drift.sentence()
    if token_holdout is not None and token_holdout.get("compressed_mean_abs_log_error") is not None:
        text += (f" Fitted without the {token_holdout['held_out']}, the {token_holdout['law']} law predicts them with "
                 f"mean |log error| {token_holdout['compressed_mean_abs_log_error']:.4f} on the compressed runs "
                 f"(signed {token_holdout['compressed_mean_log_error']:+.4f}) against "
                 f"{token_holdout['baseline_mean_abs_log_error']:.4f} on the baseline's")
        if token_holdout["gap_n"]:
            text += (f"; their gap to the baseline at the same (N, D) is over-predicted in {token_holdout['gap_above']} "
                     f"of {token_holdout['gap_n']} cells (mean {token_holdout['gap_mean_error']:+.4f})")
        text += " (section 8)."
    return text


def health_sentence(health: pd.DataFrame) -> str:
    checks = health.set_index("check")
    parts = []
    for name, row in checks.iterrows():
        if row["verdict"] in ("ok", "weak") or row["detail"].startswith("held at"):  # a held E says why
            parts.append(f"{name} {row['value']} ({row['verdict']}: {row['detail']})")
    weak = int((checks["verdict"] == "weak").sum())
    return (f"{weak} of {len(parts)} checks weak: " if weak else "All checks pass: ") + "; ".join(parts) + "."


def caveat_sentence(health: pd.DataFrame, warnings: list[str], extrapolation: dict | None,
                    residual_by_size: pd.Series) -> str:
    weak = health[health["verdict"] == "weak"]
    if len(weak):
        names = " and ".join(weak["check"])
        text = (f"{names} {'are' if len(weak) > 1 else 'is'} weak (fit health above), so every efficiency interval "
                "is wider than the runs' scatter alone would make it.")
    elif warnings:
        text = warnings[0] + "."
    else:
        text = "none flagged by the fit-health checks."
    worst = residual_by_size.abs().idxmax()
    others = residual_by_size.drop(worst).abs()
    misfit_weak = health.set_index("check").loc["residual RMSE, log loss", "verdict"] == "weak"
    if misfit_weak and len(others) and abs(residual_by_size[worst]) > 2 * others.mean():  # one size stands out
        text += (f" The largest misfit is one model size: mean log residual {residual_by_size[worst]:+.3f} at "
                 f"N = {worst:,.0f} (figure 'Residuals').")
    if extrapolation and extrapolation["same_sign"] == extrapolation["n"] and extrapolation["n"] > 2:
        text += (f" Held-out largest models are all predicted on one side (signed mean error "
                 f"{extrapolation['mean_rel_error']:+.1%}): the law is biased when it extrapolates.")
    return text


def verdicts(validation, calibration, capacity_omitted, mixed, baseline, wald, comp, health, warnings,
            extrapolation, residual_by_size: pd.Series) -> list[dict]:
    """[{"topic", "text"}]: the report's summary, in the order a reader asks."""
    return [{"topic": "Does capacity predict efficiency?", "text": capacity_sentence(validation, calibration,
                                                                                    capacity_omitted)},
            {"topic": "Which formats differ?", "text": differences_sentence(mixed, baseline)},
            {"topic": "Do capacities compose?", "text": composition_sentence(wald, comp)},
            {"topic": "Fit health", "text": health_sentence(health)},
            {"topic": "Main caveat", "text": caveat_sentence(health, warnings, extrapolation, residual_by_size)}]


def provenance(runs: pd.DataFrame, seed: int, law, boot, level: float, command: str | None = None) -> dict:
    """What reproduces a report: versions, the command, the data (file hash and fitted-rows fingerprint), the
    fitting settings and the date."""
    source = runs.attrs.get("source")
    path = Path(source) if isinstance(source, str) else None
    return {
        "capscale": package_version("capscale"),
        **{p: package_version(p) for p in ("torch", "numpy", "scipy", "pandas", "statsmodels", "seaborn")},
        "python": platform.python_version(),
        "command": command or invoked_command(),
        "data": source,
        "data_sha256": hashlib.sha256(path.read_bytes()).hexdigest() if path and path.is_file() else None,
        "fitted_rows_fingerprint": fingerprint(runs), "runs": len(runs),
        "law": law.name, "delta": law.delta, "baseline": law.baseline,
        "bootstrap_replicates": 0 if boot is None else len(boot.samples) + boot.n_failed,
        "bootstrap_failed": None if boot is None else boot.n_failed, "seed": seed, "level": level,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
