"""Decisions from a fit: for a budget, the loss-optimal (format, N, D) of each format, ranked, with intervals.

A budget is model memory (parameters x the weight format's bits per value, scales included), training compute
(6 N D FLOPs, divided by a format's speed-up where the user's hardware has one), a token count (the data there
is), or several. Under the decoupled law loss = A (N eff)^-alpha + B D^-beta + E the optimum is closed-form:
with compute C and speed-up s, D = C s / (6 N) and the unconstrained optimum is

    N* = (alpha A eff^-alpha (C s / 6)^beta / (beta B))^(1 / (alpha + beta));

a memory budget caps N, a token budget caps D (so N is at least C s / (6 T)), and the loss is unimodal in
log N, so clipping N* to those bounds is optimal. Every bootstrap replicate is solved the same way, which
gives the intervals on each format's loss and the share of replicates in which each format is the best.

Formats never trained get their efficiency from rho(GMSE) at the published constants (reference section 1):
their intervals then cover the law's uncertainty, not the capacity's.

Under a law whose cost depends on tokens per parameter (drift, qat-error) there is no closed form: each format's
loss is minimised over a fine grid of log N within the same bounds, for the fit and every replicate, through the
law's own predictions; such a law plans only the formats it fitted.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from capscale.capacity import InputError, bits_of, pair_rho, spec_gmse
from capscale.capacity.paths import strict_json
from capscale.capacity.results import Summary
from capscale.capacity.runtable import split_label

from .laws import DecoupledLaw, law_loss
from .names import eff_key

FITTED, PUBLISHED_RHO = "fitted", "rho(GMSE), published constants"
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15, "e": 1e18,
          "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_amount(text, what: str) -> float:
    """'4GB', '4 GiB', '1e20', '500M' -> a positive number (decimal units; KiB/MiB/GiB binary)."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?\d+)?)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in _UNITS:
        raise InputError(f"{what}: expected a positive number with an optional unit (4GB, 512MiB, 1e20), got {text!r}")
    try:
        value = float(match.group(1)) * _UNITS[match.group(2)]
    except ValueError:
        raise InputError(f"{what}: expected a positive number, got {text!r}") from None
    if not 0 < value < math.inf:
        raise InputError(f"{what}: expected a positive number, got {text!r}")
    return value


def parse_speedups(pairs) -> dict:
    """['int4/int4=2', ...] -> {label: 2.0}; the number follows the last '=' (specs may hold '=' themselves)."""
    out = {}
    for pair in pairs or []:
        label, sep, value = str(pair).rpartition("=")
        if not sep or not label.strip():
            raise InputError(f"--speedup {pair!r}: expected FORMAT=FACTOR, e.g. int4/int4=2")
        out[label.strip()] = parse_amount(value, f"--speedup {pair!r}")
    return out


@dataclass(frozen=True)
class Budget:
    memory: float | None = None   # bytes of weights
    flops: float | None = None    # training FLOPs (6 N D, before a format's speed-up)
    tokens: float | None = None   # training tokens available

    def __post_init__(self):
        if self.flops is None and (self.memory is None or self.tokens is None):
            raise InputError("a budget needs compute (--flops), or memory and tokens (--weight-memory with --tokens): a "
                             "memory budget alone leaves the number of training tokens free")
        for name in ("memory", "flops", "tokens"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise InputError(f"budget {name}: expected a positive number, got {value!r}")

    def describe(self) -> str:
        parts = [f"{self.memory / 1e9:.3g} GB of weights" if self.memory else "",
                 f"{self.flops:.3g} FLOPs" if self.flops else "", f"{self.tokens:.3g} tokens" if self.tokens else ""]
        return ", ".join(p for p in parts if p)


def optimum(p: dict, eff, bits, speedup, budget: Budget):
    """(N, D, loss) at the budget for law constants `p` (numbers or arrays over replicates): closed form."""
    alpha, beta = np.asarray(p["alpha"], float), np.asarray(p["beta"], float)
    n_max = 8 * budget.memory / bits if budget.memory else np.inf
    if budget.flops:
        compute = budget.flops * speedup / 6.0
        n_star = (alpha * p["A"] * eff ** -alpha * compute ** beta / (beta * p["B"])) ** (1 / (alpha + beta))
        n_floor = compute / budget.tokens if budget.tokens else 0.0
        n = np.minimum(n_max, np.maximum(n_star, n_floor))
        d = np.minimum(budget.tokens or np.inf, compute / n)
    else:
        n, d = np.broadcast_to(n_max, alpha.shape).astype(float), np.full(alpha.shape, float(budget.tokens))
    return n, d, law_loss(p, n, d, eff)


N_GRID = 513            # points of the log-N grid a token-dependent law is minimised on
RATIO_RANGE = (1e-2, 1e5)  # tokens per parameter the grid spans under a compute budget


def numeric_optimum(law, values_list, label: str, bits: float, speedup: float, budget: Budget):
    """(N, D, loss) arrays over `values_list` (the fit's values, then each replicate's): the grid minimum of the
    law's own prediction under the budget's caps (module docstring)."""
    n_max = 8 * budget.memory / bits if budget.memory else np.inf
    if budget.flops:
        compute = budget.flops * speedup / 6.0
        lo = max(np.sqrt(compute / RATIO_RANGE[1]), compute / budget.tokens if budget.tokens else 0.0)
        hi = min(np.sqrt(compute / RATIO_RANGE[0]), n_max)
        n = np.geomspace(lo, max(hi, lo), N_GRID)
        d = np.minimum(budget.tokens or np.inf, compute / n)
    else:
        n, d = np.array([n_max]), np.array([float(budget.tokens)])
    grid = pd.DataFrame({"format": label, "params": n, "tokens": d})
    out = []
    for values in values_list:
        loss = law.predict_values(values, grid)
        i = int(np.nanargmin(loss)) if np.isfinite(loss).any() else 0
        out.append((n[i], d[i], loss[i]))
    return tuple(np.array(v) for v in zip(*out))


def _published_eff(label: str) -> float:
    try:
        return pair_rho(*map(spec_gmse, split_label(label)))  # an uncompressed side has GMSE 0
    except InputError as err:
        raise InputError(f"format {label!r} is not in the fit, and capscale cannot compute its capacity: {err}") from None


class Plan:
    """The loss-optimal (N, D) of each format at one budget. `table`: one row per format, best first (point loss,
    its interval, the share of replicates where the format is best); `wins`: the share of replicates in which the
    row's format has a lower loss than the column's."""

    def __init__(self, budget: Budget, table: pd.DataFrame, wins: pd.DataFrame | None, level: float, replicates: int):
        self.budget, self.table, self.wins, self.level, self.replicates = budget, table, wins, level, replicates

    @property
    def best(self) -> str:
        return self.table.index[0]

    def verdict(self) -> str:
        t = self.table
        first = t.iloc[0]
        text = (f"At {self.budget.describe()}, under the {first['law']} law, {self.best} gives the lowest predicted loss, "
                f"{first['loss']:.4g}"
                + (f" [{first['loss_lo']:.4g}, {first['loss_hi']:.4g}]" if np.isfinite(first["loss_lo"]) else "")
                + f", with N = {first['params']:,.0f} and D = {first['tokens']:,.0f}")
        if self.wins is not None and len(t) > 1:
            runner = t.index[1]
            text += (f"; it beats {runner} in {self.wins.loc[self.best, runner]:.0%} of {self.replicates} bootstrap "
                     f"replicates and is the best format in {first['p_best']:.0%}")
        if t.iloc[0]["extrapolated"]:
            text += f". Extrapolated: {t.iloc[0]['extrapolated']}"
        return text + "."

    def summary(self) -> Summary:
        return Summary(f"plan at {self.budget.describe()}",
                       [("verdict", self.verdict()), ("bootstrap", f"{self.replicates} replicates, {self.level:.0%} intervals")],
                       self.table.reset_index())

    def as_json(self) -> dict:
        return strict_json({"budget": {"memory_bytes": self.budget.memory, "flops": self.budget.flops,
                                       "tokens": self.budget.tokens},
                            "level": self.level, "replicates": self.replicates, "verdict": self.verdict(),
                            "formats": self.table.reset_index().to_dict(orient="records"),
                            "wins": None if self.wins is None else self.wins.to_dict()})

    def __repr__(self) -> str:
        return f"<Plan at {self.budget.describe()}: best {self.best}>"


def _range_note(n, d, runs) -> str:
    notes = []
    for value, column, what in ((n, "params", "N"), (d, "tokens", "D")):
        lo, hi = runs[column].min(), runs[column].max()
        if value > hi * 1.0001 or value < lo * 0.9999:
            notes.append(f"{what} = {value:.3g} outside the fitted {lo:.3g}-{hi:.3g}")
    ratio = runs["tokens"] / runs["params"]
    if not ratio.min() * 0.9999 <= d / n <= ratio.max() * 1.0001:
        notes.append(f"D/N = {d / n:.3g} tokens per parameter outside the fitted {ratio.min():.3g}-{ratio.max():.3g}")
    return "; ".join(notes)


def plan(fit, budget: Budget, formats=None, speedup: dict | None = None) -> Plan:
    """The loss-optimal (format, N, D) at `budget` for each of `formats` (default: every fitted format; labels
    the fit does not know get rho(GMSE) at the published constants), under `fit`'s decoupled law."""
    law = fit.law
    if not hasattr(law, "predict_values"):
        raise InputError(f"plan needs a law that predicts any (N, D) of a format (decoupled, drift, qat-error); this "
                         f"fit is of the {law.name} law")
    closed_form = type(law) is DecoupledLaw
    speedup = dict(speedup or {})
    formats = list(formats) if formats else list(law.eff_)
    unknown = sorted(set(speedup) - set(formats))
    if unknown:
        raise InputError(f"--speedup names format(s) not planned: {unknown}; planned: {formats}")
    bits_by_label = fit.runs.groupby("format")["w_bits"].first() if "w_bits" in fit.runs else pd.Series(dtype=float)
    samples = fit.boot.samples if fit.boot is not None and len(fit.boot.samples) else None
    rows, draws = [], {}
    for label in formats:
        fitted = label in law.eff_
        if not fitted and not closed_form:
            raise InputError(f"format {label!r} is not in the fit: the {law.name} law plans only the formats it fitted "
                             "(their cost's dependence on D/N is fitted, not known for others)")
        eff = law.eff_[label] if fitted else _published_eff(label)
        bits = float(bits_by_label.get(label, np.nan)) if fitted else bits_of(split_label(label)[0])
        if not np.isfinite(bits) and budget.memory:
            raise InputError(f"format {label!r}: its bits per value are unknown (give a w_bits column), so its "
                             "memory cannot be counted")
        s = float(speedup.get(label, 1.0))
        if closed_form:
            n, d, loss = (float(v) for v in optimum(law.params_, eff, bits, s, budget))
        else:
            n, d, loss = (float(v[0]) for v in numeric_optimum(law, [law.values()], label, bits, s, budget))
        lo = hi = np.nan
        if samples is not None:
            if closed_form:
                e = samples[eff_key(label)].to_numpy(float) if fitted else eff
                draws[label] = optimum({k: samples[k].to_numpy(float) for k in ("A", "B", "E", "alpha", "beta")},
                                       e, bits, s, budget)[2]
            else:
                draws[label] = numeric_optimum(law, [r for _, r in samples.iterrows()], label, bits, s, budget)[2]
            lo, hi = np.nanquantile(draws[label], fit.boot.tails())
        rows.append({"format": label, "law": law.name, "efficiency_from": FITTED if fitted else PUBLISHED_RHO, "eff": eff,
                     "bits": bits, "speedup": s, "params": n, "tokens": d, "memory_bytes": n * bits / 8,
                     "flops": 6 * n * d / s, "loss": loss, "loss_lo": lo, "loss_hi": hi,
                     "extrapolated": _range_note(n, d, fit.runs)})
    table = pd.DataFrame(rows).set_index("format")
    wins = None
    if draws:
        matrix = np.vstack([draws[f] for f in table.index])          # formats x replicates
        best = np.nanargmin(matrix, axis=0)
        table["p_best"] = [(best == i).mean() for i in range(len(table))]
        wins = pd.DataFrame((matrix[:, None, :] < matrix[None, :, :]).mean(axis=2), index=table.index,
                            columns=table.index)
    else:
        table["p_best"] = np.nan
    order = table.sort_values("loss").index
    table = table.loc[order]
    table.insert(0, "rank", range(1, len(table) + 1))
    return Plan(budget, table, None if wins is None else wins.loc[order, order], fit.level,
                0 if samples is None else len(samples))


def plan_curves(fit, budgets, vary: str, base: Budget, formats=None, speedup=None) -> pd.DataFrame:
    """Loss at the optimum against one budget (`vary`: memory, flops or tokens) with the others held at `base`:
    one row per (format, budget), and `envelope` marking the best format at each budget."""
    if vary not in ("memory", "flops", "tokens"):
        raise InputError(f"vary: expected memory, flops or tokens, got {vary!r}")
    frames = []
    for value in budgets:
        budget = Budget(**{**base.__dict__, vary: float(value)})
        t = plan(fit, budget, formats, speedup).table.reset_index()
        t["budget"] = float(value)
        t["envelope"] = t["rank"] == 1
        frames.append(t)
    out = pd.concat(frames, ignore_index=True)
    out.attrs["vary"] = vary
    return out
