"""The capacity law rho(GMSE): the effective-parameter multiplier predicted from a format's Gaussian MSE."""
from __future__ import annotations

import numpy as np

# Published constants (Llama / C4 fit of "Unified Scaling Laws for Compressed Representations").
RHO_L, RHO_F, RHO_C = 1.0, 0.41, 1.39


def rho(gmse, L: float = RHO_L, F: float = RHO_F, C: float = RHO_C):
    """rho = L * tanh(F * log_{1/4}(GMSE))^C: 0 at GMSE >= 1, tending to L as GMSE -> 0."""
    value = rho_of_quarter_log(quarter_log(gmse), L, F, C)
    return float(value) if value.ndim == 0 else value


def quarter_log(gmse) -> np.ndarray:
    """max(0, log_{1/4} GMSE), what rho reads of a GMSE (NaN for an unknown one): a fit that evaluates rho many
    times at the same GMSEs computes this once."""
    g = np.asarray(gmse, dtype=float)
    with np.errstate(divide="ignore"):
        log_quarter = np.where(g > 0, np.log(np.where(g > 0, g, 1.0)) / np.log(0.25), np.inf)
    return np.where(np.isnan(g), np.nan, np.clip(log_quarter, 0.0, None))  # unknown GMSE: unknown capacity, never 1


def rho_of_quarter_log(q, L: float = RHO_L, F: float = RHO_F, C: float = RHO_C) -> np.ndarray:
    return L * np.tanh(F * q) ** C


def pair_rho(w_gmse: float, a_gmse: float, **constants) -> float:
    """Capacity of a weights/activations pair: the product of the two capacities."""
    return rho(w_gmse, **constants) * rho(a_gmse, **constants)
