"""Do capacities compose? eff(combined) against eff(part 1) x eff(part 2), on runs or on a capacity grid.

Runs: a weights x activations label `W/A` is composed of `W` (weights only) and `bf16/A` (activations
only); a chained spec `S+Q` (e.g. `2:4+int4`) of `S` and `Q`. The ratio eff(comb) / (eff(p1) eff(p2))
gets a bootstrap interval, and composition holds where 1 lies inside it.
Grid: a table of capacities (rows x columns, like the reference `capacity_*.csv`) is predicted from its
edges (the row and column where the other part is uncompressed, found at the largest cell) and compared
with the best rank-1 fit.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from capscale.capacity import BASELINE
from capscale.capacity.runtable import format_label, split_label

from .bootstrap import BootstrapResult
from .runs import RunTableError
from .names import eff_key


def composite_parts(label: str, labels: set) -> tuple[str, str] | None:
    """The two trained parts of a combined label, or None."""
    if "/" in label:
        w, a = split_label(label)
        if a is None:  # a '/' that does not separate two specs: one label, no parts
            return None
        parts = (w, format_label(None, a))
        if w != BASELINE and all(p in labels for p in parts):
            return parts
    elif "+" in label:
        head, tail = label.split("+", 1)
        if head in labels and tail in labels:
            return head, tail
    return None


def compose_runs(eff: dict, boot: BootstrapResult | None) -> pd.DataFrame:
    labels = set(eff)
    rows = []
    for label in eff:
        parts = composite_parts(label, labels)
        if parts is None:
            continue
        ratio = eff[label] / (eff[parts[0]] * eff[parts[1]])
        lo = hi = np.nan
        if boot is not None and len(boot.samples):
            s = boot.samples
            draws = s[eff_key(label)] / (s[eff_key(parts[0])] * s[eff_key(parts[1])])
            lo, hi = draws.quantile(list(boot.tails()))
        rows.append({"combined": label, "part1": parts[0], "part2": parts[1], "eff_combined": eff[label],
                     "eff_part1": eff[parts[0]], "eff_part2": eff[parts[1]],
                     "product": eff[parts[0]] * eff[parts[1]], "ratio": ratio, "ratio_lo": lo, "ratio_hi": hi,
                     "composes": bool(lo <= 1 <= hi) if np.isfinite(lo) else None})
    return pd.DataFrame(rows)


def read_grid(path: "str | Path") -> pd.DataFrame:
    try:
        grid = pd.read_csv(path, index_col=0)
    except (OSError, ValueError) as err:
        raise RunTableError(f"{path}: cannot read capacity grid: {err}") from None
    if grid.shape[0] < 2 or grid.shape[1] < 2:
        raise RunTableError(f"{path}: a capacity grid needs at least 2 rows and 2 columns of values (a header row "
                            f"of column labels, then one row per label); got {grid.shape[0]} x {grid.shape[1]}")
    with open(path, newline="") as f:  # pandas renames a repeated column (a, a.1): the header as written
        header = pd.Index(next(csv.reader(f))[1:])
    for labels, what in ((grid.index, "row"), (header, "column")):
        if labels.duplicated().any():
            raise RunTableError(f"{path}: {what} label {labels[labels.duplicated()][0]!r} appears twice")
    bad = grid.apply(pd.to_numeric, errors="coerce").isna()
    if bad.any().any():
        row, col = bad.stack()[bad.stack()].index[0]
        raise RunTableError(f"{path}: row '{row}', column '{col}': expected a number, got {grid.at[row, col]!r}")
    grid = grid.astype(float)
    if not np.all(np.isfinite(grid.to_numpy())) or (grid.to_numpy() <= 0).any():
        raise RunTableError(f"{path}: capacities must be positive finite numbers")
    grid.index, grid.columns = grid.index.astype(str), grid.columns.astype(str)  # labels as the user types them
    return grid


def compose_grid(grid: pd.DataFrame, edge_row=None, edge_col=None) -> dict:
    """Product-of-edges prediction, best rank-1 fit, element-wise errors and the worst cell of a grid."""
    values = grid.to_numpy(float)
    r0, c0 = np.unravel_index(np.argmax(values), values.shape)
    for edge, labels, what in ((edge_row, grid.index, "row"), (edge_col, grid.columns, "column")):
        if edge is not None and edge not in labels:
            raise RunTableError(f"--edge-{what} {edge!r}: the grid has no such {what}; {what}s are {list(labels)}")
    r0 = grid.index.get_loc(edge_row) if edge_row is not None else r0
    c0 = grid.columns.get_loc(edge_col) if edge_col is not None else c0
    product = np.outer(values[:, c0], values[r0, :]) / values[r0, c0]
    u, s, vt = np.linalg.svd(values)
    rank1 = s[0] * np.outer(u[:, 0], vt[0])
    err = product - values
    worst = np.unravel_index(np.argmax(np.abs(err)), err.shape)
    frame = lambda a: pd.DataFrame(a, index=grid.index, columns=grid.columns)  # noqa: E731
    return {"edge_row": grid.index[r0], "edge_col": grid.columns[c0], "observed": grid,
            "product": frame(product), "rank1": frame(rank1), "error": frame(err),
            "max_abs_error": float(np.abs(err).max()), "rms_error": float(np.sqrt(np.mean(err ** 2))),
            "rank1_rms_error": float(np.sqrt(np.mean((rank1 - values) ** 2))),
            "worst_cell": (str(grid.index[worst[0]]), str(grid.columns[worst[1]]), float(values[worst]),
                           float(product[worst]))}


def grid_summary(result: dict) -> str:
    r, c, obs, pred = result["worst_cell"]
    return (f"edges: row '{result['edge_row']}', column '{result['edge_col']}' (the other part uncompressed)\n"
            f"product-of-edges prediction:\n{result['product'].round(3).to_string()}\n"
            f"error (prediction - observed): max |error| {result['max_abs_error']:.3f}, RMS {result['rms_error']:.3f}; "
            f"best rank-1 fit RMS {result['rank1_rms_error']:.3f}\n"
            f"worst cell: row '{r}', column '{c}': observed {obs:.2f}, predicted {pred:.3f}")
