"""The scaled quantizers every scalar format is built on: a scale per group (a block, a row, the tensor) chosen by a
policy (rms, absmax, absmean, the MSE optimum) and stored in a scale format, then rounding to a grid (integer,
minifloat, NF4, Lloyd-Max, ...) nearest or stochastically."""
from __future__ import annotations

import math

import numpy as np
import torch

from . import level_sets
from .errors import SpecError
from .formats import Component

SCALE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "e8m0": 8, "e4m3": 8}
EXACT_SCALE_FORMATS = ("fp32", "fp16")  # scales fine enough that the closed-form GMSE ignores their rounding
SCALE_POLICIES = ("opt", "rms", "absmax", "absmean", "none")
SCALE_UNITS = ("row", "tensor")  # besides a group size: one scale per row (last dim) or per whole tensor
SCALE_FROM = ("kept", "row")  # after a sparsity step: the scale's statistic over the kept entries, or the whole row
ROUNDINGS = ("nearest", "stochastic")  # stochastic: up with probability the distance to the lower level over the gap


def divide(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """t / divisor by IEEE division on every device. PyTorch's CUDA kernel divides by a Python number as a times its
    reciprocal (one bit off, `BinaryDivTrueKernel.cu`), which moved CUDA's block scales off the CPU's; a tensor divisor
    takes the true division there too (on the CPU both are the same division)."""
    return t / torch.tensor(divisor, dtype=t.dtype, device=t.device)


def row_rms(v: torch.Tensor) -> torch.Tensor:
    """RMS along the last dimension in one pass, without a squared copy (the trainer's trust radius uses it too)."""
    return torch.linalg.vector_norm(v, dim=-1, keepdim=True) * v.shape[-1] ** -0.5


def _masked_mean(v: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    if w is None:
        return v.mean(-1, keepdim=True)
    return (v * w).sum(-1, keepdim=True) / w.sum(-1, keepdim=True).clamp_min(1)


class ScaledQuantizer(Component):
    """Rounding to a fixed set of points times a scale chosen per row, per group or per tensor.

    Where the scale is taken (`group`): `row` (default for scalar grids: one scale per row along the last
    dimension, i.e. per output row of a weight and per token of an activation, as QuEST does), a group size
    (blocks of consecutive values along the last dimension, as MX formats do), or `tensor` (one scale for
    everything, for ablations). Scale policies: `rms` is the row's RMS times the Gaussian-MSE-optimal
    multiple (QuEST's rule and constants, the default); `opt` searches the MSE-minimising scale on the data itself (golden
    section around the Gaussian optimum); `absmax` maps the largest magnitude to the outermost point;
    `absmean` uses mean |x| (BitNet); `none` is scale 1. The scale is stored in `scale_format`: by default
    fp16 per group (counted in the bits) and fp32 per row or tensor (as QuEST keeps it; counted as free).
    After a sparsity step, `scale_from` says which entries the scale's statistic reads: `kept` (default: the
    values the sparsity kept) or `row` (the whole group before pruning: QuEST's FourEight scales its int4 from
    the full rotated row's RMS, pruned entries included).
    """

    rounds = True  # its trust radius comes from quantize(), not tolerance()

    element_bits: float
    top: float            # largest coordinate of the point set, for absmax
    gaussian_scale: float  # MSE-optimal scale for unit-variance Gaussian data
    half_gap: float | None = None  # half the largest gap between adjacent points (unit scale): the trust radius
    search_iters = 12

    def __init__(self, **params):
        # every scaled quantizer can follow a sparsity step, and round stochastically (unbiased, for gradients)
        self.defaults = {**self.defaults, "scale_from": "kept", "rounding": "nearest"}
        super().__init__(**params)
        if self.params["rounding"] not in ROUNDINGS:
            raise SpecError(f"{self.name}: rounding must be one of {', '.join(ROUNDINGS)}, got {self.params['rounding']!r}")
        group, scale = self.params.get("group"), self.params.get("scale")
        if self.params["scale_from"] not in SCALE_FROM:
            raise SpecError(f"{self.name}: scale_from must be one of {', '.join(SCALE_FROM)}, got "
                            f"{self.params['scale_from']!r}")
        if group not in SCALE_UNITS and (not isinstance(group, int) or isinstance(group, bool) or group < 1):
            raise SpecError(f"{self.name}: group must be row, tensor or a positive integer, got {group!r}")
        if scale not in SCALE_POLICIES:
            raise SpecError(f"{self.name}: scale must be one of {', '.join(SCALE_POLICIES)}, got {scale!r}")
        self.scale_format = self.params.get("scale_format") or ("fp32" if group in SCALE_UNITS else "fp16")
        if self.scale_format not in SCALE_BITS:
            raise SpecError(f"{self.name}: scale_format must be one of {', '.join(SCALE_BITS)}")

    def round(self, u: torch.Tensor) -> torch.Tensor:
        """Nearest point to each unit-scale value, u of shape (groups, group_size): a fresh tensor, which the
        rounding may overwrite (and return)."""
        raise NotImplementedError

    def bits(self, inner_bits):
        """Element bits plus the scale's share; a row or tensor scale is counted as free (rows are long)."""
        group = self.params.get("group")
        overhead = 0.0 if group in SCALE_UNITS else SCALE_BITS[self.scale_format] / group
        return self.element_bits + overhead

    def check_shape(self, shape):
        group = self.params.get("group")
        if isinstance(group, int) and not isinstance(group, bool) and shape[-1] % group:
            raise SpecError(f"{self.spec}: last dimension {shape[-1]} is not a multiple of group {group}")

    def _groups(self, x: torch.Tensor) -> torch.Tensor:
        group = self.params.get("group")
        if group == "tensor" or x.dim() == 0:
            return x.reshape(1, -1)
        if group == "row":
            return x.reshape(-1, x.shape[-1])
        ScaledQuantizer.check_shape(self, x.shape)  # the group's own check (a subclass may check more up front)
        return x.reshape(-1, group)

    def quantize(self, x: torch.Tensor, keep: torch.Tensor | None, unpruned: torch.Tensor | None = None,
                 tolerance: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(quantized x, per-entry tolerance): the tolerance is half_gap times the entry's scale. `unpruned`: x before
        the sparsity steps that set `keep`, for `scale_from=row`. `tolerance=False` skips it (None): for block scales
        it is a full-size copy, which only the trust estimator reads."""
        xg = self._groups(x)
        w = None if keep is None else keep.reshape(xg.shape).to(xg.dtype)
        if self.params["scale_from"] == "row" and unpruned is not None and w is not None:
            s = self._scale(self._groups(unpruned), None, unpruned)
        else:
            s = self._scale(xg, w, x)
        # A scale stored as 0 (an all-zero group, or one whose scale underflows its format: fp16 flushes gradient
        # scales below 6e-8) stores zeros; rounding at a stand-in scale would make them +-0.5 on a midrise grid.
        # The stand-in scale 1 divides and the stored scale (0 there) multiplies, in place on the one fresh tensor:
        # a large new tensor costs more to allocate on the CPU than the arithmetic on it.
        stored = s > 0
        y = self.round(xg / torch.where(stored, s, 1.0)).mul_(torch.where(stored, s, 0.0))
        s = torch.where(stored, s, 1.0)
        if w is not None:
            y = y * w
        radius = None if self.half_gap is None or not tolerance else (self.half_gap * s).expand_as(xg).reshape(x.shape)
        return y.reshape(x.shape), radius

    def apply(self, x, keep, inner):
        return inner(self.quantize(x, keep, tolerance=False)[0], keep)

    def _scale(self, xg, w, x):
        policy = self.params["scale"]
        if policy == "none":
            return torch.ones_like(xg[:, :1])
        if policy == "absmax":
            s = divide((xg.abs() if w is None else xg.abs() * w).amax(-1, keepdim=True), self.top)
        elif policy == "absmean":
            s = _masked_mean(xg.abs(), w)
        else:
            rms = row_rms(xg) if w is None else _masked_mean(xg * xg, w).sqrt()
            s = rms * self.gaussian_scale
            if policy == "opt":
                s = self._search(xg, w, s)
        return self._store_scale(s, x)  # 0 for an all-zero group, or one whose scale underflows its format

    def _store_scale(self, s, x):
        """The scale as its format stores it. With stochastic rounding an 8-bit scale is rounded up, never below
        the one asked for, so that an absmax scale clips no value and the rounding stays unbiased (OCP MX's
        floor(log2 amax) - emax puts amax up to 8 on a grid that ends at 6)."""
        fmt, up = self.scale_format, self.params["rounding"] == "stochastic"
        if fmt in ("fp16", "bf16"):
            return s.to(torch.float16 if fmt == "fp16" else torch.bfloat16).float()
        if fmt == "e8m0":  # OCP MX: 2^(floor(log2 amax) - emax of the element type)
            if up:
                return torch.exp2(torch.ceil(torch.log2(s)))
            amax = s * self.top
            return torch.exp2(torch.floor(torch.log2(amax)) - math.floor(math.log2(self.top)))
        if fmt == "e4m3":  # NVFP4: E4M3 block scales under an FP32 per-tensor scale
            tensor_scale = divide(x.abs().amax(), self.top * 448.0).clamp_min(1e-30)
            wanted = (s / tensor_scale).clamp(max=448.0)
            block = wanted.to(torch.float8_e4m3fn).float()
            if up:  # E4M3 steps are at most 1/8 relative: 9/8 of the wanted scale rounds to one at or above it
                block = torch.where(block >= wanted, block, (wanted * 1.125).clamp(max=448.0).to(torch.float8_e4m3fn).float())
            return block * tensor_scale
        return s

    SEARCH_GRID = 33  # scales tried over [0.25, 2] x the Gaussian guess before the golden-section refinement

    def _search(self, xg, w, s0):
        """The per-group MSE-optimal scale: a grid of SEARCH_GRID scales over [0.25, 2] x s0 finds the best basin
        (the error is not unimodal in the scale: a golden-section search alone stopped in a local minimum, and
        nvfp4(scale=opt) came out worse than four-over-six's two candidates), then golden section within it."""
        def err(s):
            e = (xg - s * self.round(xg / s)) ** 2
            return (e if w is None else e * w).sum(-1, keepdim=True)

        factors = torch.linspace(0.25, 2.0, self.SEARCH_GRID, dtype=xg.dtype, device=xg.device)
        errors = torch.cat([err(s0 * f) for f in factors], dim=-1)
        best = errors.argmin(-1, keepdim=True)
        step = float(factors[1] - factors[0])
        g = (math.sqrt(5) - 1) / 2
        a, b = s0 * (factors[best] - step).clamp_min(1e-3), s0 * (factors[best] + step)
        c, d = b - g * (b - a), a + g * (b - a)
        fc, fd = err(c), err(d)
        for _ in range(self.search_iters):
            left = fc <= fd
            a, b = torch.where(left, a, c), torch.where(left, d, b)
            new = torch.where(left, b - g * (b - a), a + g * (b - a))
            fnew = err(new)
            c, d, fc, fd = (torch.where(left, new, d), torch.where(left, c, new),
                            torch.where(left, fnew, fd), torch.where(left, fc, fnew))
        refined = torch.where(fc <= fd, c, d)
        grid_best = s0 * factors[best]
        return torch.where(torch.minimum(fc, fd) <= errors.gather(-1, best), refined, grid_best)


class GridQuantizer(ScaledQuantizer):
    """Nearest-level rounding to a scalar grid: integer, Lloyd-Max, minifloat, NF4, ternary, binary."""

    def __init__(self, name: str, levels, element_bits: float, defaults: dict, params: dict | None = None, *,
                 cast: torch.dtype | None = None, uniform: bool = False, rms_scale: float | None = None):
        """`params`: the spec's own (only names in `defaults`); the rest is how the format is built, which a spec
        cannot set. `rms_scale`: the level scale per unit RMS of the `rms` rule (default: the Gaussian optimum)."""
        self.name, self.defaults = name, defaults
        self.levels_np = np.asarray(levels, dtype=np.float64)
        self.levels = torch.tensor(self.levels_np, dtype=torch.float32)
        self.midpoints = (self.levels[1:] + self.levels[:-1]) / 2
        self._device_levels: dict = {}
        self.element_bits, self.cast, self.uniform = element_bits, cast, uniform
        self.e2m1 = np.array_equal(self.levels_np, level_sets.minifloat_levels("e2m1"))  # rounded by arithmetic
        self.top = float(np.abs(self.levels_np).max())
        self.half_gap = float(np.diff(np.sort(self.levels_np)).max()) / 2 if len(self.levels_np) > 1 else None
        super().__init__(**(params or {}))
        if rms_scale is not None and self.params["scale"] == "rms":
            self.gaussian_scale = rms_scale
        elif self.params["scale"] in ("opt", "rms"):
            self.gaussian_scale = level_sets.optimal_scale(self.levels_np)[0]
        else:
            self.gaussian_scale = 1.0

    def round(self, u):
        if self.params["rounding"] == "stochastic":
            return self._round_stochastic(u)
        if self.uniform:  # midrise integer grid: +-0.5, +-1.5, ...
            return u.floor_().add_(0.5).clamp_(-self.top, self.top)
        if self.cast is not None:
            return u.clamp(-self.top, self.top).to(self.cast).float()
        if self.e2m1:
            return level_sets.round_e2m1(u)
        levels, mids = self._levels_on(u.device)
        return levels[torch.bucketize(u, mids)]

    def _round_stochastic(self, u):
        """Up to the next level with probability (u - lower) / gap, else down: E[round(u)] = u inside the grid's
        range (values beyond it clip to the end levels, the one bias left; an absmax scale has none). Draws from
        torch's global generator, so torch.manual_seed makes a run reproducible."""
        if self.uniform:  # midrise grid +-0.5, +-1.5, ...: floor(u - 0.5 + r) + 0.5, r ~ U[0, 1)
            u = u.clamp(-self.top, self.top)
            return (torch.floor(u - 0.5 + torch.rand_like(u)) + 0.5).clamp(-self.top, self.top)
        levels, _ = self._levels_on(u.device)
        u = u.clamp(float(levels[0]), float(levels[-1]))
        upper = torch.bucketize(u, levels).clamp(1, len(levels) - 1)  # levels[upper - 1] <= u <= levels[upper]
        lo, hi = levels[upper - 1], levels[upper]
        up = torch.rand_like(u) * (hi - lo) < (u - lo)
        return torch.where(up, hi, lo)

    def _levels_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(levels, midpoints) on a device, copied there once (not on every call). Under torch.compile, fresh
        copies: a cached tensor made inside the traced function would alias its output (a cold compile failed)."""
        if torch.compiler.is_compiling():  # built from plain numbers: constants of the graph, never captured tensors
            levels = torch.tensor(self.levels_np.tolist(), dtype=torch.float32, device=device)
            return levels, (levels[1:] + levels[:-1]) / 2
        if device not in self._device_levels:
            self._device_levels[device] = (self.levels.to(device), self.midpoints.to(device))
        return self._device_levels[device]

    def exact_mse(self):
        """The population value: the grid at its Gaussian-optimal scale, as rows of unbounded length see it. Only
        where the scale is kept in a float fine enough not to move it (fp32, fp16: a relative error below
        2^-11, far under any Monte Carlo error); the rounding of an e8m0 or e4m3 scale is not modelled. A scale
        searched on the data (`scale=opt`) fits the very values it rounds, up to 2% below the population value
        (fp8 per tensor, int4 per row of 1024): not exact either."""
        if self.params["rounding"] != "nearest":
            raise SpecError(f"exact GMSE of '{self.spec}': stochastic rounding is measured by Monte Carlo (without "
                            "--exact)")
        if self.params["scale"] != "none" and self.scale_format not in EXACT_SCALE_FORMATS:
            raise SpecError(f"exact GMSE of '{self.spec}' does not model its {self.scale_format} scale's rounding: "
                            "use Monte Carlo (without --exact)")
        if self.params.get("group") in SCALE_UNITS and self.params["scale"] == "rms":
            return level_sets.grid_mse(self.levels_np, self.gaussian_scale)
        if self.params["scale"] == "none":
            return level_sets.grid_mse(self.levels_np, 1.0)
        return super().exact_mse()
