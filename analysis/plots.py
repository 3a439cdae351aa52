"""Report figures (seaborn). Each function takes fitted objects and returns a matplotlib Figure."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from capscale.capacity.law import rho  # noqa: E402

LOSS_LABEL = "validation loss (nats per byte)"
N_LABEL = "non-embedding parameters N"
sns.set_theme(style="whitegrid", context="notebook")


def _palette(formats):
    return dict(zip(formats, sns.color_palette("tab20", len(formats))))


def _error_bars(value, lo, hi):
    """Asymmetric error bars for matplotlib from interval ends; None where any interval is missing."""
    return np.vstack([value - lo, hi - value]).clip(0) if lo.notna().all() else None


def loss_vs_params(runs: pd.DataFrame, law) -> plt.Figure:
    """Observed losses and the fitted law, one panel per tokens-per-parameter ratio."""
    ratio = runs["tokens"] / runs["params"]
    runs = runs.assign(ratio=ratio, octave=np.round(np.log2(ratio)).astype(int))  # D/N binned by octave
    octaves = sorted(runs["octave"].unique())
    colors = _palette(law.formats_)
    fig, axes = plt.subplots(1, len(octaves), figsize=(5.2 * len(octaves), 4.4), sharey=True, squeeze=False)
    for ax, octave in zip(axes[0], octaves):
        part = runs[runs["octave"] == octave]
        ratio, lo, hi = part["ratio"].median(), part["ratio"].min(), part["ratio"].max()
        sns.scatterplot(data=part, x="params", y="loss", hue="format", palette=colors, ax=ax, s=45, legend=False)
        grid = np.geomspace(part["params"].min() * 0.8, part["params"].max() * 1.25, 60)
        for fmt in law.formats_:
            if fmt in set(part["format"]):
                rows = part[part["format"] == fmt].iloc[:1]
                curve = pd.concat([rows] * len(grid)).assign(params=grid, tokens=grid * ratio)
                ax.plot(grid, law.predict(curve), color=colors[fmt], lw=1.3, label=fmt)
        span = f"{lo:.0f}" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f}"
        ax.set(xscale="log", xlabel=N_LABEL, ylabel=LOSS_LABEL, title=f"D = {span} tokens per parameter")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0][-1].legend(title="format (fitted curve)", fontsize=7, title_fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return fig


def efficiency_vs_gmse(validation, draws: pd.DataFrame | None = None) -> plt.Figure:
    """Fitted efficiencies (with CIs) against GMSE, and the fitted rho curve with its bootstrap band."""
    t = validation.table.assign(gmse=lambda d: d["w_gmse"] + d["a_gmse"])
    fig, ax = plt.subplots(figsize=(7, 4.6))
    g = np.geomspace(max(1e-5, t["gmse"].min() / 3), 0.9, 200)
    if validation.form == "tanh":
        ax.plot(g, rho(g, **validation.constants), color="black", lw=1.5, label="fitted rho(GMSE)")
        ax.plot(g, rho(g), color="grey", ls="--", lw=1, label="published rho (L=1, F=0.41, C=1.39)")
        if draws is not None and len(draws):
            curves = np.array([rho(g, *row) for row in draws[["L", "F", "C"]].to_numpy()])
            lo, hi = np.nanquantile(curves, validation.boot.tails(), axis=0)
            ax.fill_between(g, lo, hi, color="black", alpha=0.12, label=f"{validation.level:.0%} band")
    yerr = _error_bars(t["fitted"], t["fitted_lo"], t["fitted_hi"])
    ax.errorbar(t["gmse"], t["fitted"], yerr=yerr, fmt="o", color="tab:blue", capsize=3,
                label=f"fitted eff ({validation.level:.0%} CI)")
    for _, r in t.iterrows():
        ax.annotate(r["format"], (r["gmse"], r["fitted"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set(xscale="log", xlabel="Gaussian MSE (weights + activations)", ylabel="efficiency multiplier eff",
           title="Fitted efficiency against capacity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def loo_predictions(validation) -> plt.Figure:
    t = validation.table
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    xerr = _error_bars(t["fitted"], t["fitted_lo"], t["fitted_hi"])
    yerr = _error_bars(t["predicted"], t["pred_lo"], t["pred_hi"])
    ax.errorbar(t["fitted"], t["predicted"], xerr=xerr, yerr=yerr, fmt="o", capsize=3,
                label=f"format ({validation.level:.0%} intervals)")
    lims = [min(t["fitted"].min(), t["predicted"].min()) * 0.9, max(t["fitted"].max(), t["predicted"].max()) * 1.05]
    ax.plot(lims, lims, color="grey", ls="--", label="prediction = fit")
    for _, r in t.iterrows():
        ax.annotate(r["format"], (r["fitted"], r["predicted"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set(xlabel="fitted efficiency (decoupled law)", ylabel="predicted from capacity (leave-one-format-out)",
           title="Capacity predictions vs trained runs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def residuals(runs: pd.DataFrame, law) -> plt.Figure:
    frame = runs.assign(residual=law.residuals_)
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.stripplot(data=frame, x="format", y="residual", hue="format", palette=_palette(law.formats_), ax=ax,
                  order=law.formats_, legend=False, size=5, jitter=0.15)
    ax.axhline(0, color="grey", lw=1)
    ax.set(xlabel="format", ylabel="log(predicted / observed loss)", title=f"Residuals (RMSE {law.rmse_log_:.4f} in log loss)")
    ax.tick_params(axis="x", rotation=45)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    fig.tight_layout()
    return fig


def bootstrap_distributions(samples: pd.DataFrame, formats) -> plt.Figure:
    names = [c for c in ("alpha", "beta", "E") if c in samples]
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4 * len(names) + 6, 4),
                             gridspec_kw={"width_ratios": [1] * len(names) + [2.2]})
    for ax, name in zip(axes, names):
        sns.histplot(samples[name], ax=ax, bins=30, color="tab:blue")
        ax.set(xlabel=name, ylabel="bootstrap replicates", title=f"{name}")
    effs = samples[[f"eff[{f}]" for f in formats]].melt(var_name="format", value_name="eff")
    effs["format"] = effs["format"].str[4:-1]
    sns.boxplot(data=effs, y="format", x="eff", ax=axes[-1], color="tab:orange", fliersize=2)
    axes[-1].set(xlabel="efficiency multiplier eff", ylabel="format", title="efficiency, bootstrap")
    fig.tight_layout()
    return fig


def composability(table: pd.DataFrame, level: float = 0.95) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.5, 0.6 * len(table) + 1.6))
    err = _error_bars(table["ratio"], table["ratio_lo"], table["ratio_hi"])
    labels = [f"{r.combined} vs {r.part1} x {r.part2}" for r in table.itertuples()]
    ax.errorbar(table["ratio"], range(len(table)), xerr=err, fmt="o", capsize=4, label=f"ratio ({level:.0%} CI)")
    ax.axvline(1.0, color="grey", ls="--", label="capacities multiply")
    ax.set_yticks(range(len(table)), labels)
    ax.set(xlabel="eff(combined) / (eff(part 1) x eff(part 2))", title="Composability on trained runs")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def grid_heatmaps(name: str, result: dict) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    sns.heatmap(result["observed"], annot=True, fmt=".2f", cmap="viridis", ax=axes[0], cbar_kws={"label": "capacity"})
    axes[0].set(title=f"{name}: published capacity")
    sns.heatmap(result["error"], annot=True, fmt="+.2f", cmap="RdBu_r", center=0, ax=axes[1],
                cbar_kws={"label": "product - observed"})
    axes[1].set(title="product-of-edges prediction error")
    fig.tight_layout()
    return fig


def per_bit(table: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    sns.scatterplot(data=table, x="bits_per_value", y="fitted", hue="format", ax=ax, s=60, legend=False)
    for _, r in table.iterrows():
        ax.annotate(r["format"], (r["bits_per_value"], r["fitted"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set(xlabel="bits per value (weights; scales and metadata included)", ylabel="fitted efficiency multiplier",
           title="Efficiency per bit")
    fig.tight_layout()
    return fig
