"""Figures for decisions: loss at the optimum against a budget per format (the envelope marked), and the capacity
frontier of format designs against bits per value with Shannon's bound."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .plots import WIDTH, label_points, plt

BUDGET_LABELS = {"memory": "weight memory (bytes)", "flops": "training compute (FLOPs)", "tokens": "training tokens D"}


def budget_curves(curves: pd.DataFrame, styles: pd.DataFrame | None = None, marked: float | None = None,
                  top: int = 6) -> plt.Figure:
    """Predicted loss at each format's optimum against the budget (`plan_curves`), with its interval band, and
    beneath it each format's gap to the best format at that budget (the envelope, at 0). Only the `top` formats
    at the marked budget are drawn, so that the lines stay readable."""
    vary = curves.attrs.get("vary", "memory")
    at = curves["budget"].unique()[np.abs(np.log(curves["budget"].unique() / (marked or curves["budget"].median()))).argmin()]
    ranked = curves[curves["budget"] == at].sort_values("rank")["format"].tolist()
    shown = ranked[:top]
    fig, (ax, gap_ax) = plt.subplots(2, 1, figsize=(WIDTH * 0.7, 6.4), sharex=True, height_ratios=(3, 2))
    palette = dict(zip(shown, plt.get_cmap("tab10").colors))
    best = curves.groupby("budget")["loss"].min()
    envelope = curves[curves["envelope"]].sort_values("budget")
    ax.plot(envelope["budget"], envelope["loss"], color="#cccccc", lw=7, solid_capstyle="round", zorder=1,
            label="best format (envelope)")
    for fmt in shown:
        rows = curves[curves["format"] == fmt].sort_values("budget")
        known = styles is not None and fmt in styles.index
        colour = styles.at[fmt, "color"] if known and len(shown) <= 3 else palette[fmt]
        marker = styles.at[fmt, "marker"] if known else "o"
        line = dict(color=colour, marker=marker, markersize=4, markevery=4, lw=1.5, zorder=3)
        ax.plot(rows["budget"], rows["loss"], label=fmt, **line)
        if rows["loss_lo"].notna().any():
            ax.fill_between(rows["budget"], rows["loss_lo"], rows["loss_hi"], color=colour, alpha=0.12, lw=0, zorder=2)
        gap_ax.plot(rows["budget"], rows["loss"].to_numpy() - best.loc[rows["budget"]].to_numpy(), **line)
    for axis in (ax, gap_ax):
        if marked:
            axis.axvline(marked, color="#555555", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set(ylabel="predicted loss at the optimum", title=f"Best loss per format at a {vary} budget")
    gap_ax.set(xlabel=BUDGET_LABELS[vary], ylabel="gap to the best format")
    hidden = len(ranked) - len(shown)
    ax.legend(fontsize=8, loc="upper right", frameon=True,
              title=f"best {len(shown)} of {len(ranked)} at the dotted budget" if hidden else None, title_fontsize=8)
    fig.tight_layout()
    return fig


def capacity_frontier(table: pd.DataFrame, constants: dict | None = None) -> plt.Figure:
    """Every design's capacity (error bars from Monte Carlo) against bits per value; the Pareto frontier joined
    and labelled; Shannon's bound rho(2^(-2R)) as a curve."""
    from capscale.capacity import rho
    fig, ax = plt.subplots(figsize=(WIDTH * 0.75, 5.2))
    families = list(dict.fromkeys(table["family"]))
    colours = dict(zip(families, plt.get_cmap("tab10").colors * 3))
    markers = dict(zip(families, "osD^vP*Xh<>" * 3))
    gmse_hi = table["gmse"] + 2 * table["stderr"]
    gmse_lo = (table["gmse"] - 2 * table["stderr"]).clip(lower=1e-12)
    cap_lo, cap_hi = rho(gmse_hi.to_numpy(), **(constants or {})), rho(gmse_lo.to_numpy(), **(constants or {}))
    for fam in families:
        m = (table["family"] == fam).to_numpy()
        ax.errorbar(table["bits"][m], table["capacity"][m],
                    yerr=[table["capacity"][m] - cap_lo[m], cap_hi[m] - table["capacity"][m]], fmt=markers[fam],
                    color=colours[fam], ms=5, alpha=0.75, elinewidth=0.8, ls="", label=fam)
    bits = np.linspace(max(0.5, table["bits"].min() - 0.25), table["bits"].max() + 0.25, 200)
    ax.plot(bits, rho(2.0 ** (-2 * bits), **(constants or {})), color="black", ls="--", lw=1.2,
            label="Shannon bound rho(2^-2R)")
    front = table[table["on_frontier"]].sort_values("bits")
    ax.step(front["bits"], front["capacity"], where="post", color="#333333", lw=1, alpha=0.6)
    label_points(ax, front["bits"].to_numpy(), front["capacity"].to_numpy(), list(front["spec"]), side="right")
    ax.set(xlabel="bits per value (scales and metadata included)", ylabel="capacity rho(GMSE)",
           title="Capacity frontier of the format designs", ylim=(0, 1.05))
    ax.legend(fontsize=8, loc="lower right", ncol=2)
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    """A figure to PNG (150 dpi) or SVG by the path's suffix, under capscale's rule for the files it writes."""
    from capscale.capacity.paths import save_figure
    save_figure(fig, path)
