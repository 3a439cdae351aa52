"""Does capacity predict the trained efficiency? rho(GMSE) fitted to the decoupled law's efficiencies.

A format's predicted efficiency is rho(GMSE_w) x rho(GMSE_a) (an uncompressed part counts 1). The
constants are fitted by least squares on log efficiency; their uncertainty comes from refitting on
every bootstrap replicate of the law. Leave-one-format-out: each format's efficiency predicted by a
rho refitted without it, with an interval from the same replicates, beside its fitted value and CI.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pandas as pd
from scipy import optimize

from capscale.capacity.rho import RHO_C, RHO_F, RHO_L, pair_rho, quarter_log, rho, rho_of_quarter_log
from capscale.capacity import BASELINE, InputError, is_uncompressed, spec_gmse
from capscale.capacity.results import Summary

from .bootstrap import BootstrapResult, bootstrap
from .laws import DecoupledLaw, L_PLAUSIBLE, law_loss
from .names import RHO_FORMS, eff_key
from .parallel import chunked_map
from .runs import format_table, require_capacity
from .solver import single_threaded_blas
from .verdicts import format_interval

FORMS = {  # name (RHO_FORMS, in order): (function of gmse and constants, constant names, starts, bounds)
    "tanh": (lambda g, L, F, C: rho(g, L, F, C), ("L", "F", "C"),
             [(RHO_L, RHO_F, RHO_C), (0.9, 0.3, 1.0), (1.0, 0.6, 2.0)], [(0.05, 5.0), (0.01, 5.0), (0.05, 10.0)]),
    "logistic": (lambda g, A, B: 1.0 / (1.0 + B * np.asarray(g, float) ** A), ("A", "B"),
                 [(1.0, 5.0), (0.5, 2.0), (2.0, 20.0)], [(0.01, 10.0), (1e-3, 1e4)]),
    "ratio": (lambda g, A, B: (1.0 - np.asarray(g, float) ** A) / (1.0 + B * np.asarray(g, float) ** A), ("A", "B"),
              [(1.0, 5.0), (0.5, 2.0), (2.0, 20.0)], [(0.01, 10.0), (1e-3, 1e4)]),
}


assert tuple(FORMS) == RHO_FORMS


def capacity_parts(formats: pd.DataFrame) -> list:
    """[(uncompressed, GMSE)] arrays for weights and activations: what the regression reads of formats."""
    return [(formats[s].isna().to_numpy(), np.clip(formats[g].to_numpy(float), 1e-12, 1.0))
            for s, g in (("w_format", "w_gmse"), ("a_format", "a_gmse"))]


class CapacityRegression:
    """eff = r(GMSE_w) r(GMSE_a) with r one of FORMS; fit(formats, eff) returns self, constants in `constants_`."""

    def __init__(self, form: str = "tanh"):
        if form not in FORMS:
            raise InputError(f"unknown rho form '{form}'; choose from {', '.join(FORMS)}")
        self.form = form

    def evaluate(self, c, formats: "pd.DataFrame | list") -> np.ndarray:
        """Predicted efficiencies of `formats` (a frame, or its `capacity_parts`) for constants `c` (FORMS order)."""
        fn = FORMS[self.form][0]
        pred = 1.0
        for uncompressed, g in capacity_parts(formats) if isinstance(formats, pd.DataFrame) else formats:
            pred = pred * np.where(uncompressed, 1.0, fn(g, *c))
        return pred

    def fit(self, formats: "pd.DataFrame | list", eff, start: dict | None = None) -> "CapacityRegression":
        """Least squares on log efficiency (trust-region, bounded). `formats`: a frame or its `capacity_parts`.
        `start`: constants to start from alone (a bootstrap refit next to the full-data fit); otherwise the
        form's few starting points."""
        fn, names, starts, bounds = FORMS[self.form]
        log_eff = np.log(np.asarray(eff, float))
        parts = capacity_parts(formats) if isinstance(formats, pd.DataFrame) else formats

        if self.form == "tanh":  # log eff and its Jacobian in closed form: most of a validation's time otherwise
            log_model, jac = _tanh_log_eff(parts)
        else:
            log_model, jac = (lambda c: np.log(np.maximum(self.evaluate(c, parts), 1e-300))), "2-point"

        def residuals(c):
            return log_model(c) - log_eff
        lo, hi = (np.array(b, float) for b in zip(*bounds))
        inside = lambda s: np.clip(np.asarray(s, float), lo + 1e-9 * (hi - lo), hi - 1e-9 * (hi - lo))  # noqa: E731
        tries = [list(start.values())] if start else starts
        best = min((optimize.least_squares(residuals, inside(s), jac=jac, bounds=(lo, hi), x_scale="jac")
                    for s in tries), key=lambda r: r.cost)
        self.constants_ = dict(zip(names, map(float, best.x)))
        self.sse_ = float(2 * best.cost)
        self.warnings_ = [f"{n} = {v:.3g} is at its bound [{lo:g}, {hi:g}]" for (n, v), (lo, hi)
                          in zip(self.constants_.items(), bounds) if not lo * 1.001 < v < hi * 0.999]
        if self.constants_.get("L", 1.0) > L_PLAUSIBLE:
            self.warnings_.append(f"L = {self.constants_['L']:.3g} is above its plausible range (<= {L_PLAUSIBLE}): "
                                  "a capacity above 1 at GMSE 0 is not physical; the fit extrapolates")
        return self

    def predict(self, formats: pd.DataFrame) -> np.ndarray:
        return self.evaluate(list(self.constants_.values()), formats)


def _tanh_log_eff(parts):
    """(log eff, d log eff / d (L, F, C)) of the tanh form as functions of the constants: log eff sums log L +
    C log tanh(F q) over the compressed sides (q = log_1/4 GMSE, as `rho` computes it)."""
    sides = [(~uncompressed, quarter_log(g)) for uncompressed, g in parts]

    def log_eff(c):
        return sum(compressed * np.log(np.maximum(rho_of_quarter_log(q, *c), 1e-300)) for compressed, q in sides)

    def jacobian(c, *_):
        L, F, C = c
        out = np.zeros((len(sides[0][1]), 3))
        for compressed, q in sides:
            t = np.maximum(np.tanh(F * q), 1e-300)
            out[:, 0] += compressed / L
            out[:, 1] += compressed * C * q * (1.0 - t * t) / t
            out[:, 2] += compressed * np.log(t)
        return out
    return log_eff, jacobian


SPEC_COLUMNS = ["w_format", "a_format", "w_gmse", "a_gmse"]


def anchored(formats: pd.DataFrame) -> list:
    """The `capacity_parts` of `formats` plus the baseline's anchor row: GMSE 0 has efficiency 1 (rho(0) = L).
    Without the anchor, leaving out the format closest to GMSE 0 leaves L unconstrained."""
    anchor = pd.DataFrame({"w_format": ["(baseline)"], "a_format": [None], "w_gmse": [0.0], "a_gmse": [0.0]})
    return capacity_parts(pd.concat([formats[SPEC_COLUMNS], anchor]))


def fit_rho(formats: "pd.DataFrame | list", eff, form: str = "tanh", start: dict | None = None) -> CapacityRegression:
    """rho fitted to the formats' efficiencies (a frame, or its `anchored` parts), anchored by the baseline."""
    parts = anchored(formats) if isinstance(formats, pd.DataFrame) else formats
    return CapacityRegression(form).fit(parts, np.append(np.asarray(eff, float), 1.0), start)


@dataclass
class Validation:
    law: DecoupledLaw
    boot: BootstrapResult | None
    form: str
    constants: dict
    constants_ci: dict
    table: pd.DataFrame
    regression: CapacityRegression = field(repr=False, default=None)
    draws: pd.DataFrame | None = field(repr=False, default=None)  # rho constants refitted per bootstrap replicate

    def as_json(self) -> dict:
        def p(name):
            ci = self.constants_ci.get(name)
            return {"value": self.constants[name], "se": None if ci is None else ci[2],
                    "ci": None if ci is None else [ci[0], ci[1]]}
        rows = []
        for _, r in self.table.iterrows():
            rows.append({"format": r["format"],
                         "fitted": {"value": r["fitted"],
                                    "ci": None if pd.isna(r["fitted_lo"]) else [r["fitted_lo"], r["fitted_hi"]]},
                         "predicted": {"value": r["predicted"],
                                       "ci": None if pd.isna(r["pred_lo"]) else [r["pred_lo"], r["pred_hi"]]},
                         "inside": r["inside"], "overlap": r["overlap"], "capacity": r["capacity"], "w_gmse": r["w_gmse"],
                         "a_gmse": r["a_gmse"]})
        return {"form": self.form, "rho": {k: p(k) for k in self.constants}, "formats": rows,
                "warnings": self.warnings}

    @property
    def warnings(self) -> list[str]:
        return self.law.warnings_ + self.regression.warnings_

    def summary(self) -> Summary:
        consts = ", ".join(f"{k} = {v:.3g}" + (" " + format_interval(*self.constants_ci[k][:2])
                                               if k in self.constants_ci else "") for k, v in self.constants.items())
        cols = ["format", "w_gmse", "a_gmse", "capacity", "fitted", "fitted_lo", "fitted_hi", "predicted",
                "pred_lo", "pred_hi", "inside", "overlap"]
        return Summary(f"capacity regression ({self.form})",
                       [("rho constants", consts),
                        ("leave-one-format-out", "each format's efficiency predicted from capacity with rho refitted on "
                                                 f"the others; {self.verdicts()}")],
                       self.table[cols], [f"warning: {w}" for w in self.warnings])

    @property
    def level(self) -> float:
        return self.boot.level if self.boot is not None else 0.95

    def verdicts(self) -> str:
        """The two tests in words: the prediction inside the fitted interval (the stricter), the intervals overlapping."""
        t = self.table.dropna(subset=["inside"])
        if t.empty:
            return "no bootstrap intervals, so no verdicts"
        return (f"{int(t['inside'].sum())} of {len(t)} predictions fall inside the fitted {self.level:.0%} interval; "
                f"{int(t['overlap'].sum())} of {len(t)} prediction intervals overlap it")


def _eff_columns(formats):
    return [eff_key(f) for f in formats]


@single_threaded_blas  # once per batch: probing the BLAS pools costs more than one of these tiny fits
def _replicate_rho(info, form, full, held_out, rows) -> list:
    """For bootstrap replicates (rows of efficiencies): rho refitted on all formats, and each format's prediction
    with rho refitted without it; each fit starts from the corresponding full-data fit."""
    keep = [info.index != f for f in info.index]
    without = [anchored(info[k]) for k in keep]  # the same formats in every replicate: arrays built once
    alone = [capacity_parts(info.loc[[f]]) for f in info.index]
    every = anchored(info)
    out = []
    for row in rows:
        preds = [float(fit_rho(parts, row[k], form, held_out[f]).predict(one)[0])
                 for f, k, parts, one in zip(info.index, keep, without, alone)]
        out.append((fit_rho(every, row, form, full).constants_, preds))
    return out


def _rho_over_replicates(info, form, full, held_out, samples, n_jobs) -> tuple[pd.DataFrame, np.ndarray]:
    rows = samples.to_numpy(float)
    n_jobs = max(1, min(n_jobs or os.cpu_count() or 1, len(rows)))
    results = chunked_map(partial(_replicate_rho, info, form, full, held_out), rows, n_jobs, n_chunks=n_jobs)
    return pd.DataFrame([c for c, _ in results]), np.array([p for _, p in results])


def validate(runs: pd.DataFrame, n_boot: int = 200, seed: int = 0, form: str = "tanh", delta: float = 1e-3,
             law: DecoupledLaw | None = None, boot: BootstrapResult | None = None, progress: bool = True,
             n_jobs: int | None = None, baseline: str = BASELINE, level: float = 0.95) -> Validation:
    """Fit rho to the decoupled efficiencies and predict each format leaving it out; a given `law` brings
    its own baseline."""
    law = law or DecoupledLaw(baseline, delta).fit(runs)
    baseline = law.baseline
    if boot is None and n_boot:
        boot = bootstrap(law, runs, n_boot, seed, n_jobs=n_jobs, progress=progress, level=level)
    info = format_table(runs).loc[[f for f in law.formats_ if f != baseline]]
    require_capacity(info, "capacity validation (rho fitted to the trained efficiencies)")
    fitted = pd.Series({f: law.eff_[f] for f in info.index})
    n_constants = len(FORMS[form][1])
    if len(info) <= n_constants:
        raise InputError(f"the {form} rho has {n_constants} constants, so it needs at least {n_constants + 1} compressed "
                         f"formats besides the baseline '{baseline}' (found {len(info)}: {list(info.index)}); train "
                         "more formats, choose a rho form with fewer constants (--form), or check the formats against the published "
                         "constants without a refit (validate --constants published)")
    reg = fit_rho(info, fitted, form)
    held_out = {f: fit_rho(info[info.index != f], fitted[info.index != f], form) for f in info.index}
    samples = boot.samples[_eff_columns(info.index)] if boot is not None and len(boot.samples) else None
    constants_ci, draws = {}, None
    if samples is not None:
        draws, loo_draws = _rho_over_replicates(info, form, reg.constants_,
                                                {f: r.constants_ for f, r in held_out.items()}, samples, n_jobs)
        constants_ci = {k: (float(draws[k].quantile(boot.tails()[0])), float(draws[k].quantile(boot.tails()[1])),
                            float(draws[k].std()))
                        for k in draws}
    rows = []
    for i, f in enumerate(info.index):
        one = info.loc[[f]]
        predicted = float(held_out[f].predict(one)[0])
        lo = hi = flo = fhi = np.nan
        inside = overlap = None  # without bootstrap intervals neither test can be made
        if samples is not None:
            preds = loo_draws[:, i]
            lo, hi = np.quantile(preds, boot.tails())
            flo, fhi = samples[eff_key(f)].quantile(boot.tails())
            inside = bool(flo <= predicted <= fhi)  # the prediction falls inside the fitted efficiency's interval
            overlap = bool(lo <= fhi and flo <= hi)  # a weaker test: the two intervals share some value
        rows.append({"format": f, "w_gmse": info.at[f, "w_gmse"], "a_gmse": info.at[f, "a_gmse"],
                     "capacity": float(reg.predict(one)[0]), "fitted": fitted[f], "fitted_lo": flo, "fitted_hi": fhi,
                     "predicted": predicted, "pred_lo": lo, "pred_hi": hi, "inside": inside, "overlap": overlap})
    return Validation(law, boot, form, reg.constants_, constants_ci, pd.DataFrame(rows), reg, draws)


def predict_format(runs: pd.DataFrame, w_format: str | None, a_format: str | None, params: float, tokens: float,
                   n_boot: int = 200, seed: int = 0, form: str = "tanh", progress: bool = True,
                   baseline: str = BASELINE, level: float = 0.95, law: DecoupledLaw | None = None,
                   boot: BootstrapResult | None = None) -> dict:
    """Efficiency and loss of a format never trained: rho fitted on the trained formats, then the law."""
    v = validate(runs, n_boot=n_boot, seed=seed, form=form, progress=progress, baseline=baseline, level=level,
                 law=law, boot=boot)
    return predict_from_validation(v, w_format, a_format, params, tokens, seed)


def predict_from_validation(v: Validation, w_format: str | None, a_format: str | None, params: float, tokens: float,
                            seed: int = 0) -> dict:
    """`predict_format` on a validation already computed (a LawFit keeps one per rho form)."""
    w_format, a_format = (None if is_uncompressed(s) else s for s in (w_format, a_format))
    new = pd.DataFrame({"w_format": [w_format], "a_format": [a_format], "w_gmse": [spec_gmse(w_format)],
                        "a_gmse": [spec_gmse(a_format)]})
    eff = float(v.regression.predict(new)[0])
    loss = law_loss(v.law.params_, params, tokens, eff)
    out = {"w_format": w_format, "a_format": a_format, "w_gmse": float(new.w_gmse[0]), "a_gmse": float(new.a_gmse[0]),
           "params": params, "tokens": tokens, "eff": eff, "loss": float(loss), "eff_interval": None,
           "loss_interval": None}
    if v.draws is not None:  # rho constants refitted per bootstrap replicate, row for row with the samples
        rng = np.random.default_rng(seed)
        effs, losses = [], []
        for (_, row), constants in zip(v.boot.samples.iterrows(), v.draws.to_numpy()):
            e = float(v.regression.evaluate(constants, new)[0])
            effs.append(e)
            pred = law_loss(row, params, tokens, e)
            losses.append(pred * np.exp(rng.choice(v.law.residuals_)))
        out["eff_interval"] = [float(x) for x in np.quantile(effs, v.boot.tails())]
        out["loss_interval"] = [float(x) for x in np.quantile(losses, v.boot.tails())]
    return out


def check_constants(fit, constants: str = "published") -> pd.DataFrame:
    """Each format's fitted efficiency (with its interval) against rho(GMSE) at given constants, no refit: the
    question for a study of any number of formats, "does my format train as the published law says?".
    `constants`: "published" (reference section 1, Llama/C4), the only set without a fit of its own."""
    if constants != "published":
        raise InputError(f"--constants: expected 'published', got {constants!r}")
    info = format_table(fit.runs)
    require_capacity(info.drop(index=fit.baseline, errors="ignore"), "checking against the published constants")
    intervals = fit.conf_int() if fit.has_intervals else None  # once: each call summarises every replicate
    rows = []
    for name, r in info.drop(index=fit.baseline, errors="ignore").iterrows():
        lo, hi = intervals.loc[eff_key(name), ["lo", "hi"]] if intervals is not None else (np.nan, np.nan)
        predicted = pair_rho(r["w_gmse"], r["a_gmse"])
        rows.append({"format": name, "w_gmse": r["w_gmse"], "a_gmse": r["a_gmse"], "fitted": fit.eff[name],
                     "fitted_lo": lo, "fitted_hi": hi, "predicted": predicted,
                     "inside": bool(lo <= predicted <= hi) if lo == lo else None})
    return pd.DataFrame(rows)


def constants_verdict(table: pd.DataFrame, level: float) -> str:
    t = table.dropna(subset=["inside"])
    if t.empty:
        return "no bootstrap intervals, so no verdicts (fit with --bootstrap > 0)"
    return (f"{int(t['inside'].sum())} of {len(t)} formats' rho(GMSE) at the published constants falls inside the "
            f"fitted {level:.0%} interval of their efficiency")
