"""Laws in which a format's cost depends on tokens per parameter: where the efficiency is not a constant.

Under the decoupled law a format's loss gap to the baseline at a fixed N does not depend on D. Published runs at
high tokens per parameter (Quartet's MXFP4 runs; Chen et al. 2025, arXiv 2505.14302; Kumar et al. 2024, arXiv
2411.04330) show the gap growing with D. Two published forms, each fitted like the decoupled law (Huber on log
loss, L-BFGS with analytic gradients, in centred coordinates, started from the decoupled optimum):

- `drift`: the efficiency drifts with r = D/N,
      loss = A (N eff_f(r))^-alpha + B (D effD_g)^-beta + E,  log eff_f(r) = log eff_f + drift_f log2(clip(r) / r0)
  clip(r) = r held within [r_min, r_sat]: r_min the smallest fitted tokens per parameter (below the runs the drift is
  not extrapolated: the efficiency is held at its value there), r_sat the saturation;
  one drift per format (per doubling of D/N, in log efficiency; baseline 0) and, where the runs ask for it, one
  shared saturation r_sat beyond which the efficiency stops falling (chosen by BIC over doublings of the fitted
  ratios, `saturation="auto"`; both public run sets flatten beyond ~400-800 tokens per parameter). eff_f is the
  efficiency at r0 = `reference_ratio` (100 tokens per parameter), so it reads like the decoupled law's.
- `qat-error`: Chen et al.'s additive QAT error on top of the baseline law,
      loss = A N^-alpha + B (D effD_g)^-beta + E + k_f D^gD / N^gN
  one k per format (baseline 0), the exponents gD and gN shared: with two to six token budgets per format, per-format
  exponents are not identified (each would trade off against its k). Its `eff_` is the implied efficiency (the
  multiplier on N giving the same loss) at `reference_ratio` tokens per parameter and the geometric-mean model size.

Both predict a gap that grows with D at fixed N; neither can be told from the decoupled law on runs at one token
budget per size. `capscale.analysis.constancy` tests which a table needs.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import optimize

from capscale.capacity import BASELINE, InputError

from .laws import DecoupledLaw
from .solver import huber_total, log_e_floor, logsumexp_terms, single_threaded_blas
from .runs import run_sides

REFERENCE_RATIO = 100.0  # tokens per parameter at which the token-dependent laws report eff[f]


def drift_key(label: str) -> str:
    """The name of a format's drift among a fit's values: `drift[int4]` (change of log eff per doubling of D/N)."""
    return f"drift[{label}]"


def qat_key(label: str) -> str:
    return f"k[{label}]"


def _saturation_candidates(ratios: np.ndarray) -> list:
    """inf (no saturation) and each doubling of the fitted tokens per parameter from the third smallest to below
    the largest: a drift needs two ratios below its saturation, and saturating at the largest changes nothing."""
    levels = np.unique(np.round(np.log2(ratios)))
    return [np.inf] + [float(2.0 ** v) for v in levels[2:-1]]


def _bic(law, n: int) -> float:
    """BIC from the log residuals' sum of squares (Gaussian approximation), counting every constant."""
    ssr = float(np.sum(law.residuals_ ** 2))
    return n * np.log(max(ssr, 1e-300) / n) + len(law.theta_) * np.log(n) + np.isfinite(law.saturation_) * np.log(n)


class _TokenLaw(DecoupledLaw):
    """Shared machinery: the decoupled law's arrays and start, extra constants polished jointly, predictions from
    any set of values (a fit's or a bootstrap replicate's), efficiencies at a reference (N, D)."""

    extra_bounds: list = []

    def bootstrap_params(self) -> dict:
        """The settings a bootstrap refit uses: the fit's own, with choices made on the full table held."""
        return self.get_params()

    def _check_tokens(self, runs: pd.DataFrame) -> None:
        ratios = (runs["tokens"] / runs["params"]).round(6)
        if ratios.nunique() < 3:
            raise InputError(f"the {self.name} law needs runs at 3 or more token budgets per parameter to tell a "
                             f"token-dependent cost from the D term; these have {ratios.nunique()}")

    def _polish(self, theta0, arrays, bounds):
        res = optimize.minimize(self._objective, theta0, jac=True, method="L-BFGS-B", bounds=bounds, args=arrays,
                                options={"maxiter": 20000, "ftol": 1e-15, "gtol": 1e-12})
        return res

    def _core_bounds(self, loss, k_a: int) -> list:
        fixed = None if self.fix_E is None else (np.log(max(self.fix_E, np.exp(log_e_floor(loss)))),) * 2
        e_range = (log_e_floor(loss), None) if fixed is None else fixed
        return [(None, None)] * (k_a + len(self.backwards_)) + [e_range] + [(1e-3, 5.0)] * 2


class DriftLaw(_TokenLaw):
    name = "drift"
    formula_text = ("loss = A (N eff_f(r))^-alpha + B (D effD)^-beta + E, log eff_f(r) = log eff_f + drift_f "
                    "log2(min(r, r_sat) / r0), r = D/N")

    def __init__(self, baseline: str = BASELINE, delta: float = 1e-3, fix_E: float | None = None,
                 saturation: "float | str | None" = "auto", reference_ratio: float = REFERENCE_RATIO,
                 drift_from: float | None = None):
        super().__init__(baseline, delta, fix_E)
        self.saturation, self.reference_ratio, self.drift_from = saturation, reference_ratio, drift_from

    def bootstrap_params(self) -> dict:
        return {**self.get_params(), "saturation": None if np.isinf(self.saturation_) else self.saturation_,
                "drift_from": self.drift_from_}

    def _size(self) -> int:
        return 2 * len(self.formats_) - 1 + len(self.backwards_) + 3

    def _prepare_extra(self, runs):
        ratio = runs["tokens"].to_numpy(float) / runs["params"].to_numpy(float)
        self._log2_ratio = np.log2(ratio)
        self.drift_from_ = float(self.drift_from or ratio.min())

    def _s(self, log2_ratio, saturation):
        return np.clip(log2_ratio, np.log2(self.drift_from_), np.log2(saturation)) - np.log2(self.reference_ratio)

    def _objective(self, theta, fi, log_n, log_d, log_l, k, s):
        m, gi = len(self.backwards_), self._gi
        la, lb, le, alpha, beta = theta[:k], theta[k:k + m], theta[k + m], theta[k + m + 1], theta[k + m + 2]
        c = np.r_[0.0, theta[k + m + 3:]]
        t1 = la[fi] - alpha * log_n + c[fi] * s
        t2 = lb[gi] - beta * log_d
        pred, (w1, w2, w3) = logsumexp_terms(t1, t2, np.full_like(t1, le))
        r = pred - log_l
        g = np.clip(r, -self.delta, self.delta)
        grad = np.concatenate([np.bincount(fi, g * w1, minlength=k), np.bincount(gi, g * w2, minlength=m),
                               [np.sum(g * w3), np.sum(g * w1 * -log_n), np.sum(g * w2 * -log_d)],
                               np.bincount(fi, g * w1 * s, minlength=k)[1:]])
        return huber_total(r, self.delta), grad

    @single_threaded_blas
    def fit(self, runs: pd.DataFrame, start=None):
        self._check_tokens(runs)
        if self.saturation not in (None, "auto") and not (isinstance(self.saturation, (int, float)) and self.saturation > 0):
            raise InputError(f"saturation: expected 'auto', None or tokens per parameter > 0, got {self.saturation!r}")
        base = DecoupledLaw(self.baseline, self.delta, self.fix_E).fit(runs)
        fi, log_n, log_d, log_l = self._prepare(runs)
        self._prepare_extra(runs)
        k, m = len(self.formats_), len(self.backwards_)
        mean_n, mean_d = log_n.mean(), log_d.mean()
        bounds = self._core_bounds(np.exp(log_l), k) + [(-5.0, 5.0)] * (k - 1)
        theta0 = np.r_[base.theta_, np.zeros(k - 1)]
        if start is not None and len(start) == len(theta0):
            theta0 = np.asarray(start, float)
        if self.saturation == "auto":
            candidates = _saturation_candidates(2.0 ** self._log2_ratio)
        else:
            candidates = [np.inf if self.saturation is None else float(self.saturation)]
        best = None
        for saturation in candidates:
            s = self._s(self._log2_ratio, saturation)
            centred = theta0.copy()
            centred[:k] -= theta0[k + m + 1] * mean_n
            centred[k:k + m] -= theta0[k + m + 2] * mean_d
            res = self._polish(centred, (fi, log_n - mean_n, log_d - mean_d, log_l, k, s), bounds)
            res.x[:k] += res.x[k + m + 1] * mean_n
            res.x[k:k + m] += res.x[k + m + 2] * mean_d
            candidate = self.clone().set_params(saturation=None if np.isinf(saturation) else saturation)
            candidate._prepare(runs)
            candidate._prepare_extra(runs)
            candidate._set(runs, res)
            if best is None or _bic(candidate, len(runs)) < _bic(best, len(runs)):
                best = candidate
        self.__dict__.update({k_: v for k_, v in best.__dict__.items() if k_.endswith("_") or k_.startswith("_")})
        return self

    def _set(self, runs, res):
        k, m = len(self.formats_), len(self.backwards_)
        self.saturation_ = np.inf if self.saturation in (None, "auto") else float(self.saturation)
        self._set_core(res.x)
        if np.isfinite(self.saturation_):
            self.params_["saturation"] = self.saturation_
        alpha = self.params_["alpha"]
        self.drift_ = {f: float(-c / alpha) for f, c in zip(self.formats_, np.r_[0.0, res.x[k + m + 3:]])}
        return self._finish(runs, res.fun)

    def values(self) -> dict:
        return {**super().values(), **{drift_key(f): v for f, v in self.drift_.items() if f != self.baseline}}

    def predict_values(self, values, runs: pd.DataFrame) -> np.ndarray:
        forward, _ = run_sides(runs)
        ratio = runs["tokens"].to_numpy(float) / runs["params"].to_numpy(float)
        s = self._s(np.log2(ratio), values.get("saturation", np.inf))
        drift = np.array([0.0 if f == self.baseline else values.get(drift_key(f), np.nan) for f in forward])
        return super().predict_values(values, runs, eff_scale=np.exp(drift * s))

    def predict(self, runs: pd.DataFrame) -> np.ndarray:
        forward, _ = run_sides(runs)
        for label in set(forward) - set(self.eff_):
            self.efficiency(label)
        return self.predict_values(self.values(), runs)


class QATErrorLaw(_TokenLaw):
    name = "qat-error"
    formula_text = "loss = A N^-alpha + B (D effD)^-beta + E + k_f D^gD / N^gN (Chen et al. 2025)"

    def __init__(self, baseline: str = BASELINE, delta: float = 1e-3, fix_E: float | None = None,
                 reference_ratio: float = REFERENCE_RATIO, reference_params: float | None = None):
        super().__init__(baseline, delta, fix_E)
        self.reference_ratio, self.reference_params = reference_ratio, reference_params

    def bootstrap_params(self) -> dict:
        return {**self.get_params(), "reference_params": self.reference_params_}

    def _size(self) -> int:
        return len(self.formats_) - 1 + 1 + len(self.backwards_) + 3 + 2

    def _prepare_extra(self, runs):
        self.reference_params_ = float(self.reference_params or np.exp(np.log(runs["params"].unique()).mean()))

    # theta: [log A, log B_g (m), log E, alpha, beta, log k_f (k - 1), gD, gN]
    def _objective(self, theta, fi, log_n, log_d, log_l, k, _=None):
        m, gi = len(self.backwards_), self._gi
        la, lb, le, alpha, beta = theta[0], theta[1:1 + m], theta[1 + m], theta[2 + m], theta[3 + m]
        lk, g_d, g_n = theta[4 + m:4 + m + k - 1], theta[-2], theta[-1]
        compressed = fi > 0
        t1 = la - alpha * log_n
        t2 = lb[gi] - beta * log_d
        t4 = np.where(compressed, np.r_[0.0, lk][fi] + g_d * log_d - g_n * log_n, -np.inf)
        pred, (w1, w2, w3, w4) = logsumexp_terms(t1, t2, np.full_like(t1, le), t4)
        r = pred - log_l
        g = np.clip(r, -self.delta, self.delta)
        grad = np.concatenate([[np.sum(g * w1)], np.bincount(gi, g * w2, minlength=m),
                               [np.sum(g * w3), np.sum(g * w1 * -log_n), np.sum(g * w2 * -log_d)],
                               np.bincount(fi, g * w4, minlength=k)[1:],
                               [np.sum(g * w4 * log_d), np.sum(g * w4 * -log_n)]])
        return huber_total(r, self.delta), grad

    @single_threaded_blas
    def fit(self, runs: pd.DataFrame, start=None):
        self._check_tokens(runs)
        base = DecoupledLaw(self.baseline, self.delta, self.fix_E).fit(runs)
        fi, log_n, log_d, log_l = self._prepare(runs)
        self._prepare_extra(runs)
        k, m = len(self.formats_), len(self.backwards_)
        mean_n, mean_d = log_n.mean(), log_d.mean()
        p = base.params_
        la, lb = base.theta_[0] - p["alpha"] * mean_n, base.theta_[k:k + m] - p["beta"] * mean_d
        bounds = self._core_bounds(np.exp(log_l), 1) + [(None, None)] * (k - 1) + [(-1.0, 2.0), (0.0, 3.0)]
        arrays = (fi, log_n - mean_n, log_d - mean_d, log_l, k)
        starts = []
        if start is not None and len(start) == self._size():
            st = np.asarray(start, float).copy()
            st[0] -= st[2 + m] * mean_n
            st[1:1 + m] -= st[3 + m] * mean_d
            st[4 + m:4 + m + k - 1] += st[-2] * mean_d - st[-1] * mean_n
            starts.append(st)
        # each format's gap at the centre of the runs under the decoupled fit: k_f there, for several exponents
        gap = np.array([np.exp(la) * (base.eff_[f] ** -p["alpha"] - 1) for f in self.formats_[1:]])
        for g_d, g_n in ((0.0, p["alpha"]), (0.2, p["alpha"]), (0.3, 0.3), (0.1, 0.6)):
            starts.append(np.r_[la, lb, np.log(p["E"]), p["alpha"], p["beta"], np.log(np.maximum(gap, 1e-8)), g_d, g_n])
        best = min((self._polish(st, arrays, bounds) for st in starts), key=lambda r: r.fun)
        x = best.x.copy()
        x[0] += x[2 + m] * mean_n
        x[1:1 + m] += x[3 + m] * mean_d
        x[4 + m:4 + m + k - 1] -= x[-2] * mean_d - x[-1] * mean_n
        best.x = x
        return self._set(runs, best)

    def _set(self, runs, res):
        k, m = len(self.formats_), len(self.backwards_)
        x = res.x
        self.theta_ = x
        self.params_ = {"A": float(np.exp(x[0])), "B": float(np.exp(x[1])), "E": float(np.exp(x[1 + m])),
                        "alpha": float(x[2 + m]), "beta": float(x[3 + m]), "gD": float(x[-2]), "gN": float(x[-1])}
        self.k_ = {f: float(np.exp(v)) for f, v in zip(self.formats_[1:], x[4 + m:4 + m + k - 1])}
        self.eff_d_ = {g: float(np.exp(-(x[1 + j] - x[1]) / x[3 + m])) for j, g in enumerate(self.backwards_)}
        n_ref = self.reference_params_
        self.eff_ = {self.baseline: 1.0}
        for f, kf in self.k_.items():
            gap = kf * (n_ref * self.reference_ratio) ** self.params_["gD"] * n_ref ** -self.params_["gN"]
            self.eff_[f] = float((1 + gap / (self.params_["A"] * n_ref ** -self.params_["alpha"])) ** (-1 / self.params_["alpha"]))
        return self._finish(runs, res.fun)

    def values(self) -> dict:
        return {**super().values(), **{qat_key(f): v for f, v in self.k_.items()}}

    def predict_values(self, values, runs: pd.DataFrame) -> np.ndarray:
        forward, backward = run_sides(runs)
        n, d = runs["params"].to_numpy(float), runs["tokens"].to_numpy(float)
        eff_d = self._eff_d_values(values, backward)
        k = np.array([0.0 if f == self.baseline else values.get(qat_key(f), np.nan) for f in forward])
        return (values["A"] * n ** -values["alpha"] + values["B"] * (d * eff_d) ** -values["beta"] + values["E"]
                + k * d ** values["gD"] * n ** -values["gN"])

    def predict(self, runs: pd.DataFrame) -> np.ndarray:
        forward, _ = run_sides(runs)
        for label in set(forward) - set(self.eff_):
            self.efficiency(label)
        return self.predict_values(self.values(), runs)
