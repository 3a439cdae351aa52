"""Level sets (the scalar grids of elementwise formats) and their exact Gaussian MSE. ("Grid" elsewhere in
capscale means a capacity grid: a table of efficiencies over format pairs, `analysis/compose.py`.)

Every elementwise format is a sorted set of levels times a scale. For x ~ N(0, 1) the MSE of rounding
to the nearest level has a closed form through the Gaussian partial moments, so the MSE-optimal scale
is a cheap 1-D search instead of a Monte Carlo estimate.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from scipy import special

NF4_CODEBOOK = (-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0)

# (exponent bits, mantissa bits) of the OCP minifloat element types; torch casts the ones it has.
MINIFLOATS = {"e2m1": (2, 1), "e2m3": (2, 3), "e3m2": (3, 2), "e4m3": (4, 3), "e5m2": (5, 2)}
TORCH_FLOAT8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}

# QuEST's RMS rule (the recipe behind the published efficiencies, reference section 5a): int<b> clips at
# c_b x RMS, fp4 scales its e2m1 levels by 0.48707976 x RMS. They are part of the recipe's definition, kept
# as published: they agree with the exact Gaussian optimum (`optimal_scale`) to 3e-5 for b <= 5, 0.4% at 6,
# 0.3% at 7 and 1% at 8 bits (where the MSE is flat: int8's GMSE differs by 0.05%).
QUEST_CLIP = {1: 0.7978845587, 2: 1.4935346200, 3: 2.0510683541, 4: 2.5139305786, 5: 2.9160938835,
              6: 3.2765972826, 7: 3.6010497188, 8: 3.8849386788}
QUEST_FP4_SCALE = 0.48707976


def uniform_levels(bits: int) -> np.ndarray:
    """Symmetric midrise grid with 2^bits levels: +-0.5, +-1.5, ... (no zero level)."""
    half = 2 ** (bits - 1)
    return np.arange(-half, half) + 0.5


E2M1_HALF_ULP = 1 << 21  # half of E2M1's one mantissa bit, in float32's 23: adding it rounds to nearest, ties away
E2M1_KEEP = -(1 << 22)   # 0xFFC00000: sign, exponent and the top mantissa bit of a float32


def round_e2m1(u: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value (0, +-0.5, +-1, +-1.5, +-2, +-3, +-4, +-6) of float32 values, ties away from zero, in one
    new tensor and in-place bit arithmetic: above 1, keep one mantissa bit of the float32 (rounded); below 1 (the
    subnormals, step 0.5), the same on 1 + |u|, then 1 taken off. About 4x faster than a search of the levels."""
    a = u.abs().clamp_(max=6.0)
    small = torch.rsub(a, 1.0).clamp_(0.0, 1.0).ceil_()  # 1 below 1, else 0: cheaper than a bool mask cast to float
    a.add_(small)
    a.view(torch.int32).add_(E2M1_HALF_ULP).bitwise_and_(E2M1_KEEP)
    return a.sub_(small).copysign_(u)


@functools.lru_cache(maxsize=None)
def minifloat_levels(kind: str) -> np.ndarray:
    """All finite values of a minifloat type (OCP conventions: fp4/fp6 have no inf/nan)."""
    if kind in TORCH_FLOAT8:
        codes = torch.arange(256, dtype=torch.uint8).view(TORCH_FLOAT8[kind]).float().numpy()
        return np.unique(codes[np.isfinite(codes)])
    ebits, mbits = MINIFLOATS[kind]
    bias = 2 ** (ebits - 1) - 1
    mant = np.arange(2 ** mbits) / 2 ** mbits
    values = [mant * 2.0 ** (1 - bias)]  # subnormals (exponent field 0)
    values += [(1 + mant) * 2.0 ** (e - bias) for e in range(1, 2 ** ebits)]
    positive = np.concatenate(values)
    return np.unique(np.concatenate([-positive, positive]))


def _partial_moments(a: np.ndarray, b: np.ndarray):
    """Integrals of phi, x phi and x^2 phi over [a, b] for the standard normal."""
    pa, pb = np.exp(-a * a / 2) / np.sqrt(2 * np.pi), np.exp(-b * b / 2) / np.sqrt(2 * np.pi)
    m0 = special.ndtr(b) - special.ndtr(a)
    m1 = pa - pb
    apa = a * pa if np.all(np.isfinite(a)) else np.where(np.isfinite(a), np.nan_to_num(a) * pa, 0.0)
    bpb = b * pb if np.all(np.isfinite(b)) else np.where(np.isfinite(b), np.nan_to_num(b) * pb, 0.0)
    return m0, m1, m0 + apa - bpb


def grid_mse(levels: np.ndarray, scale: float = 1.0) -> float:
    """Exact E[(x - Q(x))^2] for x ~ N(0, 1) rounded to the nearest of scale * levels."""
    lv = np.sort(np.asarray(levels, dtype=np.float64)) * scale
    edges = np.concatenate([[-np.inf], (lv[1:] + lv[:-1]) / 2, [np.inf]])
    m0, m1, m2 = _partial_moments(edges[:-1], edges[1:])
    return float(np.sum(m2 - 2 * lv * m1 + lv * lv * m0))


@functools.lru_cache(maxsize=None)
def _optimal_scale_cached(levels: tuple) -> tuple[float, float]:
    lv = np.asarray(levels)
    top = np.abs(lv).max()
    # Coarse log-spaced scan of the outer level's position (in sigma), then a bounded Brent polish around
    # the best: MSE(scale) of log-spaced (minifloat) grids has many shallow local minima.
    clips = np.geomspace(0.05, 64.0, 700)
    mses = [grid_mse(lv, c / top) for c in clips]
    i = int(np.argmin(mses))
    lo, hi = clips[max(i - 1, 0)], clips[min(i + 1, len(clips) - 1)]
    from scipy import optimize  # loaded on the first optimal-scale search, not with every format
    res = optimize.minimize_scalar(lambda c: grid_mse(lv, c / top), bounds=(lo, hi), method="bounded",
                                   options={"xatol": 1e-10})
    return float(res.x / top), float(res.fun)


def optimal_scale(levels) -> tuple[float, float]:
    """(scale, mse): the scale minimising the exact Gaussian MSE of a grid, and that minimum."""
    return _optimal_scale_cached(tuple(float(v) for v in levels))


@functools.lru_cache(maxsize=None)
def lloyd_max_levels(bits: int, tol: float = 1e-12, max_iter: int = 5000) -> np.ndarray:
    """Lloyd-Max (MSE-optimal) 2^bits-level quantizer of N(0, 1), by Lloyd iteration on exact moments.

    Starts from the companding (Panter-Dite) point density, levels at quantiles of N(0, 3), which is
    already close for many levels; Lloyd's iteration then converges slowly but monotonically.
    """
    k = 2 ** bits
    lv = np.sqrt(3.0) * special.ndtri((np.arange(k) + 0.5) / k)
    for _ in range(max_iter):
        edges = np.concatenate([[-np.inf], (lv[1:] + lv[:-1]) / 2, [np.inf]])
        m0, m1, _ = _partial_moments(edges[:-1], edges[1:])
        new = m1 / m0
        if np.max(np.abs(new - lv)) < tol:
            return new
        lv = new
    return lv


@functools.lru_cache(maxsize=None)
def quest_fp4_trust_as_run() -> float:
    """The fp4 trust radius (row-RMS units) that QuEST's published fp4 runs trained with (reference section 5b).

    Its fp4 trust quantizer builds 16 Lloyd-Max levels by 20 iterations from linspace(-3, 3), sets trust to half
    their top gap, then replaces the levels by e2m1's and assigns the intended radius to a local variable only.
    The same 20 iterations here, on exact Gaussian moments (QuEST integrates numerically: same to 1e-8)."""
    levels = np.linspace(-3.0, 3.0, 16)
    for _ in range(20):
        edges = np.concatenate([[-np.inf], (levels[1:] + levels[:-1]) / 2, [np.inf]])
        m0, m1, _ = _partial_moments(edges[:-1], edges[1:])
        levels = m1 / m0
    return float(levels[-1] - levels[-2]) / 2


def sparsity_mse(fraction: float) -> float:
    """Exact MSE of zeroing the smallest `fraction` of N(0, 1) by magnitude (the rest kept exactly)."""
    t = special.ndtri((1 + fraction) / 2)
    return float((2 * special.ndtr(t) - 1) - 2 * t * np.exp(-t * t / 2) / np.sqrt(2 * np.pi))
