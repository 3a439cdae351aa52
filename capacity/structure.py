"""Components that change which values are stored or how they are laid out: sparsity, outliers, rotation.

Each wraps the rest of the chain (`inner`): sparsity zeroes entries and lets what follows quantize only
the kept ones; outlier extraction keeps the largest entries exactly; a Hadamard rotation acts on the
rotated tensor and rotates back.
"""
from __future__ import annotations

import functools
import math

import torch

from . import level_sets
from .errors import SpecError
from .formats import Component

INDEX_BITS = 32     # position of an outlier
OUTLIER_BITS = 16   # value of an outlier (fp16)


def _binary_entropy(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def magnitude_mask(x: torch.Tensor, keep: torch.Tensor | None, drop_fraction: float) -> torch.Tensor:
    """Mask that keeps all but the smallest `drop_fraction` (by magnitude) of the currently kept entries."""
    mag = x.abs() if keep is None else torch.where(keep, x.abs(), torch.full_like(x, -1.0))
    n_kept = x.numel() if keep is None else int(keep.sum())
    n_drop = int(round(drop_fraction * n_kept)) + (x.numel() - n_kept)
    if n_drop <= 0:
        return torch.ones_like(x, dtype=torch.bool)
    threshold = mag.flatten().kthvalue(n_drop).values
    return mag > threshold


class _FractionComponent(Component):
    """A component with one positional parameter, a fraction in [0, 1), always shown in its spec."""

    def __init__(self, fraction=None):
        fraction = self.defaults["fraction"] if fraction is None else fraction
        super().__init__(fraction=fraction)
        if not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
            raise SpecError(f"{self.name}: fraction must be in [0, 1), got {fraction!r}")

    @property
    def spec(self):
        return f"{self.name}({self.params['fraction']})"


class Sparse(_FractionComponent):
    """Unstructured magnitude sparsity over the whole tensor; mask storage counted at its entropy H(s)."""

    name = "sparse"
    defaults = {"fraction": 0.5}

    def keep_mask(self, x, keep):
        mask = magnitude_mask(x, keep, self.params["fraction"])
        return mask if keep is None else mask & keep

    def prune_threshold(self, x, keep):
        """The forward's threshold: the largest pruned magnitude of the whole tensor (per-layer top-k)."""
        pruned = torch.where(keep, torch.zeros_like(x), x.abs())
        return pruned.amax().expand_as(x)

    def apply(self, x, keep, inner):
        mask = self.keep_mask(x, keep)
        return inner(x * mask, mask) * mask

    def bits(self, inner_bits):
        s = self.params["fraction"]
        return _binary_entropy(s) + (1 - s) * inner_bits

    def exact_mse(self):
        return level_sets.sparsity_mse(self.params["fraction"])


MAX_GROUP = 1024  # N:M groups beyond this are unstructured sparsity in practice (and their index bits explode)


class NMSparse(Component):
    """N:M structured sparsity along the last dim: N of every M consecutive values are kept, chosen as whole
    vectors of `vector` values by L2 norm (vector=1: the N largest values, as in 2:4; QuEST's 4:8 over pairs
    keeps the 2 pairs of largest norm of every 4)."""

    defaults = {"vector": 1}

    def __init__(self, n: int, m: int, vector: int = 1):
        super().__init__(vector=vector)
        if not (isinstance(n, int) and isinstance(m, int) and 1 <= n <= m <= MAX_GROUP):
            raise SpecError(f"N:M sparsity needs integers 1 <= N <= M <= {MAX_GROUP}, got {n}:{m}")
        if not isinstance(vector, int) or isinstance(vector, bool) or vector < 1 or n % vector or m % vector:
            raise SpecError(f"{n}:{m}: vector must be a positive integer dividing N and M, got {vector!r}")
        self.n, self.m, self.vector = n, m, vector
        self.name = f"{n}:{m}"

    def check_shape(self, shape):
        if shape[-1] % self.m:
            raise SpecError(f"{self.spec}: last dimension {shape[-1]} is not a multiple of {self.m}")

    def keep_mask(self, x, keep):
        self.check_shape(x.shape)
        mag = x.abs() if keep is None else torch.where(keep, x.abs(), torch.zeros_like(x))
        norms = mag.reshape(-1, self.m // self.vector, self.vector).pow(2).sum(-1)
        chosen = torch.zeros_like(norms, dtype=torch.bool)
        chosen.scatter_(1, norms.topk(self.n // self.vector, dim=1).indices, True)
        mask = chosen.unsqueeze(-1).expand(-1, -1, self.vector).reshape(x.shape)
        return mask if keep is None else mask & keep

    def prune_threshold(self, x, keep):
        """Per block, the largest magnitude pruned (the forward's own threshold), broadcast to x's shape."""
        pruned = torch.where(keep, torch.zeros_like(x), x.abs()).reshape(-1, self.m)
        return pruned.amax(-1, keepdim=True).expand(-1, self.m).reshape(x.shape)

    def apply(self, x, keep, inner):
        mask = self.keep_mask(x, keep)
        return inner(x * mask, mask) * mask

    def bits(self, inner_bits):
        vectors, kept = self.m // self.vector, self.n // self.vector
        index_bits = math.ceil(math.log2(math.comb(vectors, kept))) if kept < vectors else 0
        return index_bits / self.m + self.n / self.m * inner_bits


class Outliers(_FractionComponent):
    """Keep the largest `fraction` of values exactly (fp16 value + 32-bit index); the rest go on."""

    name = "outliers"
    defaults = {"fraction": 0.01}

    def apply(self, x, keep, inner):
        inliers = magnitude_mask(x, keep, 1 - self.params["fraction"]).logical_not()
        if keep is not None:
            inliers = inliers & keep
        outlier = ~inliers if keep is None else ~inliers & keep
        rest = inner(x * inliers, inliers)
        return torch.where(outlier, x, rest)

    def bits(self, inner_bits):
        return inner_bits + self.params["fraction"] * (OUTLIER_BITS + INDEX_BITS)


@functools.lru_cache(maxsize=None)
def _sylvester(size: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):  # a cached tensor must serve autograd too, wherever it was first asked for
        h = torch.ones(1, 1)
        while h.shape[0] < size:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h.to(device=device, dtype=dtype)


def hadamard_matrix(block: int) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix H_b / sqrt(b) (symmetric, its own inverse), float32 on CPU."""
    return _sylvester(block, "cpu", torch.float32).clone() / math.sqrt(block)


DENSE_HADAMARD_BELOW = 256


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform over blocks of the last dim (its own inverse).

    Radix-sqrt(b) form of the butterfly: H_b = H_b1 (x) H_b2 with b1 b2 = b, so a block X (b1 x b2) maps to
    H_b1 X H_b2: O(b (b1 + b2)) work in two BLAS passes instead of log2(b) memory passes of 2-point butterflies.
    Below 256 a single dense product with H_b is cheaper still (one BLAS pass; measured in benchmarks/).
    """
    if block < DENSE_HADAMARD_BELOW:
        return (x.reshape(-1, block) @ _sylvester(block, str(x.device), x.dtype)).reshape(x.shape) / math.sqrt(block)
    b1 = 2 ** (block.bit_length() // 2)  # 2^ceil(log2(b) / 2)
    b2 = block // b1
    y = x.reshape(-1, b1, b2)
    y = _sylvester(b1, str(x.device), x.dtype) @ y @ _sylvester(b2, str(x.device), x.dtype)
    return y.reshape(x.shape) / math.sqrt(block)


class Hadamard(Component):
    """Block Hadamard rotation around what follows (`hadamard+int4`): rotate, compress, rotate back.

    The block is the largest power of two dividing both `block` and the last dimension.
    """

    name = "hadamard"
    defaults = {"block": 128}

    def __init__(self, block=128):
        super().__init__(block=block)
        if not isinstance(block, int) or block < 1 or block & (block - 1):
            raise SpecError(f"hadamard: block must be a power of two, got {block!r}")

    def block_for(self, dim: int) -> int:
        return math.gcd(self.params["block"], dim & -dim)

    def apply(self, x, keep, inner):
        block = self.block_for(x.shape[-1])
        return fwht(inner(fwht(x, block), None), block)
