"""Vector quantization: k-means codebooks for N(0, I) in `dim` dimensions at `bits` per value."""
from __future__ import annotations

import functools
import sys

import numpy as np
import torch

from .errors import SpecError
from .quantizers import ScaledQuantizer
from .paths import atomic_write, cache_dir

MAX_CODEWORDS = 1024  # a 1024-word codebook takes ~1-2 min to build on 2 cores (once; cached), 4096 ~10 min
TRAIN_VECTORS = 1 << 18
CHUNK = 16384  # vectors per nearest-codeword block: memory is CHUNK x codewords, never n x codewords


@functools.lru_cache(maxsize=None)
def gaussian_codebook(dim: int, codewords: int) -> torch.Tensor:
    """k-means codebook of a standard Gaussian: deterministic (fixed sample and seed), so it is computed
    once (seconds) and cached on disk under `cache_dir()`."""
    path = cache_dir() / f"vq-gaussian-d{dim}-k{codewords}-n{TRAIN_VECTORS}.npy"
    if path.is_file():
        try:
            cached = np.load(path, allow_pickle=False)
            if cached.shape == (codewords, dim) and np.all(np.isfinite(cached)):
                return torch.tensor(cached, dtype=torch.float32)
        except (OSError, ValueError):
            pass  # damaged: rebuilt below and replaced
    print(f"building the {dim}-dimensional Gaussian codebook of {codewords} codewords (k-means, once: up to "
          f"{max(1, codewords * dim // 256)} min on 2 cores; cached in {path.parent})", file=sys.stderr, flush=True)
    rng = np.random.default_rng(12345)
    sample = rng.standard_normal((max(TRAIN_VECTORS, 64 * codewords), dim))
    from sklearn.cluster import KMeans  # only when a codebook is built (then cached on disk)
    km = KMeans(n_clusters=codewords, n_init=1, random_state=0, max_iter=300, tol=1e-6).fit(sample)
    atomic_write(path, lambda f: np.save(f, km.cluster_centers_))
    return torch.tensor(km.cluster_centers_, dtype=torch.float32)


def nearest_codeword(v: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codeword for each row of v, in bounded-memory chunks."""
    cb = codebook.to(v.device)
    cb_sq = (cb * cb).sum(1)
    out = torch.empty(v.shape[0], dtype=torch.long, device=v.device)
    for start in range(0, v.shape[0], CHUNK):
        chunk = v[start:start + CHUNK]
        out[start:start + CHUNK] = (cb_sq - 2 * chunk @ cb.T).argmin(1)
    return out


class VectorQuantizer(ScaledQuantizer):
    """Groups of `dim` consecutive values (last dim) rounded to the nearest of 2^(dim*bits) codewords."""

    name = "vq"
    defaults = {"dim": 2, "bits": 4, "group": "row", "scale": "rms", "scale_format": None}
    gaussian_scale = 1.0  # the codebook is fitted to unit-variance data

    def __init__(self, **params):
        super().__init__(**params)
        if self.params["rounding"] != "nearest":
            raise SpecError("vq: rounding=stochastic is not defined for a codebook (scalar grids and MX/NV formats have it)")
        dim, bits = self.params["dim"], self.params["bits"]
        if not (isinstance(dim, int) and not isinstance(dim, bool) and 1 <= dim <= 16 and
                isinstance(bits, (int, float)) and not isinstance(bits, bool) and 0 < bits <= 12):
            raise SpecError(f"vq: dim must be a positive integer and bits positive, got dim={dim}, bits={bits}")
        codewords = 2 ** (dim * bits)
        if codewords != int(codewords) or not 2 <= codewords <= MAX_CODEWORDS:
            raise SpecError(f"vq: 2^(dim*bits) must be a whole number of codewords in [2, {MAX_CODEWORDS}], "
                            f"got {codewords}")
        group = self.params["group"]
        if isinstance(group, int) and group % dim:
            raise SpecError(f"vq: group {group} is not a multiple of dim {dim}")
        self.codewords = int(codewords)
        self.element_bits = float(bits)

    @property
    def codebook(self) -> torch.Tensor:
        """Built on first use, not when the spec is parsed: parsing, bits and listing never wait for k-means."""
        return gaussian_codebook(self.params["dim"], self.codewords)

    @property
    def top(self) -> float:
        return float(self.codebook.abs().max())

    @property
    def spec(self):
        shown = [f"{k}={v}" for k, v in self.params.items() if k in ("dim", "bits") or v != self.defaults[k]]
        return "vq(" + ",".join(shown) + ")"

    def round(self, u):
        dim = self.params["dim"]
        if u.shape[-1] % dim:
            raise SpecError(f"{self.spec}: {u.shape[-1]} values per group is not a multiple of dim {dim}")
        vectors = u.reshape(-1, dim)
        return self.codebook.to(u.device)[nearest_codeword(vectors, self.codebook)].reshape(u.shape)
