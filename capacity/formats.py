"""The Format abstraction: a compressed representation applied to a torch tensor.

A Format is a chain of components applied left to right (`2:4+int4`: sparsify, then quantize the kept
values). Each component sees the tensor, a `keep` mask of the entries that still carry values (set by
an earlier sparsity step, or None) and `inner`, the rest of the chain, so that wrappers such as a
Hadamard rotation or outlier extraction can act around what follows. Formats act on float tensors of
any shape, on any device; blocks and groups run along the last dimension.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from . import grids

Inner = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
BASELINE_BITS = 16.0  # storage of an uncompressed value (bf16), used where a chain ends without a quantizer
SCALE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "e8m0": 8, "e4m3": 8}
SCALE_POLICIES = ("opt", "rms", "absmax", "absmean", "none")


class InputError(ValueError):
    """Bad user input (a spec, a file, a row): the CLI prints the message and exits with code 2."""


class SpecError(InputError):
    """A format spec that cannot be built: the message names the problem."""


class Component:
    """One step of a format chain. Subclasses set `name`, `defaults`, and implement `apply`/`bits`."""

    name = "component"
    defaults: dict = {}

    def __init__(self, **params):
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise SpecError(f"{self.name}: unknown parameter(s) {sorted(unknown)}; "
                            f"known: {sorted(self.defaults) or 'none'}")
        self.params = {**self.defaults, **params}

    @property
    def spec(self) -> str:
        if getattr(self, "spec_override", None):  # set for user factories imported as module:callable
            return self.spec_override
        changed = [f"{k}={v}" for k, v in self.params.items() if v != self.defaults[k]]
        return f"{self.name}({','.join(changed)})" if changed else self.name

    def apply(self, x: torch.Tensor, keep: torch.Tensor | None, inner: Inner) -> torch.Tensor:
        raise NotImplementedError

    def bits(self, inner_bits: float) -> float:
        """Storage bits per value of this step given the bits of what follows it."""
        return inner_bits

    def exact_mse(self) -> float:
        raise SpecError(f"exact GMSE is not available for '{self.spec}': use Monte Carlo (exact=False)")

    def keep_mask(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor | None:
        """The entries this step keeps (sparsity steps override it); used by sparse gradient estimators."""
        return keep


class Format:
    """A compressed number format: `fmt(x)` is x compressed then decompressed (same shape and dtype)."""

    def __init__(self, parts):
        self.parts = tuple(parts)
        if not self.parts:
            raise SpecError("empty format spec")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        def run(i: int, t: torch.Tensor, keep):
            if i == len(self.parts):
                return t
            return self.parts[i].apply(t, keep, lambda u, k: run(i + 1, u, k))
        return run(0, x.float(), None).to(x.dtype)

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        keep = None
        for part in self.parts:
            keep = part.keep_mask(x, keep)
        return keep

    @property
    def bits_per_value(self) -> float:
        bits = BASELINE_BITS
        for part in reversed(self.parts):
            bits = part.bits(bits)
        return bits

    def exact_mse(self) -> float:
        if len(self.parts) != 1:
            raise SpecError(f"exact GMSE is not available for the composite '{self}': use Monte Carlo")
        return self.parts[0].exact_mse()

    def __str__(self) -> str:
        return "+".join(p.spec for p in self.parts)

    def __repr__(self) -> str:
        return f"Format('{self}')"

    def __eq__(self, other) -> bool:
        return isinstance(other, Format) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


class Identity(Component):
    """No compression (`bf16`, `fp16`, `fp32`, `none`): GMSE 0, stored in `storage_bits`."""

    defaults = {}

    def __init__(self, name: str, storage_bits: float):
        super().__init__()
        self.name, self.storage_bits = name, storage_bits

    def apply(self, x, keep, inner):
        return inner(x, keep)

    def bits(self, inner_bits):
        return self.storage_bits

    def exact_mse(self):
        return 0.0


def _masked_mean(v: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    if w is None:
        return v.mean(-1, keepdim=True)
    return (v * w).sum(-1, keepdim=True) / w.sum(-1, keepdim=True).clamp_min(1)


class ScaledQuantizer(Component):
    """Rounding to a fixed set of points times a scale chosen per tensor or per group.

    Scale policies: `opt` searches the MSE-minimising scale on the data itself (golden section around
    the Gaussian optimum); `rms` is RMS times the Gaussian-MSE-optimal factor (QuEST's choice, no search);
    `absmax` maps the largest magnitude to the outermost point; `absmean` uses mean |x| (BitNet);
    `none` is scale 1. The scale itself is stored in `scale_format` (rounded accordingly).
    On fine grids (fp8, int8) `opt` fits each tensor's own optimum, which on 65k Gaussian samples lies
    ~0.5-1% below the population GMSE; `rms` is unbiased there and costs one rounding instead of ~14.
    """

    element_bits: float
    top: float            # largest coordinate of the point set, for absmax
    gaussian_scale: float  # MSE-optimal scale for unit-variance Gaussian data
    search_iters = 12

    def __init__(self, **params):
        if params.get("group") == "none":
            params["group"] = None
        super().__init__(**params)
        group, scale = self.params.get("group"), self.params.get("scale")
        if group is not None and (not isinstance(group, int) or group < 1):
            raise SpecError(f"{self.name}: group must be a positive integer, got {group!r}")
        if scale not in SCALE_POLICIES:
            raise SpecError(f"{self.name}: scale must be one of {', '.join(SCALE_POLICIES)}, got {scale!r}")
        if self.params.get("scale_format", "fp32") not in SCALE_BITS:
            raise SpecError(f"{self.name}: scale_format must be one of {', '.join(SCALE_BITS)}")

    def round(self, u: torch.Tensor) -> torch.Tensor:
        """Nearest point to each unit-scale value, u of shape (groups, group_size)."""
        raise NotImplementedError

    def bits(self, inner_bits):
        group = self.params.get("group")
        overhead = SCALE_BITS[self.params.get("scale_format", "fp32")] / group if group else 0.0
        return self.element_bits + overhead

    def apply(self, x, keep, inner):
        group = self.params.get("group")
        if group and x.shape[-1] % group:
            raise SpecError(f"{self.spec}: last dimension {x.shape[-1]} is not a multiple of group {group}")
        xg = x.reshape(-1, group) if group else x.reshape(1, -1)
        w = None if keep is None else keep.reshape(xg.shape).to(xg.dtype)
        s = self._scale(xg, w, x)
        y = s * self.round(xg / s)
        if w is not None:
            y = y * w
        return inner(y.reshape(x.shape), keep)

    def _scale(self, xg, w, x):
        policy = self.params["scale"]
        if policy == "none":
            return torch.ones_like(xg[:, :1])
        if policy == "absmax":
            s = (xg.abs() if w is None else xg.abs() * w).amax(-1, keepdim=True) / self.top
        elif policy == "absmean":
            s = _masked_mean(xg.abs(), w)
        else:
            s = _masked_mean(xg * xg, w).sqrt() * self.gaussian_scale
            if policy == "opt":
                s = self._search(xg, w, s)
        s = self._store_scale(s, x)
        return torch.where(s > 0, s, torch.ones_like(s))

    def _store_scale(self, s, x):
        fmt = self.params.get("scale_format", "fp32")
        if fmt in ("fp16", "bf16"):
            return s.to(torch.float16 if fmt == "fp16" else torch.bfloat16).float()
        if fmt == "e8m0":  # OCP MX: 2^(floor(log2 amax) - emax of the element type)
            amax = s * self.top
            return torch.exp2(torch.floor(torch.log2(amax)) - math.floor(math.log2(self.top)))
        if fmt == "e4m3":  # NVFP4: E4M3 block scales under an FP32 per-tensor scale
            tensor_scale = (x.abs().amax() / (self.top * 448.0)).clamp_min(1e-30)
            block = (s / tensor_scale).clamp(max=448.0).to(torch.float8_e4m3fn).float()
            return block * tensor_scale
        return s

    def _search(self, xg, w, s0):
        """Vectorised golden-section search of the per-group MSE over scales in [0.5, 1.5] x s0."""
        def err(s):
            e = (xg - s * self.round(xg / s)) ** 2
            return (e if w is None else e * w).sum(-1, keepdim=True)

        g = (math.sqrt(5) - 1) / 2
        a, b = 0.5 * s0, 1.5 * s0
        c, d = b - g * (b - a), a + g * (b - a)
        fc, fd = err(c), err(d)
        for _ in range(self.search_iters):
            left = fc <= fd
            a, b = torch.where(left, a, c), torch.where(left, d, b)
            new = torch.where(left, b - g * (b - a), a + g * (b - a))
            fnew = err(new)
            c, d, fc, fd = (torch.where(left, new, d), torch.where(left, c, new),
                            torch.where(left, fnew, fd), torch.where(left, fc, fnew))
        return torch.where(fc <= fd, c, d)


class GridQuantizer(ScaledQuantizer):
    """Nearest-level rounding to a scalar grid: integer, Lloyd-Max, minifloat, NF4, ternary, binary."""

    def __init__(self, name: str, levels, element_bits: float, defaults: dict,
                 cast: torch.dtype | None = None, uniform: bool = False, **params):
        self.name, self.defaults = name, defaults
        self.levels_np = np.asarray(levels, dtype=np.float64)
        self.levels = torch.tensor(self.levels_np, dtype=torch.float32)
        self.midpoints = (self.levels[1:] + self.levels[:-1]) / 2
        self.element_bits, self.cast, self.uniform = element_bits, cast, uniform
        self.top = float(np.abs(self.levels_np).max())
        super().__init__(**params)
        needs_gaussian = self.params["scale"] in ("opt", "rms")
        self.gaussian_scale = grids.optimal_scale(self.levels_np)[0] if needs_gaussian else 1.0

    def round(self, u):
        if self.uniform:  # midrise integer grid: +-0.5, +-1.5, ...
            return (torch.floor(u) + 0.5).clamp(-self.top, self.top)
        if self.cast is not None:
            return u.clamp(-self.top, self.top).to(self.cast).float()
        levels, mids = self.levels.to(u.device), self.midpoints.to(u.device)
        return levels[torch.bucketize(u, mids)]

    def exact_mse(self):
        if self.params.get("group") is None and self.params["scale"] in ("opt", "rms"):
            return grids.optimal_scale(self.levels_np)[1]
        if self.params.get("group") is None and self.params["scale"] == "none":
            return grids.grid_mse(self.levels_np, 1.0)
        return super().exact_mse()
