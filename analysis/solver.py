"""The fitting machinery the laws share: the exponent grid the decoupled law's variable projection searches, the
batched nonnegative least squares it solves at each grid point, the Huber total and the log-space sum of a law's
terms (with the weights the analytic gradients need), the floor on E, and BLAS held to one thread for many tiny
fits. The laws themselves are in `laws.py` (decoupled), `formula_laws.py` and `drift.py`."""
from __future__ import annotations

import functools

import numpy as np
from scipy import optimize, special
from threadpoolctl import threadpool_limits

EXPONENT_GRID = np.geomspace(0.03, 2.0, 36)
POLISH_STARTS = 4
GRID_CHUNK_BYTES = 64 << 20  # the exponent grid's designs are solved this many bytes at a time (200k runs: ~1 GB peak)
E_SEARCH_FLOOR = 1e-6  # the fit's lower bound on E, relative to the smallest loss: changes no prediction
ROUGH_TOLERANCE = 1e-10  # relative objective change that ends a start's first, rough descent


def exponent_at_edge(values):
    """Whether exponents (alpha, beta) lie at the edge of the range the fit searches: not identified there."""
    values = np.asarray(values, float)
    return (values <= EXPONENT_GRID[0] * 1.05) | (values >= EXPONENT_GRID[-1] * 0.95)


def log_e_floor(loss) -> float:
    """The lower bound on log E in a fit. Without it L-BFGS walks log E towards -inf along the flat ridge where
    the runs do not identify E (thousands of steps)."""
    return float(np.log(E_SEARCH_FLOOR * np.min(loss)))


def single_threaded_blas(fit):
    """Fits solve many tiny problems: threaded BLAS only adds overhead (30x slower with 2 threads here)."""
    @functools.wraps(fit)
    def wrapper(*args, **kwargs):
        with threadpool_limits(limits=1, user_api="blas"):
            return fit(*args, **kwargs)
    return wrapper


def huber_total(r: np.ndarray, delta: float) -> float:
    return float(special.huber(delta, r).sum())


def logsumexp_terms(*terms):
    """log sum exp of the terms of a law in log space, and each term's weight (its share of the sum): the
    prediction and the chain rule's factors in one pass."""
    m = functools.reduce(np.maximum, terms)
    w = [np.exp(t - m) for t in terms]
    s = sum(w)
    return m + np.log(s), tuple(x / s for x in w)


def nonnegative_least_squares(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """min ||X c - y|| subject to c >= 0 for a stack of designs X (g, n, p) sharing y: batched unconstrained
    solves where every coefficient comes out nonnegative, then with the last column (E) at 0 where the KKT
    condition shows that is optimal; only the remaining problems go to scipy's active-set NNLS, one by one."""
    def solve(x):  # normal equations on unit-norm columns (they span ten orders of magnitude)
        xt = x.transpose(0, 2, 1)
        gram = xt @ x
        scale = np.sqrt(np.diagonal(gram, axis1=1, axis2=2))
        gram = gram / (scale[:, :, None] * scale[:, None, :])
        rhs = ((xt @ target) / scale)[..., None]
        try:
            return np.linalg.solve(gram, rhs)[..., 0] / scale
        except np.linalg.LinAlgError:  # a degenerate design somewhere in the stack: the least-squares solution
            return (np.linalg.pinv(gram) @ rhs)[..., 0] / scale

    coef = solve(design)
    pending = np.flatnonzero(np.any(coef < 0, axis=1))
    if len(pending):
        reduced = solve(design[pending, :, :-1])
        residual = target - (design[pending, :, :-1] @ reduced[..., None])[..., 0]
        optimal = np.all(reduced >= 0, axis=1) & (np.sum(design[pending, :, -1] * residual, axis=1) <= 0)
        coef[pending[optimal]] = np.column_stack([reduced[optimal], np.zeros(optimal.sum())])
        for g in pending[~optimal]:
            coef[g] = optimize.nnls(design[g], target)[0]
    return coef
