"""Laws whose efficiencies come from a formula instead of one free number per format, fitted jointly with the
law's constants and started from the decoupled solution: the unified law ([U], eff = rho(GMSE_w) rho(GMSE_a)),
Kumar et al.'s precision law (bits), and Frantar et al.'s sparsity law."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import optimize

from capscale.capacity import InputError, is_uncompressed, parse
from capscale.capacity.rho import RHO_C, RHO_F, RHO_L, quarter_log, rho_of_quarter_log

from .laws import DecoupledLaw, ScalingLaw
from .runs import check_identifiable, format_table, require_capacity
from .solver import huber_total, log_e_floor, logsumexp_terms, single_threaded_blas


def format_arrays(info: pd.DataFrame) -> dict:
    """What the formula laws read of formats (rows of `format_table`, or run rows), as arrays."""
    out = {f"{side}_compressed": ~info[f"{side}_format"].map(is_uncompressed).to_numpy(bool) for side in "wa"}
    out |= {f"{side}_quarter_log": quarter_log(info[f"{side}_gmse"].to_numpy(float)) for side in "wa"}
    return out | {c: info[c].to_numpy(float) for c in ("w_gmse", "a_gmse", "w_bits", "a_bits")}


class _FormulaLaw(ScalingLaw):
    """A law whose efficiencies come from a formula with a few constants, fitted jointly with A..beta."""

    constant_names: tuple = ()
    constant_bounds: tuple = ()

    def constant_starts(self, decoupled: DecoupledLaw) -> list:
        raise NotImplementedError

    def formula(self, constants, formats: dict) -> np.ndarray:
        """Efficiencies of formats given as arrays (`format_arrays`)."""
        raise NotImplementedError

    def require(self, info: pd.DataFrame) -> None:
        """What the formula needs of every format (its GMSE by default), with the formats that lack it named."""
        require_capacity(info, f"the {self.name} law")

    def efficiency(self, label, row=None):
        if label in self.eff_:
            return self.eff_[label]
        return float(self.formula([self.params_[c] for c in self.constant_names], format_arrays(pd.DataFrame([row])))[0])

    @single_threaded_blas
    def fit(self, runs: pd.DataFrame):
        compressed = set(runs["format"]) - {self.baseline}
        if len(compressed) < len(self.constant_names):
            raise InputError(f"the {self.name} law has {len(self.constant_names)} constants "
                             f"({', '.join(self.constant_names)}) but the runs have {len(compressed)} compressed "
                             f"format(s) besides '{self.baseline}': train more formats")
        info = format_table(runs, f"the {self.name} law")
        self.require(info)
        decoupled = DecoupledLaw(self.baseline, self.delta).fit(runs)
        fi, log_n, log_d, log_l = self._prepare(runs)
        formats = format_arrays(info.loc[self.formats_])
        p = decoupled.params_
        mean_n, mean_d = log_n.mean(), log_d.mean()  # centred, as in the decoupled fit
        log_n, log_d = log_n - mean_n, log_d - mean_d
        core0 = [np.log(p["A"]) - p["alpha"] * mean_n, np.log(p["B"]) - p["beta"] * mean_d, np.log(p["E"]), p["alpha"],
                 p["beta"]]
        core_bounds = [(None, None)] * 2 + [(log_e_floor(np.exp(log_l)), None)] + [(1e-3, 5.0)] * 2

        def objective(theta):
            la, lb, le, alpha, beta = theta[:5]
            eff = self.formula(theta[5:], formats)
            if np.any(~np.isfinite(eff)) or np.any(eff <= 0):
                return 1e6
            pred, _ = logsumexp_terms(la - alpha * (log_n + np.log(eff[fi])), lb - beta * log_d,
                                  np.full_like(log_n, le))
            return huber_total(pred - log_l, self.delta)

        best = None
        for start in self.constant_starts(decoupled):
            res = optimize.minimize(objective, np.array(core0 + list(start)), method="L-BFGS-B",
                                    bounds=core_bounds + list(self.constant_bounds),
                                    options={"maxiter": 5000, "ftol": 1e-14, "gtol": 1e-10})
            if best is None or res.fun < best.fun:
                best = res
        la, lb, le, alpha, beta = best.x[:5]
        la, lb = la + alpha * mean_n, lb + beta * mean_d
        self.params_ = {"A": float(np.exp(la)), "B": float(np.exp(lb)), "E": float(np.exp(le)),
                        "alpha": float(alpha), "beta": float(beta),
                        **{c: float(v) for c, v in zip(self.constant_names, best.x[5:])}}
        self.eff_ = dict(zip(self.formats_, map(float, self.formula(best.x[5:], formats))))
        return self._finish(runs, best.fun)


class UnifiedLaw(_FormulaLaw):
    """eff = rho(GMSE_w) rho(GMSE_a), rho = L tanh(F log_1/4 GMSE)^C; uncompressed parts count 1 ([U])."""

    name = "unified"
    constant_names = ("L", "F", "C")
    constant_bounds = ((0.05, 5.0), (0.01, 5.0), (0.05, 10.0))

    def formula(self, c, formats):
        part = lambda side: np.where(formats[f"{side}_compressed"],  # noqa: E731
                                     rho_of_quarter_log(formats[f"{side}_quarter_log"], *c), 1.0)
        return part("w") * part("a")

    def constant_starts(self, decoupled):
        return [(RHO_L, RHO_F, RHO_C), (0.9, 0.6, 1.0), (1.0, 0.25, 2.0)]


class KumarLaw(_FormulaLaw):
    """Kumar et al.'s precision law: eff = (1 - exp(-P_w / g_w)) (1 - exp(-P_a / g_a)), P = bits per value
    (a run table's w_bits/a_bits or `bits` columns, else the specs')."""

    name = "kumar"
    constant_names = ("g_w", "g_a")
    constant_bounds = ((0.05, 20.0), (0.05, 20.0))

    def formula(self, c, formats):
        return (1 - np.exp(-formats["w_bits"] / c[0])) * (1 - np.exp(-formats["a_bits"] / c[1]))

    def constant_starts(self, decoupled):
        return [(2.6745, 2.2102), (1.0, 1.0), (5.0, 5.0)]

    def require(self, info):
        unknown = info[info["w_bits"].isna() | info["a_bits"].isna()]
        if len(unknown):
            raise InputError(f"the kumar law needs each format's bits per value, unknown for {list(unknown.index)}: "
                             "give numeric bits (or w_bits/a_bits) columns, or w_format/a_format specs capscale "
                             "can parse")


def sparsity_of(spec) -> float | None:
    """Fraction of zeros of a pure-sparsity spec (0 for uncompressed); None for anything else."""
    if is_uncompressed(spec):
        return 0.0
    parts = parse(spec).parts
    if len(parts) != 1:
        return None
    part = parts[0]
    if part.name == "sparse":
        return float(part.params["fraction"])
    return 1 - part.n / part.m if hasattr(part, "m") else None


class FrantarLaw(ScalingLaw):
    """Frantar et al.'s sparsity law on the pure-sparsity and dense runs:
    loss = (a_S (1 - S)^b_S + c_S) N_nz^-b_N + (a_D / D)^b_D + c, N_nz = N (1 - S)."""

    name = "frantar"
    formula_text = "loss = (a_S (1-S)^b_S + c_S) (N (1-S))^-b_N + (a_D / D)^b_D + c"
    names = ("a_S", "b_S", "c_S", "b_N", "a_D", "b_D", "c")

    def _sparse_rows(self, runs):
        if "w_format" not in runs or "a_format" not in runs:
            raise InputError("the frantar law needs each run's weight sparsity: w_format/a_format spec columns "
                             "(sparse(f) or N:M weights), absent from this label-only table")
        s = runs["w_format"].map(sparsity_of)
        keep = s.notna() & runs["a_format"].isna()
        if keep.sum() < 4:
            raise InputError("the Frantar law needs dense and pure-sparsity runs (sparse(f) or N:M weights)")
        return runs[keep], s[keep].to_numpy(float)

    @single_threaded_blas
    def fit(self, runs):
        runs, s = self._sparse_rows(runs)
        check_identifiable(runs)
        self.formats_ = [self.baseline] + sorted(set(runs["format"]) - {self.baseline})
        n, d, log_l = runs["params"].to_numpy(float), runs["tokens"].to_numpy(float), np.log(runs["loss"].to_numpy(float))
        decoupled = DecoupledLaw(self.baseline, self.delta).fit(runs)
        p = decoupled.params_

        def log_pred(t):
            a_s, b_s, c_s, b_n, a_d, b_d, c = np.exp(t[0]), t[1], np.exp(t[2]), t[3], np.exp(t[4]), t[5], np.exp(t[6])
            return np.log((a_s * (1 - s) ** b_s + c_s) * (n * (1 - s)) ** -b_n + (a_d / d) ** b_d + c)

        best = None
        for split in (0.5, 0.9, 0.1):
            t0 = [np.log(split * p["A"]), 1.0, np.log((1 - split) * p["A"]), p["alpha"],
                  np.log(p["B"]) / p["beta"], p["beta"], np.log(p["E"])]
            res = optimize.minimize(lambda t: huber_total(log_pred(t) - log_l, self.delta), t0, method="L-BFGS-B",
                                    bounds=[(None, None), (-5, 10), (None, None), (1e-3, 5), (None, None), (1e-3, 5),
                                            (None, None)], options={"maxiter": 5000, "ftol": 1e-14})
            if best is None or res.fun < best.fun:
                best = res
        t = best.x
        self.params_ = dict(zip(self.names, [np.exp(t[0]), t[1], np.exp(t[2]), t[3], np.exp(t[4]), t[5], np.exp(t[6])]))
        self.params_ = {k: float(v) for k, v in self.params_.items()}
        by_format = dict(zip(runs["format"], s))
        q = self.params_
        coef = lambda sp: q["a_S"] * (1 - sp) ** q["b_S"] + q["c_S"]  # noqa: E731
        self.eff_ = {f: float((1 - sp) * (coef(sp) / coef(0.0)) ** (-1 / q["b_N"])) for f, sp in by_format.items()}
        return self._finish(runs, best.fun)

    def predict(self, runs):
        q, s = self.params_, runs["w_format"].map(sparsity_of).to_numpy(float)
        n, d = runs["params"].to_numpy(float), runs["tokens"].to_numpy(float)
        return (q["a_S"] * (1 - s) ** q["b_S"] + q["c_S"]) * (n * (1 - s)) ** -q["b_N"] + (q["a_D"] / d) ** q["b_D"] + q["c"]
