"""NVFP4 as today's FP4 training uses it: E2M1 elements in blocks of 16 with E4M3 block scales under one FP32
tensor scale, and the variants of the published recipes.

- `nvfp4(four_over_six=true)`: each block encoded twice, its largest magnitude mapped to 6 (the usual scale) and
  to 4 (the scale times 1.5), keeping the encoding with the lower block squared error; the tensor scale then maps
  the largest block scale to 256 instead of 448 so that 1.5x it still fits E4M3 (four-over-six, as in torchao's
  proposal and Quartet II's kernels, `IST-DASLab/Quartet-II`, `nvfp4_triton.py`).
- `nvfp4(tile=16x16)`: one scale per 16x16 tile of a 2-D tensor (NVIDIA's recipe for weights, arXiv 2509.25149,
  so that W and W^T quantize identically).
- `nvfp4(scale_mult=x)`: every block scale times x (x < 1 clips, x > 1 leaves headroom: Quartet II's scale
  override, and the 17/16 its stochastic rounding uses so that no value clips after the E4M3 rounding).
- `eden(group=128)`: Quartet II's MS-EDEN (arXiv 2601.22813, section 3; `eden.py` and `eden_1x16s_fp4` there):
  round to nearest in NVFP4, then per group of 128 values multiply the block scales by |x|^2 / <x, Q(x)> and
  round them stochastically to an E4M3 neighbour: unbiased over a random rotation in expectation
  (`rht(block=128)+eden`). Its Gaussian MSE, 0.0097 here, is the paper's 0.0098 at scale 1; Quartet II's training
  code passes 17/16 headroom (`eden(scale_mult=1.0625)`, 0.0111), as its `quartet2` recipe does.
- `rht(block=B)`: a randomized Hadamard transform, random +-1 signs then a block Hadamard, inverted after the
  rest of the chain; signs drawn afresh on every call from torch's generator (seeded runs repeat).

The tensor scale is amax / (448 x 6) as NVIDIA's recipe sets it (amax / (256 x 6) under four-over-six), E2M1
rounding ties go to the larger magnitude as Quartet II's kernels do."""
from __future__ import annotations

import math

import torch

from . import level_sets
from .level_sets import round_e2m1
from .errors import SpecError
from .formats import Component
from .quantizers import GridQuantizer, divide
from .structure import fwht

E4M3_MAX = 448.0
FOUR_OVER_SIX_CAP = 256.0  # the largest block-scale code under four-over-six: 1.5 x 256 = 384 still fits E4M3
EDEN_CAP = 255.99
SR_HEADROOM = 17 / 16  # Quartet II's headroom for unbiased roundings: the block maximum maps to 6 x 16/17
TILE = 16


def round_e2m1_stochastic(u: torch.Tensor) -> torch.Tensor:
    """To one of the two E2M1 neighbours of each value, the upper with probability (|u| - lower) / step: unbiased
    within +-6 (values beyond clip), by arithmetic on the grid's steps (0.5 below 2, 1 below 4, 2 above)."""
    a = u.abs().clamp_(max=6.0)
    step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
    a.div_(step)
    lower = a.floor()
    a.sub_(lower)  # the fraction of a step above the lower neighbour: the probability of rounding up
    return lower.add_(torch.rand_like(a) < a).mul_(step).clamp_(max=6.0).copysign_(u)


def round_e4m3_stochastic(x: torch.Tensor) -> torch.Tensor:
    """Each positive value to one of its two E4M3 neighbours, the upper with probability (x - lower) / gap: unbiased
    (Quartet II's `sr_e4m3`)."""
    x = x.clamp(max=E4M3_MAX - 0.01)
    q = x.to(torch.float8_e4m3fn)
    near = q.float()
    step = (q.view(torch.uint8) + torch.where(near > x, -1, 1).to(torch.uint8)).view(torch.float8_e4m3fn).float()
    lo, hi = torch.minimum(near, step), torch.maximum(near, step)
    gap = (hi - lo).clamp_min(1e-30)
    return torch.where(torch.rand_like(x) * gap < x - lo, hi, lo)


def absmax(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """max |x|, over the whole tensor from one min-max pass (no |x| copy), or over `dim` (kept) as |x|'s max: torch's
    min-max along a dimension of 16 is twice as slow as the copy."""
    if dim is None:
        low, high = torch.aminmax(x)
        return torch.maximum(-low, high)
    return x.abs().amax(dim, keepdim=True)


class NVFP4(GridQuantizer):
    """E2M1 in blocks of 16 (or 16x16 tiles) with E4M3 scales under an FP32 tensor scale; see the module docstring."""

    def __init__(self, name: str = "nvfp4", extra: dict | None = None, **kw):
        defaults = {"group": 16, "scale": "absmax", "scale_format": "e4m3", "four_over_six": False, "tile": None,
                    "scale_mult": 1.0, **(extra or {})}
        super().__init__(name, level_sets.minifloat_levels("e2m1"), 4, defaults, params=kw)
        p = self.params
        if not isinstance(p["four_over_six"], bool):
            raise SpecError(f"{name}: four_over_six must be true or false, got {p['four_over_six']!r}")
        if p["tile"] not in (None, f"{TILE}x{TILE}"):
            raise SpecError(f"{name}: tile must be {TILE}x{TILE} (one scale per tile of a 2-D tensor), got {p['tile']!r}")
        mult = p["scale_mult"]
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not 0 < mult < math.inf:
            raise SpecError(f"{name}: scale_mult must be a positive number, got {mult!r}")
        if p["group"] != 16 or p["scale_format"] != "e4m3":
            raise SpecError(f"{name}: NVFP4 blocks are group=16 with scale_format=e4m3; for other blocks use "
                            "fp4_e2m1(group=..., scale_format=...)")
        if p["scale"] != "absmax" and (p["tile"] or p["four_over_six"] or mult != 1.0):
            raise SpecError(f"{name}: scale={p['scale']} chooses each block's scale itself; tile, four_over_six and "
                            "scale_mult apply to absmax scales")

    def round(self, u):
        if self.params["rounding"] == "stochastic":
            return round_e2m1_stochastic(u)
        return round_e2m1(u)

    def bits(self, inner_bits):
        return self.element_bits + 8.0 / (TILE * TILE if self.params["tile"] else 16)

    def check_shape(self, shape):
        super().check_shape(shape)
        self._check_tiles(shape)

    def _check_tiles(self, shape):
        if self.params["tile"] and (len(shape) != 2 or shape[0] % TILE or shape[1] % TILE):
            raise SpecError(f"{self.spec}: {TILE}x{TILE} tiles need a 2-D tensor whose sides are multiples of {TILE}, "
                            f"got shape {tuple(shape)}")

    def _blocks(self, t: torch.Tensor) -> torch.Tensor:
        """(blocks, values) of a tensor: 16 consecutive values, or a 16x16 tile flattened."""
        if not self.params["tile"]:
            return self._groups(t)
        self._check_tiles(t.shape)
        rows, cols = t.shape
        return t.reshape(rows // TILE, TILE, cols // TILE, TILE).transpose(1, 2).reshape(-1, TILE * TILE)

    def _unblock(self, b: torch.Tensor, shape) -> torch.Tensor:
        if not self.params["tile"]:
            return b.reshape(shape)
        rows, cols = shape
        return b.reshape(rows // TILE, cols // TILE, TILE, TILE).transpose(1, 2).reshape(rows, cols)

    def _tensor_scale(self, x: torch.Tensor, cap: float, mult: float) -> torch.Tensor:
        return divide(absmax(x) * mult, self.top * cap).clamp_min(1e-30)

    def _encode(self, xg, wanted, tensor_scale, up: bool):
        """(values, per-block scale) for block scales `wanted`, stored as E4M3 codes under `tensor_scale`."""
        code = (wanted / tensor_scale).clamp(max=E4M3_MAX)
        block = code.to(torch.float8_e4m3fn).float()
        if up:  # E4M3 steps are at most 1/8 relative: 9/8 of the wanted code rounds to one at or above it
            block = torch.where(block >= code, block, (code * 1.125).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float())
        scale = block * tensor_scale
        stored = scale > 0  # an all-zero block stores zeros
        y = self.round(xg / torch.where(stored, scale, 1.0)).mul_(torch.where(stored, scale, 0.0))
        return y, torch.where(stored, scale, 1.0)

    def quantize(self, x, keep, unpruned=None, tolerance=True):
        if self.params["scale"] != "absmax":  # rms, opt, ...: the scaled quantizers' own rule, stored as E4M3
            return super().quantize(x, keep, unpruned, tolerance)
        xg = self._blocks(x)
        w = None if keep is None else self._blocks(keep).to(xg.dtype)
        source = xg if w is None else xg * w
        if self.params["scale_from"] == "row" and unpruned is not None:
            source = self._blocks(unpruned)
        mult, four_six = float(self.params["scale_mult"]), self.params["four_over_six"]
        tensor_scale = self._tensor_scale(x if unpruned is None else unpruned, FOUR_OVER_SIX_CAP if four_six else E4M3_MAX,
                                          mult)
        amax = absmax(source, dim=-1)
        # stochastic rounding rounds a plain scale up (no value clips); with scale_mult the headroom is the user's
        up = self.params["rounding"] == "stochastic" and mult == 1.0
        y, scale = self._encode(xg, divide(amax * mult, self.top), tensor_scale, up)
        if four_six:  # the block's maximum mapped to 4 instead of 6: the scale times 1.5, kept where it errs less
            y4, scale4 = self._encode(xg, divide(amax * mult * 1.5, self.top), tensor_scale, up)
            ones = torch.ones(xg.shape[-1], 1, dtype=xg.dtype, device=xg.device)  # block sums as a matrix product:
            err6, err4 = (((v - xg).square_() if w is None else (v - xg).square_() * w) @ ones for v in (y, y4))
            better = err4 < err6  # torch's sum along a dimension of 16 is several times slower
            y, scale = y.where(~better, y4), scale.where(~better, scale4)
        if w is not None:
            y = y * w
        radius = self._unblock((self.half_gap * scale).expand_as(xg), x.shape) if tolerance else None
        return self._unblock(y, x.shape), radius

    def exact_mse(self):
        raise SpecError(f"exact GMSE is not available for '{self.spec}' (E4M3 scales): use Monte Carlo")


class Eden(NVFP4):
    """Quartet II's MS-EDEN (module docstring): nearest rounding, then the block scales corrected per `group` values
    by |x|^2 / <x, Q(x)> and rounded stochastically between E4M3 neighbours."""

    rounds = True

    def __init__(self, **kw):
        group = kw.pop("group", 128)
        super().__init__("eden", extra={}, **kw)
        if not isinstance(group, int) or isinstance(group, bool) or group < 16 or group % 16:
            raise SpecError(f"eden: group (the values one correction covers) must be a multiple of 16, got {group!r}")
        self.correction_group = group
        if self.params["tile"] or self.params["four_over_six"] or self.params["rounding"] != "nearest":
            raise SpecError("eden: its randomness is in the scales; tile, four_over_six and rounding do not apply")

    @property
    def spec(self):
        base = super().spec
        if self.correction_group == 128:
            return base
        inner = base[len("eden("):-1] if base.startswith("eden(") else ""
        return f"eden({','.join(filter(None, [f'group={self.correction_group}', inner]))})"

    def check_shape(self, shape):
        if shape[-1] % self.correction_group:
            raise SpecError(f"{self.spec}: last dimension {shape[-1]} is not a multiple of group {self.correction_group}")

    def quantize(self, x, keep, unpruned=None, tolerance=True):
        if keep is not None:
            raise SpecError("eden: follows no sparsity step (its correction needs every value of a group)")
        self.check_shape(x.shape)
        mult = float(self.params["scale_mult"])
        xg = self._groups(x)
        tensor_scale = self._tensor_scale(x, EDEN_CAP, mult)
        amax = absmax(xg, dim=-1)
        _, scale = self._encode(xg, divide(amax * mult, self.top), tensor_scale, up=False)
        u = xg / scale
        q = round_e2m1(u.clone())
        per = self.correction_group // 16
        uq = (u * q).reshape(-1, per * 16).sum(-1, keepdim=True)
        uu = (u * u).reshape(-1, per * 16).sum(-1, keepdim=True)
        correction = torch.where(uq > 0, uu / uq.clamp_min(1e-30), torch.ones_like(uq))
        block = (scale / tensor_scale).reshape(-1, per) * correction
        corrected = round_e4m3_stochastic(block).reshape(-1, 1) * tensor_scale
        y = q * corrected
        return y.reshape(x.shape), (self.half_gap * corrected).expand_as(xg).reshape(x.shape) if tolerance else None


class RandomHadamard(Component):
    """rht(block=B): random +-1 signs, then a block Hadamard; the rest of the chain; then the inverse. The signs are
    drawn afresh on every call (torch's generator), one vector of B for every block, as NVIDIA's and Quartet II's
    recipes do."""

    name = "rht"
    defaults = {"block": 16}
    keeps_bits = True
    rotates_itself = True  # the recipe adds no rotation of its own around a format that brings one

    def __init__(self, block=16):
        super().__init__(block=block)
        if not isinstance(block, int) or isinstance(block, bool) or block < 1 or block & (block - 1):
            raise SpecError(f"rht: block must be a power of two, got {block!r}")

    def apply(self, x, keep, inner):
        block = math.gcd(self.params["block"], x.shape[-1] & -x.shape[-1])
        signs = torch.randint(0, 2, (block,), device=x.device).to(x.dtype).mul_(2).sub_(1).repeat(x.shape[-1] // block)
        return fwht(inner(fwht(x * signs, block), None), block) * signs
