"""The capacity frontier of format designs: within a family, which design has the most capacity per bit?

A family is a spec with brace ranges, expanded as a shell does: `int{2..8}(group={32,64,128,row})` is 28 specs.
Each design's Gaussian MSE is exact where the format allows it, Monte Carlo (with its standard error)
otherwise, and cached on disk, so a family re-run is instant. Capacity is rho(GMSE) at the published constants
(or constants the user gives); the bound is Shannon's: no code of R bits per value has a Gaussian MSE below
2^(-2R), so no design's capacity exceeds rho(2^(-2R)). `bits_over_shannon` = R - R(D), the rate the design
spends beyond the rate-distortion function at its own distortion, says how far from the bound it is.
"""
from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from capscale.capacity import InputError, gmse_auto, rho
from capscale.capacity.rho import RHO_C, RHO_F, RHO_L
from capscale.capacity.paths import atomic_write, cache_dir, strict_json
from capscale.capacity.results import Summary

from .names import FRONTIER_FAMILIES

MAX_DESIGNS = 5000              # per call: a family is untrusted text, and braces multiply
DEFAULT_SAMPLES = 1 << 18       # Monte Carlo values per design: a standard error of ~0.4% of the GMSE
CACHE_FILE = "frontier-gmse.json"
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand(family: str) -> list[str]:
    """The specs of a family: each `{a..b}` (integers) or `{x,y,...}` (alternatives) is expanded, left to
    right, every combination once, in order."""
    family = str(family).strip()
    if not family or len(family) > 1000:
        raise InputError(f"family {family[:60]!r}: expected a spec with brace ranges, at most 1000 characters")
    pieces, choices, last = [], [], 0
    for match in _BRACE.finditer(family):
        pieces.append(family[last:match.start()])
        body = match.group(1)
        span = re.fullmatch(r"\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*", body)
        if span:
            lo, hi = int(span.group(1)), int(span.group(2))
            if hi < lo or hi - lo >= MAX_DESIGNS:
                raise InputError(f"family {family!r}: range {{{body}}} must run upwards over at most {MAX_DESIGNS} values")
            choices.append([str(v) for v in range(lo, hi + 1)])
        else:
            options = [o.strip() for o in body.split(",")]
            if not all(options):
                raise InputError(f"family {family!r}: an empty alternative in {{{body}}}")
            choices.append(options)
        last = match.end()
    pieces.append(family[last:])
    if any(c in piece for piece in pieces for c in "{}"):
        raise InputError(f"family {family!r}: unbalanced or nested braces (write one level: int{{2..8}}(group={{32,64}}))")
    if math.prod(len(c) for c in choices) > MAX_DESIGNS:
        raise InputError(f"family {family!r} expands to more than {MAX_DESIGNS} designs")
    out = []
    for combo in itertools.product(*choices):
        out.append("".join(p + c for p, c in zip(pieces, combo)) + pieces[-1])
    return list(dict.fromkeys(out))


def _load_cache(path) -> dict:
    """Cached measurements {key: [gmse, stderr, bits, method]}; anything malformed is ignored (recomputed)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(raw, dict):
        return {}
    good = {}
    for key, v in raw.items():
        if (isinstance(v, list) and len(v) == 4 and all(isinstance(x, (int, float)) for x in v[:3])
                and v[3] in ("exact", "monte-carlo")):
            good[key] = v
    return good


def measure(specs, samples: int = DEFAULT_SAMPLES, seed: int = 0, cache: bool = True, progress: bool = True):
    """GMSE, its standard error, bits per value and method of each spec ({spec: tuple}), and the specs that do
    not parse ({spec: reason}). Cached under `cache_dir()` by spec, samples and seed."""
    from capscale import __version__
    path = cache_dir() / CACHE_FILE
    stored = _load_cache(path) if cache else {}
    results, skipped, fresh = {}, {}, 0
    for spec in tqdm(specs, desc="frontier: GMSE", unit="design", disable=not progress, leave=False):
        key = f"{spec}|{samples}|{seed}|{__version__}"
        if key in stored:
            results[spec] = tuple(stored[key])
            continue
        try:
            r = gmse_auto(spec, samples=samples, seed=seed)
        except InputError as err:
            skipped[spec] = str(err)
            continue
        results[spec] = stored[key] = (r.gmse, r.stderr, r.bits_per_value, r.method)
        fresh += 1
    if cache and fresh:
        try:
            atomic_write(path, lambda f: f.write(json.dumps(stored).encode()))
        except OSError:
            pass  # an unwritable cache costs a re-measurement next time, nothing else
    return results, skipped


def pareto(bits: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """True for designs no other design beats: none has at most its bits and more capacity, or fewer bits and at
    least its capacity."""
    order = np.lexsort((-capacity, bits))
    keep, best = np.zeros(len(bits), bool), -np.inf
    for i in order:
        if capacity[i] > best:
            keep[i], best = True, capacity[i]
    return keep


class Frontier:
    """`table`: one row per design (family, spec, bits, GMSE with its standard error, method, capacity, the
    Shannon bound's capacity at those bits, bits over Shannon, on_frontier); `skipped`: specs that do not parse."""

    def __init__(self, table: pd.DataFrame, skipped: dict, constants: dict):
        self.table, self.skipped, self.constants = table, skipped, constants

    @property
    def frontier(self) -> pd.DataFrame:
        return self.table[self.table["on_frontier"]].sort_values("bits")

    def at_bits(self, bits: float, tolerance: float = 0.51) -> pd.DataFrame:
        """Designs within `tolerance` bits of `bits`, best capacity first (the 4-bit frontier: at_bits(4))."""
        t = self.table
        return t[(t["bits"] - bits).abs() <= tolerance].sort_values("capacity", ascending=False)

    def summary(self) -> Summary:
        return Summary("capacity frontier: the designs no fewer bits beat",
                       [("rho constants", ", ".join(f"{k} = {v:.4g}" for k, v in self.constants.items())),
                        ("designs", f"{len(self.table)} measured, {int(self.table['on_frontier'].sum())} on the frontier"
                                    + (f"; {len(self.skipped)} skipped (do not parse)" if self.skipped else ""))],
                       self.frontier)

    def as_json(self) -> dict:
        return strict_json({"constants": self.constants, "designs": self.table.to_dict(orient="records"),
                            "skipped": self.skipped})


def frontier(families=None, samples: int = DEFAULT_SAMPLES, seed: int = 0, constants: dict | None = None,
             cache: bool = True, progress: bool = True) -> Frontier:
    """Measure every design of `families` (names of FRONTIER_FAMILIES or brace specs; default: all built-ins)."""
    constants = {"L": RHO_L, "F": RHO_F, "C": RHO_C, **(constants or {})}
    named = {}
    for family in families or list(FRONTIER_FAMILIES):
        text = FRONTIER_FAMILIES.get(family, family)
        for spec in expand(text):
            named.setdefault(spec, family)
    if len(named) > MAX_DESIGNS:
        raise InputError(f"{len(named)} designs: at most {MAX_DESIGNS} in one frontier")
    measured, skipped = measure(list(named), samples, seed, cache, progress)
    if not measured:
        raise InputError("no design of these families parses: " + "; ".join(f"{s}: {r}" for s, r in skipped.items()))
    rows = [{"family": named[s], "spec": s, "bits": b, "gmse": g, "stderr": se, "method": m}
            for s, (g, se, b, m) in measured.items()]
    table = pd.DataFrame(rows)
    table["capacity"] = rho(table["gmse"].to_numpy(), **constants)
    table["shannon_gmse"] = 2.0 ** (-2 * table["bits"])
    table["shannon_capacity"] = rho(table["shannon_gmse"].to_numpy(), **constants)
    table["bits_over_shannon"] = table["bits"] - (0.5 * np.log2(1 / table["gmse"].clip(lower=1e-300))).clip(lower=0)
    table["on_frontier"] = pareto(table["bits"].to_numpy(float), table["capacity"].to_numpy(float))
    return Frontier(table.sort_values(["bits", "capacity"], ascending=[True, False]).reset_index(drop=True),
                    skipped, constants)
