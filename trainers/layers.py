"""Compressed linear layers and the gradient estimators that let a model train through a format.

The forward pass uses exactly `fmt(x)`: the Format object that `capacity.gmse` measures. The backward
pass is an estimator's masked identity:
  ste      gradient everywhere (straight-through);
  clipped  gradient where |x| <= max |Q(x)| of the tensor (nothing for clipped values);
  trust    gradient where |Q(x) - x| <= trust * RMS(x) (QuEST's trust region); trust defaults to the
           format's largest in-range rounding error on Gaussian data (half a step for a uniform grid).
For sparse formats the pruned entries follow `backward_mask`: `masked` (no gradient, the default),
`dense` (straight-through, lets pruned weights regrow), or `rbbm` (RMS-banded backward masking:
gradient where |x| < min(T_p, T_k) or |x| > max(T_p, T_k), T_p = RMS * Phi^-1(0.5 + p)).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import stats

from capscale import capacity

from .compression import Compression


@functools.lru_cache(maxsize=None)
def default_trust(spec: str) -> float:
    """Largest rounding error, in RMS units, of in-range values of Gaussian data: half a step for int grids."""
    fmt = capacity.parse(spec)
    x = torch.randn(capacity.MEASURE_SHAPE, generator=torch.Generator().manual_seed(0))
    q = fmt(x)
    keep = fmt.keep_mask(x)
    in_range = x.abs() <= q.abs().max()
    if keep is not None:
        in_range &= keep
    err = (q - x).abs()[in_range]
    return float(err.max()) if err.numel() else float("inf")


def backward_mask(x: torch.Tensor, q: torch.Tensor, fmt: capacity.Format, comp: Compression) -> torch.Tensor | None:
    """Where the gradient of `fmt` at x passes (None: everywhere)."""
    if comp.estimator == "ste":
        mask = None
    elif comp.estimator == "clipped":
        mask = x.abs() <= q.abs().max()
    else:
        trust = comp.trust if comp.trust is not None else default_trust(str(fmt))
        mask = (q - x).abs() <= trust * x.pow(2).mean().sqrt()
    keep = fmt.keep_mask(x)
    if keep is None or comp.backward_mask == "dense":
        return mask
    mask = torch.ones_like(keep) if mask is None else mask | ~keep  # pruned entries: the sparse rule decides
    if comp.backward_mask == "masked":
        return mask & keep
    t_k = x.abs()[~keep].max() if (~keep).any() else x.abs().new_zeros(())  # forward keeps |x| > t_k
    t_p = x.pow(2).mean().sqrt() * float(stats.norm.ppf(0.5 + comp.rbbm_p))
    low, high = torch.minimum(t_k, t_p), torch.maximum(t_k, t_p)
    return mask & ((x.abs() < low) | (x.abs() > high))


class _Estimate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fmt, comp):
        with torch.no_grad():
            q = fmt(x)
            mask = backward_mask(x, q, fmt, comp)
        ctx.save_for_backward(mask if mask is not None else torch.empty(0))
        ctx.has_mask = mask is not None
        return q

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return (grad * mask if ctx.has_mask else grad), None, None


def compress(x: torch.Tensor, fmt: capacity.Format | None, comp: Compression) -> torch.Tensor:
    return x if fmt is None else _Estimate.apply(x, fmt, comp)


class CompressedLinear(nn.Module):
    """y = A(x) @ W(w)^T: weights W and input activations A pass through formats (each optional)."""

    def __init__(self, in_features: int, out_features: int, comp: Compression):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.comp = comp

    def forward(self, x):
        return F.linear(compress(x, self.comp.a_fmt, self.comp), compress(self.weight, self.comp.w_fmt, self.comp))
