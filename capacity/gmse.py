"""Gaussian MSE of a format: exact for scalar grids, Monte Carlo (streamed, seeded) for everything.

Monte Carlo draws independent N(0, 1) tensors of a fixed shape, `MEASURE_SHAPE` = 64 rows x 1024
values by default (a weight-matrix-like tensor: per-tensor scales see 65,536 values, blocks and N:M
groups run along the rows), and averages the per-tensor MSE; the standard error is over tensors.
Memory is one tensor at a time whatever the sample count.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import InputError
from .formats import Format
from .rho import rho as rho_law
from .paths import strict_json
from .spec import is_uncompressed, parse

if TYPE_CHECKING:
    import pandas as pd

MEASURE_SHAPE = (64, 1024)
DEFAULT_SAMPLES = 1 << 22
MAX_SAMPLES = 1 << 30     # ~a minute for a scalar grid on 2 cores
MAX_ROW_LENGTH = 1 << 20


@dataclass(frozen=True)
class GMSEResult:
    spec: str
    gmse: float
    stderr: float
    bits_per_value: float
    rho: float
    method: str          # "exact" or "monte-carlo"
    samples: int         # 0 for exact
    shape: tuple         # the tensor shape Monte Carlo measured on

    def as_json(self) -> dict:
        return strict_json(asdict(self))

    def summary(self):
        """A `capacity.results.Summary` (text, Markdown, HTML)."""
        return _summary(f"Gaussian MSE of {self.spec}",
                        [("method", self.method + (f", {self.samples:,} samples on {self.shape} tensors"
                                                   if self.samples else ""))],
                        {"gmse": self.gmse, "s.e.": self.stderr, "bits per value": self.bits_per_value,
                         "rho(GMSE)": self.rho})


def gmse(spec: "str | Format", samples: int = DEFAULT_SAMPLES, seed: int = 0, exact: bool = False,
         shape: tuple = MEASURE_SHAPE, device: str = "cpu", row_length: int | None = None) -> GMSEResult:
    """GMSE of a format: E[(x - Q(x))^2] for x ~ N(0, 1), with its standard error and rho(GMSE).

    Per-row scales estimate each row's RMS from its own values: `row_length` measures on rows of that length
    (a model's real input width) instead of MEASURE_SHAPE's 1024, keeping 65,536 values per tensor."""
    if not 2 <= samples <= MAX_SAMPLES:
        raise InputError(f"samples must be in 2..{MAX_SAMPLES:,}, got {samples}")
    if row_length is not None and not 1 <= row_length <= MAX_ROW_LENGTH:
        raise InputError(f"row_length must be in 1..{MAX_ROW_LENGTH:,}, got {row_length}")
    fmt = parse(spec)
    if row_length is not None:
        shape = (max(1, math.prod(MEASURE_SHAPE) // row_length), row_length)
    if exact:
        value, stderr, n = fmt.exact_mse(), 0.0, 0
    else:
        value, stderr, n = _monte_carlo(fmt, samples, seed, tuple(shape), device)
    return GMSEResult(str(fmt), value, stderr, fmt.bits_per_value, rho_law(value),
                      "exact" if exact else "monte-carlo", n, () if exact else tuple(shape))


@torch.inference_mode()
def _monte_carlo(fmt: Format, samples: int, seed: int, shape: tuple, device: str):
    per_tensor = math.prod(shape)
    n_tensors = max(2, math.ceil(samples / per_tensor))
    gen = torch.Generator(device=device).manual_seed(seed)
    errors = np.empty(n_tensors)
    # Random roundings and rotations draw from torch's global generator: seeded here on another stream than the data's
    # (seeded alike, they would draw the data's own uniforms: stochastic rounding correlated with x, 25% off), and
    # forked, so that a measurement neither depends on nor moves the caller's random state.
    with torch.random.fork_rng(devices=[] if device == "cpu" else [torch.device(device)]):
        torch.manual_seed(seed + 1)
        for i in range(n_tensors):
            x = torch.randn(shape, generator=gen, device=device)
            errors[i] = float(((fmt(x) - x) ** 2).mean())
    return float(errors.mean()), float(errors.std(ddof=1) / math.sqrt(n_tensors)), n_tensors * per_tensor


@dataclass(frozen=True)
class ErrorSplit:
    """A format's Gaussian MSE split into the squared conditional bias E_x[(E[Q(x) | x] - x)^2] and the rounding
    variance E_x[Var(Q(x) | x)]: nearest rounding is all bias, unbiased stochastic rounding all variance (what a
    gradient format needs: its errors average out over steps). `mean_error` is E[Q(x) - x]."""
    spec: str
    gmse: float
    bias_sq: float
    variance: float
    mean_error: float
    stderr: float        # of gmse
    samples: int

    def as_json(self) -> dict:
        return strict_json(asdict(self))

    def summary(self):
        """A `capacity.results.Summary` (text, Markdown, HTML)."""
        return _summary(f"bias and variance of {self.spec} on N(0, 1) data",
                        [("method", f"two independent roundings of {self.samples:,} samples")],
                        {"gmse": self.gmse, "s.e.": self.stderr, "bias^2": self.bias_sq, "variance": self.variance,
                         "mean error": self.mean_error})


def _summary(title: str, header: list, row: dict):
    import pandas as pd
    from .results import Summary
    return Summary(title, header, pd.DataFrame([row]))


@torch.inference_mode()
def error_split(spec: "str | Format", samples: int = DEFAULT_SAMPLES, seed: int = 0,
                shape: tuple = MEASURE_SHAPE) -> ErrorSplit:
    """Bias and variance of a format on N(0, 1) data, from two independent roundings q1, q2 of each x: the variance
    is E[(q1 - q2)^2] / 2 and the squared bias E[((q1 + q2) / 2 - x)^2] - variance / 2, both unbiased estimates.
    Seeded: the data and the rounding draws repeat for a seed."""
    if not 2 <= samples <= MAX_SAMPLES:
        raise InputError(f"samples must be in 2..{MAX_SAMPLES:,}, got {samples}")
    fmt = parse(spec)
    n_tensors = max(2, math.ceil(samples / math.prod(shape)))
    gen = torch.Generator().manual_seed(seed)
    sums = np.zeros((n_tensors, 4))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        for i in range(n_tensors):
            x = torch.randn(shape, generator=gen)
            q1, q2 = fmt(x), fmt(x)
            variance = float(((q1 - q2) ** 2).mean()) / 2
            sums[i] = [float(((q1 - x) ** 2).mean()), float((((q1 + q2) / 2 - x) ** 2).mean()) - variance / 2,
                       variance, float((q1 - x).mean())]
    mean = sums.mean(0)
    return ErrorSplit(str(fmt), mean[0], max(mean[1], 0.0), mean[2], mean[3],
                      float(sums[:, 0].std(ddof=1) / math.sqrt(n_tensors)), n_tensors * math.prod(shape))


def gmse_auto(spec: "str | Format", **kwargs) -> GMSEResult:
    """Exact where the format allows it, Monte Carlo otherwise."""
    try:
        return gmse(spec, exact=True)
    except ValueError:
        return gmse(spec, **kwargs)


RUN_SAMPLES = 1 << 20  # Monte Carlo samples of the GMSE a run table records: every GMSE a report prints uses these


@functools.lru_cache(maxsize=None)
def spec_gmse(spec: str | None) -> float:
    """The GMSE a run records for a spec string (exact where available, else RUN_SAMPLES samples); 0 for
    uncompressed."""
    return 0.0 if is_uncompressed(spec) else gmse_auto(spec, samples=RUN_SAMPLES).gmse


def compare(specs, samples: int = DEFAULT_SAMPLES, seed: int = 0) -> "pd.DataFrame":
    """A table of formats: bits/value, GMSE, rho, rho per bit and the rate-distortion bound 2^(-2R)."""
    rows = [gmse_auto(s, samples=samples, seed=seed).as_json() for s in specs]
    import pandas as pd
    table = pd.DataFrame(rows)[["spec", "bits_per_value", "gmse", "stderr", "rho", "method"]]
    table["rho_per_bit"] = table["rho"] / table["bits_per_value"]
    table["rd_bound"] = 2.0 ** (-2 * table["bits_per_value"])
    table["gmse_over_bound"] = table["gmse"] / table["rd_bound"]
    return table.sort_values(["rho", "bits_per_value"], ascending=[False, True]).reset_index(drop=True)
