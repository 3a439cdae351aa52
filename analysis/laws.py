"""Scaling laws with a format-efficiency term, fitted robustly (scikit-learn style estimators).

    loss = A (N eff_f)^-alpha + B D^-beta + E

fitted in log space, log L = logsumexp(a_f - alpha log N, b - beta log D, e), minimising the SUM of
Huber(delta) over log residuals. The decoupled law has one eff per format (baseline fixed at 1): for
fixed (alpha, beta) it is linear in (E, A_f = A eff_f^-alpha, B), so a weighted non-negative least
squares solves that part exactly on a 2-D grid of exponents (variable projection), and the best grid
points are polished jointly with L-BFGS and the analytic gradient. The other laws replace the free
eff_f by a formula and start from the decoupled solution (`formula_laws.py`); the drift laws, in `drift.py`, let
it change with tokens per parameter. `make_law` finds each by its name. The shared machinery is in `solver.py`.
"""
from __future__ import annotations

import inspect

import numpy as np
import pandas as pd
from scipy import optimize, special

from capscale.capacity import BASELINE, InputError
from capscale.capacity.runtable import NO_BACKWARD, RunTableError

from .names import LAW_NAMES, eff_d_key, eff_key
from .runs import check_identifiable, run_sides
from .solver import (EXPONENT_GRID, GRID_CHUNK_BYTES, POLISH_STARTS, ROUGH_TOLERANCE, exponent_at_edge, huber_total,
                     log_e_floor, logsumexp_terms, nonnegative_least_squares, single_threaded_blas)

E_AT_BOUND = 0.01  # a fitted E below this fraction of the smallest loss is reported as at its bound 0
L_PLAUSIBLE = 1.2  # rho's limit L at GMSE -> 0 above this is flagged


def law_loss(p, n, d, eff=1.0):
    """loss = A (N eff)^-alpha + B D^-beta + E, for constants `p` from a fit or a bootstrap replicate."""
    return p["A"] * (n * eff) ** -p["alpha"] + p["B"] * d ** -p["beta"] + p["E"]

class ScalingLaw:
    """Common machinery: data arrays, the Huber objective, prediction, summaries."""

    name = "base"
    formula_text = "loss = A (N eff)^-alpha + B D^-beta + E"

    def __init__(self, baseline: str = BASELINE, delta: float = 1e-3):
        self.baseline, self.delta = baseline, delta

    def get_params(self) -> dict:
        """The constructor's parameters and their values, read from `__init__`'s signature (scikit-learn's
        contract: each is stored under its own name), so a refit (`clone`, the bootstrap) cannot drop one."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        return {n: getattr(self, n) for n in names}

    def set_params(self, **params) -> "ScalingLaw":
        known = self.get_params()
        if unknown := set(params) - set(known):
            raise InputError(f"{type(self).__name__}: unknown parameter(s) {sorted(unknown)}; known: {sorted(known)}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def clone(self):
        return type(self)(**self.get_params())

    def bootstrap_params(self) -> dict:
        """The settings a bootstrap refit uses (a law that chooses something on the full table holds it here)."""
        return self.get_params()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    def _prepare(self, runs: pd.DataFrame, labels: pd.Series | None = None):
        """(format index, log N, log D, log loss) of the runs; `labels`: the format of each run (default: its
        `format` column), the baseline first in `formats_`."""
        check_identifiable(runs)
        labels = runs["format"] if labels is None else labels
        self.formats_ = [self.baseline] + sorted(set(labels) - {self.baseline})
        self._index = {f: i for i, f in enumerate(self.formats_)}
        fi = labels.map(self._index).to_numpy()
        return fi, np.log(runs["params"].to_numpy(float)), np.log(runs["tokens"].to_numpy(float)), \
            np.log(runs["loss"].to_numpy(float))

    def _finish(self, runs, objective):
        self.objective_ = float(objective)
        self.n_runs_ = len(runs)
        pred, loss = self.predict(runs), runs["loss"].to_numpy(float)
        self.residuals_ = np.log(pred) - np.log(loss)
        self.rmse_log_ = float(np.sqrt(np.mean(self.residuals_ ** 2)))
        self.rmse_loss_ = float(np.sqrt(np.mean((pred - loss) ** 2)))
        self.warnings_ = self._weak_estimates(loss.min(), runs["params"].min(), runs["tokens"].min())
        return self

    def _weak_estimates(self, min_loss: float, min_n: float, min_d: float) -> list[str]:
        """Estimates the runs do not pin down: E at its bound 0, exponents at the edge of what was searched, a
        term that vanished (losses that do not fall with N or with D: rising or flat runs)."""
        out = []
        p = self.params_
        for term, size, what in (("A", min_n, "model size N"), ("B", min_d, "tokens D")):
            exponent = p.get("alpha" if term == "A" else "beta")
            if term in p and exponent is not None and p[term] * size ** -exponent < 1e-3 * min_loss:
                out.append(f"the {what} term vanished ({term} = {p[term]:.3g}): the losses do not fall with "
                           f"{what.split()[-1]}, so this fit explains nothing by it")
        if "E" in self.params_ and self.params_["E"] < E_AT_BOUND * min_loss and getattr(self, "fix_E", None) is None:
            out.append(f"E = {self.params_['E']:.3g} is at its lower bound 0: the runs do not identify the irreducible "
                       "loss (more tokens per parameter, or --fix-E)")
        if self.params_.get("L", 0) > L_PLAUSIBLE:
            out.append(f"L = {self.params_['L']:.3g} is above its plausible range (<= {L_PLAUSIBLE}): capacity above 1 "
                       "at GMSE 0")
        for name in ("alpha", "beta"):
            if name in self.params_ and exponent_at_edge(self.params_[name]):
                out.append(f"{name} = {self.params_[name]:.3g} is at the edge of the range searched "
                           f"[{EXPONENT_GRID[0]:g}, {EXPONENT_GRID[-1]:g}]: not identified by these runs")
        return out

    def efficiency(self, label: str, row=None) -> float:
        if label not in self.eff_:
            raise InputError(f"format '{label}' was not in the fitted runs; the {self.name} law cannot predict it")
        return self.eff_[label]

    def predict(self, runs: pd.DataFrame) -> np.ndarray:
        """Predicted loss for rows with params, tokens and format (a label this fit knows, or for formula
        laws any row with w_format/a_format/w_gmse/a_gmse)."""
        eff = runs["format"].map(self.eff_).to_numpy(float)
        for i in np.flatnonzero(np.isnan(eff)):
            eff[i] = self.efficiency(runs["format"].iloc[i], runs.iloc[i])
        return law_loss(self.params_, runs["params"].to_numpy(float), runs["tokens"].to_numpy(float), eff)

    def values(self) -> dict:
        """Every fitted number, flat: parameters and eff[label]."""
        return {**self.params_, **{eff_key(k): v for k, v in self.eff_.items()}}


class DecoupledLaw(ScalingLaw):
    """One efficiency per format ([C]'s decoupled law). `fix_E` holds the irreducible loss at a given value
    (e.g. from a larger study) where the data cannot identify it; the profile of the objective over E shows when.
    `fix_E=0` fits a pure power law (E held at the search floor), for runs whose profile is flat down to 0.

    Runs whose backward pass takes formats (`g_format`, ...; labels `W/A | bwd G`) get the law with a data
    efficiency per backward configuration, loss = A (N effN_f)^-alpha + B (D effD_g)^-beta + E: one effN per
    forward pair (`eff_`), one effD per backward configuration (`eff_d_`, exact gradients 1). For fixed exponents
    it is still linear in (A_f, B_g, E), so the same exact inner solve applies. Without backward formats it is
    the decoupled law exactly."""

    name = "decoupled"

    def __init__(self, baseline: str = BASELINE, delta: float = 1e-3, fix_E: float | None = None):
        super().__init__(baseline, delta)
        self.fix_E = fix_E

    def _prepare(self, runs: pd.DataFrame):
        """The base arrays with the forward pair as the format; the backward configurations in `backwards_`
        (exact gradients first) and each run's index into them in `_gi`."""
        forward, backward = run_sides(runs)
        arrays = super()._prepare(runs, forward)
        self.backwards_ = sorted(set(backward), key=lambda g: (g != NO_BACKWARD, g))
        if len(self.backwards_) > 1 and not runs.attrs.get("bootstrap_resample"):  # as check_identifiable: a resample
            ratios = (runs["tokens"] / runs["params"]).round(6).groupby(backward.to_numpy()).nunique()
            thin = sorted(ratios[ratios < 2].index)
            if thin:  # else D = r N within the configuration: its effD trades off against the N term
                raise RunTableError(f"{runs.attrs.get('source', '')}: backward configuration(s) {thin} were trained "
                                    "at one token budget per parameter: their data efficiency is not identified; "
                                    "train each at several token budgets")
        self._gi = backward.map({g: i for i, g in enumerate(self.backwards_)}).to_numpy()
        return arrays

    @single_threaded_blas
    def fit(self, runs: pd.DataFrame, start: np.ndarray | None = None):
        """Fit by variable projection: an exact linear solve on a grid of exponents, then L-BFGS from the best
        points. `start` (a fitted law's `theta_`, for bootstrap refits next to it) replaces the grid by one
        L-BFGS from there; the grid is still searched if that does not converge or leaves the searched range."""
        fi, log_n, log_d, log_l = self._prepare(runs)
        k, m = len(self.formats_), len(self.backwards_)
        loss = np.exp(log_l)
        fixed_e = 0.0 if self.fix_E is None else float(self.fix_E)
        if self.fix_E is not None and not 0 <= fixed_e < loss.min():
            raise InputError(f"fix_E = {self.fix_E} must be at least 0 and below every loss (min {loss.min():.4g})")
        if self.fix_E is not None and fixed_e == 0:  # a pure power law: E held at the search floor (no prediction moves)
            fixed_e = float(np.exp(log_e_floor(loss)))
        free = (None, None)
        e_range = (log_e_floor(loss), None) if self.fix_E is None else (np.log(fixed_e),) * 2
        bounds = [free] * (k + m) + [e_range] + [free] * 2
        # L-BFGS runs in centred coordinates (log A_f and log B_g at the mean log N and log D): uncentred, each
        # log A_f moves with alpha times log N ~ 20, a ridge that took L-BFGS over a thousand steps to follow.
        centre = np.zeros(k + m + 3)
        centre[:k], centre[k:k + m] = log_n.mean(), log_d.mean()
        shift = lambda theta, sign: theta + sign * centre * np.r_[np.full(k, theta[-2]), np.full(m, theta[-1]), 0, 0, 0]  # noqa: E731

        def polish(theta0, tolerance=1e-15):
            res = optimize.minimize(self._objective, shift(theta0, -1), jac=True, method="L-BFGS-B", bounds=bounds,
                                    args=(fi, log_n - log_n.mean(), log_d - log_d.mean(), log_l, k),
                                    options={"maxiter": 20000, "ftol": tolerance, "gtol": tolerance * 1e3})
            res.x = shift(res.x, +1)
            return res
        if start is not None and len(start) == k + m + 3:
            warm = polish(start)
            if warm.success and all(EXPONENT_GRID[0] < v < EXPONENT_GRID[-1] for v in warm.x[-2:]):
                return self._set(runs, warm)
        # Every start is followed into its basin roughly; only the best basin is then polished to full precision.
        rough = [polish(np.concatenate([np.log(np.maximum(coef[:k + m + 1], 1e-12)), [alpha, beta]]), ROUGH_TOLERANCE)
                 for _, alpha, beta, coef in self._candidates(fi, log_n, log_d, log_l, k, loss, fixed_e, EXPONENT_GRID)]
        return self._set(runs, polish(min(rough, key=lambda r: r.fun).x))

    def _candidates(self, fi, log_n, log_d, log_l, k, loss, fixed_e, grid) -> list:
        """The exact nonnegative linear solve of (A_f, B, E) at each (alpha, beta) of the grid: returned, best
        first, are the POLISH_STARTS best points and every local minimum of the grid (a basin the best points,
        often neighbours, may all miss). The grid's least-squares proxy is not the Huber objective, so the best
        points are kept even where they are not grid minima."""
        alpha, beta = (g.ravel() for g in np.meshgrid(grid, grid, indexing="ij"))
        rows, m, gi = np.arange(len(log_n)), len(self.backwards_), self._gi
        width = k + m + (self.fix_E is None)  # columns A_f, B_g (, E)
        chunk = max(1, GRID_CHUNK_BYTES // (8 * len(log_n) * width))  # grid points per pass: memory ~linear in runs
        objective, coef = np.empty(len(alpha)), np.empty((len(alpha), width))
        for lo in range(0, len(alpha), chunk):
            a, b = alpha[lo:lo + chunk], beta[lo:lo + chunk]
            design = np.zeros((len(a), len(log_n), width))
            design[:, rows, fi] = np.exp(-np.outer(a, log_n)) / loss
            design[:, rows, k + gi] = np.exp(-np.outer(b, log_d)) / loss
            if self.fix_E is None:
                design[:, :, k + m] = 1 / loss
            part = nonnegative_least_squares(design, (loss - fixed_e) / loss)
            pred = (design @ part[..., None])[..., 0] * loss + fixed_e
            with np.errstate(invalid="ignore", divide="ignore"):
                value = special.huber(self.delta, np.log(pred) - log_l).sum(axis=1)
            objective[lo:lo + chunk] = np.where(np.all(pred > 0, axis=1), value, np.inf)
            coef[lo:lo + chunk] = part
        objective = objective.reshape(len(grid), len(grid))
        if self.fix_E is not None:
            coef = np.column_stack([coef, np.full(len(coef), fixed_e)])
        padded = np.pad(objective, 1, constant_values=np.inf)
        neighbours = np.min([padded[1 + di:len(grid) + 1 + di, 1 + dj:len(grid) + 1 + dj]
                             for di in (-1, 0, 1) for dj in (-1, 0, 1) if di or dj], axis=0)
        order = np.argsort(objective, axis=None)
        best = set(order[:POLISH_STARTS][np.isfinite(objective.ravel()[order[:POLISH_STARTS]])])
        minima = set(np.flatnonzero(np.isfinite(objective) & (objective <= neighbours)))
        return [(objective.flat[g], alpha[g], beta[g], coef[g]) for g in sorted(best | minima, key=objective.flat.__getitem__)]

    def _size(self) -> int:
        """How many constants this law's optimiser vector `theta_` holds on the prepared runs."""
        return len(self.formats_) + len(self.backwards_) + 3

    def _prepare_extra(self, runs: pd.DataFrame) -> None:
        """What a law beyond the decoupled one reads of the runs besides `_prepare`'s arrays (nothing here)."""

    def restore(self, theta, runs: pd.DataFrame) -> "DecoupledLaw":
        """This law as fitted at the optimum `theta` (its `theta_`: a saved fit's), its residuals and objective
        recomputed on `runs`."""
        self._prepare(runs)
        self._prepare_extra(runs)
        theta = np.asarray(theta, float)
        if theta.shape != (self._size(),) or not np.all(np.isfinite(theta)):
            raise InputError(f"a {self.name} fit of {len(self.formats_)} formats has {self._size()} finite constants; "
                             f"got {theta.size}")
        with np.errstate(over="ignore"):
            self._set(runs, optimize.OptimizeResult(x=theta, fun=np.nan))
        if not (self.params_["alpha"] > 0 and self.params_["beta"] > 0):
            raise InputError("its exponents alpha and beta must be positive")
        if not np.all(np.isfinite(self.residuals_)):
            raise InputError("its constants do not predict a finite loss for every run")
        self.objective_ = huber_total(self.residuals_, self.delta)
        return self

    def _set(self, runs, res):
        self._set_core(res.x)
        return self._finish(runs, res.fun)

    def _set_core(self, x) -> None:
        """The fitted values from theta = [log A_f (k), log B_g (m), log E, alpha, beta, ...]: what follows beta is a
        subclass's own (the drift law's drifts)."""
        k, m = len(self.formats_), len(self.backwards_)
        self.theta_ = x
        la, lb, le, alpha, beta = x[:k], x[k:k + m], x[k + m], x[k + m + 1], x[k + m + 2]
        self.params_ = {"A": float(np.exp(la[0])), "B": float(np.exp(lb[0])), "E": float(np.exp(le)),
                        "alpha": float(alpha), "beta": float(beta)}
        self.eff_ = {f: float(np.exp(-(la[i] - la[0]) / alpha)) for i, f in enumerate(self.formats_)}
        self.eff_d_ = {g: float(np.exp(-(lb[j] - lb[0]) / beta)) for j, g in enumerate(self.backwards_)}

    def _objective(self, theta, fi, log_n, log_d, log_l, k):
        m, gi = len(self.backwards_), self._gi
        la, lb, le, alpha, beta = theta[:k], theta[k:k + m], theta[k + m], theta[-2], theta[-1]
        t1, t2 = la[fi] - alpha * log_n, lb[gi] - beta * log_d
        pred, (w1, w2, w3) = logsumexp_terms(t1, t2, np.full_like(t1, le))
        r = pred - log_l
        g = np.clip(r, -self.delta, self.delta)
        grad = np.concatenate([np.bincount(fi, g * w1, minlength=k), np.bincount(gi, g * w2, minlength=m),
                               [np.sum(g * w3), np.sum(g * w1 * -log_n), np.sum(g * w2 * -log_d)]])
        return huber_total(r, self.delta), grad

    def predict(self, runs: pd.DataFrame) -> np.ndarray:
        """Predicted loss of rows with params, tokens and a format label this fit knows (forward pair, and backward
        configuration where the fit has several)."""
        forward, backward = run_sides(runs)
        for label in set(forward) - set(self.eff_):
            self.efficiency(label)  # the error naming it
        unknown = set(backward) - set(self.eff_d_)
        if unknown:
            raise InputError(f"backward configuration(s) {sorted(unknown)} were not in the fitted runs")
        eff_d = backward.map(self.eff_d_).to_numpy(float)
        return law_loss(self.params_, runs["params"].to_numpy(float), runs["tokens"].to_numpy(float) * eff_d,
                        forward.map(self.eff_).to_numpy(float))

    def _eff_d_values(self, values, backward: pd.Series) -> np.ndarray:
        """Each run's data efficiency in `values` (exact gradients, or a table with one configuration: 1)."""
        if len(self.eff_d_) <= 1:
            return np.ones(len(backward))
        return np.array([values.get(eff_d_key(g), np.nan) for g in backward], float)

    def predict_values(self, values, runs: pd.DataFrame, eff_scale=1.0) -> np.ndarray:
        """Predicted loss under any set of this law's values (the fit's, or a bootstrap replicate's: `values()`'s
        keys); NaN for a format or backward configuration the values lack."""
        forward, backward = run_sides(runs)
        eff = np.array([values.get(eff_key(f), np.nan) for f in forward], float) * eff_scale
        return law_loss(values, runs["params"].to_numpy(float),
                        runs["tokens"].to_numpy(float) * self._eff_d_values(values, backward), eff)

    def values(self) -> dict:
        """Every fitted number, flat: parameters, eff[label] and, with backward formats, effD[label]."""
        extra = {eff_d_key(g): v for g, v in self.eff_d_.items()} if len(self.eff_d_) > 1 else {}
        return {**super().values(), **extra}


def make_law(name: str, **kwargs) -> ScalingLaw:
    """A law by its name (`names.LAW_NAMES`); each class registers under its own `law` attribute."""
    from .drift import DriftLaw, QATErrorLaw
    from .formula_laws import FrantarLaw, KumarLaw, UnifiedLaw
    laws = {cls.name: cls for cls in (DecoupledLaw, UnifiedLaw, KumarLaw, FrantarLaw, DriftLaw, QATErrorLaw)}
    assert tuple(laws) == LAW_NAMES
    if name not in laws:
        raise InputError(f"unknown law '{name}'; choose from {', '.join(laws)}")
    return laws[name](**kwargs)
