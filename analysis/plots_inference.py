"""Report figures about the inferences: efficiencies and their intervals, capacity against efficiency, the
bootstrap's joint spread, paired differences, composability."""
from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns

from .plots import WIDTH, family_legend, label_points, plt
from .validate import FORMS


NAMED_POINTS = 10  # above this many formats, points are numbered and named in a key beside the plot


def _error_bars(value, lo, hi):
    """Asymmetric error bars for matplotlib from interval ends; None where any interval is missing."""
    return np.vstack([value - lo, hi - value]).clip(0) if pd.notna(lo).all() else None


def forest(ax, table: pd.DataFrame, value: str, lo: str, hi: str, styles: pd.DataFrame, reference: float) -> None:
    """One row per format: point and interval in the format's colour and marker, a reference line."""
    for i, (_, r) in enumerate(table.iterrows()):
        color, marker = styles.at[r["format"], "color"], styles.at[r["format"], "marker"]
        if pd.notna(r[lo]):
            ax.plot([r[lo], r[hi]], [i, i], color=color, lw=2.2, solid_capstyle="round")
        ax.plot(r[value], i, marker=marker, color=color, ms=8, mec="white", mew=0.6)
    ax.axvline(reference, color="grey", ls="--", lw=1)
    ax.set_yticks(range(len(table)), table["format"])
    ax.set_ylim(len(table) - 0.5, -0.5)


def efficiency_forest(eff_table: pd.DataFrame, styles: pd.DataFrame, baseline: str, level: float) -> plt.Figure:
    """Fitted efficiency per format with its bootstrap interval, best first."""
    table = eff_table[eff_table["format"] != baseline].sort_values("eff", ascending=False)
    fig, ax = plt.subplots(figsize=(8.0, 0.42 * len(table) + 1.6))
    forest(ax, table, "eff", "eff_lo", "eff_hi", styles, 1.0)
    ax.set(xlabel=f"efficiency multiplier eff ({level:.0%} bootstrap interval; '{baseline}' = 1)",
           title="Fitted efficiency per format")
    family_legend(ax, styles.loc[table["format"]], loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def _equivalent_gmse(curve, capacity) -> np.ndarray:
    """The single-format GMSE whose capacity equals `capacity` (a W/A pair's product) on a decreasing curve."""
    g = np.geomspace(1e-8, 1.0, 4000)
    r = curve(g)
    return np.exp(np.interp(-np.asarray(capacity, float), -r, np.log(g)))


def efficiency_vs_capacity(validation, styles: pd.DataFrame) -> plt.Figure:
    """Fitted efficiency (with its interval) against the fitted rho curve and its bootstrap band. A W/A pair sits
    at the GMSE whose single-format capacity equals the product of its two capacities, the law's model; beside each
    point, its leave-one-format-out prediction interval (rho refitted without the format)."""
    fn = FORMS[validation.form][0]
    constants = list(validation.constants.values())
    curve = lambda g: fn(np.asarray(g, float), *constants)  # noqa: E731
    t = validation.table.assign(g_eq=lambda d: _equivalent_gmse(curve, d["capacity"]))
    fig, ax = plt.subplots(figsize=(WIDTH, 5.6))
    g = np.geomspace(max(1e-6, t["g_eq"].min() / 4), 0.9, 200)
    ax.plot(g, curve(g), color="black", lw=1.6, label=f"fitted rho ({validation.form})")
    if validation.draws is not None and len(validation.draws):
        curves = np.array([fn(g, *row) for row in validation.draws[list(validation.constants)].to_numpy()])
        lo, hi = np.nanquantile(curves, validation.boot.tails(), axis=0)
        ax.fill_between(g, lo, hi, color="black", alpha=0.10, label=f"{validation.level:.0%} band of the fitted rho")
    for _, r in t.iterrows():
        color, marker = styles.at[r["format"], "color"], styles.at[r["format"], "marker"]
        if pd.notna(r["pred_lo"]):
            ax.fill_between([r["g_eq"] * 1.06, r["g_eq"] * 1.16], r["pred_lo"], r["pred_hi"], color=color, alpha=0.25,
                            lw=0)
        err = _error_bars(np.array([r["fitted"]]), np.array([r["fitted_lo"]]), np.array([r["fitted_hi"]]))
        ax.errorbar(r["g_eq"], r["fitted"], yerr=err, fmt=marker, color=color, ms=8, capsize=3, mec="white", mew=0.6)
    from capscale.capacity import rho
    ax.plot(g, rho(g), color="#777777", ls="--", lw=1.2, label="published rho (Llama/C4 constants)")
    ax.fill_between([], [], [], color="grey", alpha=0.3,
                    label="leave-one-format-out prediction interval (in each format's colour)")
    ax.set(xscale="log", xlabel="Gaussian MSE (a W/A pair: the GMSE with the product of its capacities)",
           ylabel="efficiency multiplier eff", title="Fitted efficiency against capacity")
    handles, labels = ax.get_legend_handles_labels()
    first = ax.legend(handles, labels, fontsize=9, loc="lower left")
    many = len(t) > NAMED_POINTS  # too many names to place: numbers beside the points, the legend is their key
    family_legend(ax, styles.loc[t["format"]], numbered=many, loc="upper right")
    ax.add_artist(first)
    ax.set(xlim=ax.get_xlim(), ylim=ax.get_ylim())  # the limits and the layout are final before labels are placed
    fig.tight_layout()
    colours = [styles.at[f, "color"] for f in t["format"]]
    names = [str(i + 1) for i in range(len(t))] if many else list(t["format"])
    label_points(ax, t["g_eq"].to_numpy(), t["fitted"].to_numpy(), names, None if many else colours, side="left",
                 min_gap=9 if many else 13)
    return fig


def bootstrap_joint(samples: pd.DataFrame, point: dict) -> plt.Figure:
    """The bootstrap replicates of (alpha, E) and (alpha, beta): trade-offs that marginal intervals hide (E piling
    at its bound 0 while alpha spreads)."""
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 4.4))
    for ax, other in zip(axes, ("E", "beta")):
        sns.scatterplot(x=samples["alpha"], y=samples[other], ax=ax, s=18, alpha=0.55, color="#0072B2",
                        edgecolor=None, label=f"{len(samples)} bootstrap refits")
        ax.plot(point["alpha"], point[other], marker="*", color="#D55E00", ms=16, ls="", label="fit to all runs")
        ax.set(xlabel="alpha (model-size exponent)", ylabel=other, title=f"alpha and {other} across refits")
        ax.legend(fontsize=9)
    fig.tight_layout()
    return fig


def paired_forest(mixed: pd.DataFrame, styles: pd.DataFrame, baseline: str, level: float) -> plt.Figure:
    """Mixed-model log-loss difference of each format to the baseline at equal (N, D), with its interval; filled
    markers where the Holm-adjusted p says the formats differ."""
    table = mixed.dropna(subset=["log_loss_diff"]).sort_values("log_loss_diff")  # not compared: in the table, not here
    fig, ax = plt.subplots(figsize=(8.0, 0.42 * len(table) + 1.6))
    forest(ax, table, "log_loss_diff", "lo", "hi", styles, 0.0)
    for i, (_, r) in enumerate(table.iterrows()):
        if not r["differs"]:
            ax.plot(r["log_loss_diff"], i, marker=styles.at[r["format"], "marker"], color="white", ms=4.5)
    ax.set(xlabel=f"log(loss / loss of '{baseline}') at equal (N, D) ({level:.0%} interval)",
           title="Paired differences to the baseline (open: not different after Holm)")
    family_legend(ax, styles.loc[table["format"]], loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def composability(table: pd.DataFrame, level: float = 0.95) -> plt.Figure:
    """eff(combined) / (eff(part 1) eff(part 2)) with its interval: 1 is 'the capacities multiply'."""
    fig, ax = plt.subplots(figsize=(8.0, 0.6 * len(table) + 1.8))
    err = _error_bars(table["ratio"], table["ratio_lo"], table["ratio_hi"])
    labels = [f"{r.combined} vs {r.part1} x {r.part2}" for r in table.itertuples()]
    ax.errorbar(table["ratio"], range(len(table)), xerr=err, fmt="o", capsize=4, color="#CC79A7", ms=8,
                label=f"ratio ({level:.0%} interval)")
    ax.axvline(1.0, color="grey", ls="--", label="capacities multiply")
    ax.set_yticks(range(len(table)), labels)
    ax.set_ylim(len(table) - 0.5, -0.5)
    ax.set(xlabel="eff(combined) / (eff(part 1) x eff(part 2))", title="Composability on trained runs")
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def grid_heatmaps(name: str, result: dict) -> plt.Figure:
    """A published capacity grid and the error of predicting each cell as the product of its edges."""
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 3.9))
    sns.heatmap(result["observed"], annot=True, fmt=".2f", cmap="viridis", ax=axes[0], cbar_kws={"label": "capacity"})
    axes[0].set(title=f"{name}: published capacity")
    sns.heatmap(result["error"], annot=True, fmt="+.2f", cmap="RdBu_r", center=0, ax=axes[1],
                cbar_kws={"label": "product - observed"})
    axes[1].set(title="product-of-edges prediction error")
    fig.tight_layout()
    return fig
