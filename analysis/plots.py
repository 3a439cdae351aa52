"""Report figures about the runs and the fit (seaborn/matplotlib). Every figure colours and marks formats by
family (`families.format_styles`), labels points without collisions, and returns a matplotlib Figure."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402


LOSS_LABEL = "validation loss"  # the unit is the table's own (nats per byte here, per token in QuEST)
N_LABEL = "non-embedding parameters N"
WIDTH = 10.5  # inches: the page width at the report's resolution
matplotlib.rcParams.update(matplotlib.rcParamsDefault)  # never a matplotlibrc of the working directory (dpi 30000...)
sns.set_theme(style="whitegrid", context="notebook", font_scale=0.95)


MAX_LEGEND_IN_AXES = 8  # more formats than this get their legend outside the axes


def family_legend(ax, styles: pd.DataFrame, numbered: bool = False, **kwargs) -> None:
    """A legend with one entry per format shown, its own colour and marker as plotted (a legend of families showed
    one marker where each format has its own). Many formats go to the right of the axes. `numbered`: entries start
    with 1, 2, ... in order, the key to points labelled by number."""
    styles = styles[~styles.index.duplicated()]
    handles = [Line2D([], [], color=r.color, marker=r.marker, ls="", markersize=7,
                      label=(f"{i + 1:>2}  " if numbered else "") + f"{f} ({r.family})")
               for i, (f, r) in enumerate(styles.iterrows())]
    options = {"fontsize": 8.5, "title_fontsize": 9, **kwargs}
    if len(handles) > MAX_LEGEND_IN_AXES:
        options.update(loc="upper left", bbox_to_anchor=(1.01, 1), ncol=1 + len(handles) // 24)
    ax.legend(handles=handles, title="format (family)", **options)


def legend_columns(labels, width: float = WIDTH, fontsize: float = 9) -> int:
    """How many legend columns of these labels fit across `width` inches (about 0.55 em a character)."""
    longest = max((len(str(s)) for s in labels), default=1)
    return max(1, min(len(labels), int(width // (longest * fontsize * 0.55 / 72 + 0.45))))


def format_legend(fig, styles: pd.DataFrame, formats) -> None:
    """A legend of formats below the figure, grouped by family (shade and marker), in as many columns as fit."""
    handles = [Line2D([], [], color=styles.at[f, "color"], marker=styles.at[f, "marker"], ls="-", markersize=7,
                      label=f"{f} ({styles.at[f, 'family']})") for f in styles.index if f in set(formats)]
    fig.legend(handles=handles, loc="upper center", ncol=legend_columns([h.get_label() for h in handles]), fontsize=9,
               frameon=False, bbox_to_anchor=(0.5, 0.0))


def spread_ticks(values, per_decade_span: float = 4.5) -> list:
    """Of sorted positive values, those at least 1/per_decade_span of their log range apart (first and last kept):
    tick labels that never collide, about four of them."""
    values = sorted(values)
    if len(values) <= 2:
        return values
    gap = np.log10(values[-1] / values[0]) / per_decade_span
    kept = [values[0]]
    for v in values[1:-1]:
        if np.log10(v / kept[-1]) >= gap and np.log10(values[-1] / v) >= gap:
            kept.append(v)
    return kept + [values[-1]]


def label_points(ax, xs, ys, labels, colors=None, min_gap: float = 13.0, side: str = "right",
                 fontsize: float = 8.5) -> None:
    """Labels beside the points (`side`), placed bottom to top: each label's box (its text's estimated extent, in
    screen points) is moved up until it clears every label already placed, so none overlap."""
    fig = ax.figure
    fig.canvas.draw()
    scale = fig.dpi / 72.0
    pts = np.array([ax.transData.transform((x, y)) for x, y in zip(xs, ys)]) / scale  # in points
    height = max(min_gap, fontsize * 1.25)
    placed = []  # (x0, x1, y0, y1) in points
    offsets = np.zeros(len(pts))
    for i in np.argsort(pts[:, 1]):
        width = len(str(labels[i])) * fontsize * 0.62 + 3  # a little more than the glyphs: boxes that touch do not meet
        x0 = pts[i, 0] + 7 if side == "right" else pts[i, 0] - 9 - width
        y = pts[i, 1]
        while hits := [b for b in placed if x0 < b[1] and b[0] < x0 + width and y - height / 2 < b[3]
                       and b[2] < y + height / 2]:
            y = max(b[3] for b in hits) + height / 2 + 0.5
        placed.append((x0, x0 + width, y - height / 2, y + height / 2))
        offsets[i] = y - pts[i, 1]
    for i, offset in enumerate(offsets):
        ax.annotate(labels[i], (xs[i], ys[i]), xytext=(7 if side == "right" else -9, offset), textcoords="offset points",
                    fontsize=fontsize, va="center", ha="left" if side == "right" else "right",
                    color=None if colors is None else colors[i],
                    arrowprops=None if abs(offset) < 4 else {"arrowstyle": "-", "lw": 0.5, "color": "#999999"})


def _ratio_panels(runs: pd.DataFrame):
    """Runs grouped by tokens per parameter, binned by octave: [(label, rows)]."""
    ratio = runs["tokens"] / runs["params"]
    octave = np.round(np.log2(ratio)).astype(int)
    out = []
    for o in sorted(octave.unique()):
        part = runs[octave == o].assign(ratio=ratio[octave == o])
        lo, hi = part["ratio"].min(), part["ratio"].max()
        out.append((f"{lo:.0f}" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f}", part))
    return out


def seed_means(runs: pd.DataFrame, replicates: pd.DataFrame | None) -> pd.DataFrame:
    """Mean loss per (format, N, D) over seeds, its standard deviation (NaN with one seed) and seed count."""
    every = runs if replicates is None else pd.concat([runs, replicates[replicates["format"].isin(runs["format"])]])
    return (every.groupby(["format", "params", "tokens"], as_index=False)["loss"]
            .agg(loss="mean", sd="std", seeds="size"))


def _size_text(value, _=None) -> str:
    """A model size in three significant digits: 13.5k, 30.5M, 1.2B."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def loss_vs_params(runs: pd.DataFrame, law, styles: pd.DataFrame, replicates: pd.DataFrame | None = None) -> plt.Figure:
    """Top: loss against N (seed means, bars = seed s.d. where repeated) with the fitted law, one panel per
    tokens-per-parameter ratio. Bottom: the same runs relative to the baseline at the same (N, D), where gaps of a
    few percent are visible."""
    means = seed_means(runs, replicates)
    panels = _ratio_panels(means)
    fig, axes = plt.subplots(2, len(panels), figsize=(WIDTH, 8.2), squeeze=False, sharex="col",
                             gridspec_kw={"height_ratios": [1.25, 1]})
    base = means[means["format"] == law.baseline].set_index(["params", "tokens"])["loss"]
    for col, (span, part) in enumerate(panels):
        top, bottom = axes[0][col], axes[1][col]
        grid = np.geomspace(part["params"].min() * 0.85, part["params"].max() * 1.15, 60)
        for fmt in styles.index:
            rows = part[part["format"] == fmt].sort_values("params")
            if rows.empty:
                continue
            color, marker = styles.at[fmt, "color"], styles.at[fmt, "marker"]
            top.errorbar(rows["params"], rows["loss"], yerr=rows["sd"].fillna(0), fmt=marker, color=color, ms=6,
                         capsize=3, elinewidth=1, ls="")
            curve = pd.DataFrame({"format": fmt, "params": grid, "tokens": grid * rows["ratio"].median()})
            top.plot(grid, law.predict(curve), color=color, lw=1.1, alpha=0.8)
            rel = rows["loss"].to_numpy() / base.reindex(list(zip(rows["params"], rows["tokens"]))).to_numpy() - 1
            bottom.plot(rows["params"], 100 * rel, marker=marker, color=color, ms=6, lw=1)
        title = f"D = {span} tokens per parameter" if len(panels) <= 3 else f"D/N = {span}"  # narrow panels: short
        top.set(xscale="log", ylabel=LOSS_LABEL if col == 0 else "", title=title)
        bottom.axhline(0, color="black", lw=1)
        bottom.set(xscale="log", xlabel=N_LABEL if len(panels) <= 3 else "",
                   ylabel=f"loss vs '{law.baseline}' (%)" if col == 0 else "")
        if base.reindex(list(zip(part["params"], part["tokens"]))).isna().all():
            bottom.text(0.5, 0.75, f"no '{law.baseline}' runs at these budgets", transform=bottom.transAxes,
                        ha="center", color="#555555")
            bottom.set_yticks([])
        shown = spread_ticks(part["params"].unique(), per_decade_span=max(1.2, 4.5 * min(1.0, 3 / len(panels))))
        for ax in (top, bottom):  # the trained sizes, at most about four, in engineering notation (30.5M, 203M)
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_size_text))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xticks(shown)
            ax.tick_params(axis="x", labelrotation=30)
    if len(panels) > 3:  # narrow panels: one axis label for the row
        fig.supxlabel(N_LABEL, fontsize=10)
    fig.tight_layout(w_pad=1.5)
    format_legend(fig, styles, runs["format"])  # below the axes; saved with bbox_inches="tight"
    return fig


def parity(runs: pd.DataFrame, law, styles: pd.DataFrame) -> plt.Figure:
    """Predicted against observed loss for every fitted run: the fit's misfit at a glance."""
    pred = law.predict(runs)
    fig, ax = plt.subplots(figsize=(6.2, 5.6))
    for fmt in styles.index:
        mask = (runs["format"] == fmt).to_numpy()
        ax.scatter(runs["loss"][mask], pred[mask], color=styles.at[fmt, "color"], marker=styles.at[fmt, "marker"],
                   s=34, edgecolor="white", linewidth=0.4)
    lims = [min(runs["loss"].min(), pred.min()) * 0.98, max(runs["loss"].max(), pred.max()) * 1.02]
    ax.plot(lims, lims, color="grey", ls="--", lw=1)
    ax.set(xlim=lims, ylim=lims, xlabel=f"observed {LOSS_LABEL}", ylabel=f"predicted by the {law.name} law",
           title=f"Parity: {len(runs)} runs, RMSE {law.rmse_log_:.4f} in log loss")
    family_legend(ax, styles.loc[styles.index.isin(runs["format"])], loc="upper left")
    fig.tight_layout()
    return fig


def residuals_vs_nd(runs: pd.DataFrame, law, styles: pd.DataFrame) -> plt.Figure:
    """Residuals against N and against D: structure left in them is what the law misses (a size it misfits,
    a trend with tokens)."""
    from .runs import token_budgets
    frame = runs.assign(residual=-law.residuals_, ratio=token_budgets(runs))  # observed - predicted, the usual sign
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 4.2), sharey=True)
    rng = np.random.default_rng(0)
    for ax, column, label in ((axes[0], "params", N_LABEL), (axes[1], "ratio", "tokens per parameter D/N")):
        for fmt in styles.index:
            rows = frame[frame["format"] == fmt]
            jitter = np.exp(rng.uniform(-0.04, 0.04, len(rows)))
            ax.scatter(rows[column] * jitter, rows["residual"], color=styles.at[fmt, "color"],
                       marker=styles.at[fmt, "marker"], s=26, edgecolor="white", linewidth=0.3)
        means = frame.groupby(column)["residual"].mean()
        ax.plot(means.index, means.to_numpy(), color="black", lw=1.5, marker="_", ms=18, label="mean residual")
        ax.axhline(0, color="grey", lw=1)
        ax.set(xscale="log", xlabel=label)
        ax.legend(fontsize=9, loc="lower right")
    axes[0].set_ylabel("log(observed / predicted loss)")
    fig.suptitle(f"Residuals of the {law.name} fit against model size and tokens per parameter (a trend with D/N: a "
                 "cost the law misses)", fontsize=10.5)
    fig.tight_layout()
    return fig


def capacity_vs_bits(table: pd.DataFrame, styles: pd.DataFrame) -> plt.Figure:
    """Each format's capacity (rho, published constants; a W/A pair's is the product) against its weights' bits
    per value: what a format buys per bit before any training."""
    rows = table.dropna(subset=["bits_per_value", "capacity"])
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for _, r in rows.iterrows():
        ax.scatter(r["bits_per_value"], r["capacity"], color=styles.at[r["format"], "color"],
                   marker=styles.at[r["format"], "marker"], s=60, edgecolor="white", linewidth=0.5)
    # formats with the same specs (variants of one recipe) share a point: one label for them
    points = rows.groupby([rows["bits_per_value"].round(6), rows["capacity"].round(6)], sort=False)["format"].agg(list)
    labels = [names[0] if len(names) == 1 else f"{min(names, key=len)} (+{len(names) - 1} same specs)"
              for names in points]
    label_points(ax, np.array([b for b, _ in points.index]), np.array([c for _, c in points.index]), labels,
                 [styles.at[names[0], "color"] for names in points])
    ax.set(xlabel="bits per value (weights; scales and metadata included)", ylabel="capacity rho (published constants)",
           title="Capacity of the formats", ylim=(0, 1.08))
    family_legend(ax, styles.loc[rows["format"]], loc="lower right")
    fig.tight_layout()
    return fig


def extrapolation(check: pd.DataFrame, styles: pd.DataFrame) -> plt.Figure:
    """Relative error of each held-out run (the largest models, fitted without them), by format: a bias shows
    as every point on one side of zero."""
    order = [f for f in styles.index if f in set(check["format"])]
    fig, ax = plt.subplots(figsize=(WIDTH, 4.0))
    for i, fmt in enumerate(order):
        rows = check[check["format"] == fmt]
        ax.scatter(np.full(len(rows), i), 100 * rows["rel_error"], color=styles.at[fmt, "color"],
                   marker=styles.at[fmt, "marker"], s=45, edgecolor="white", linewidth=0.4)
    mean = 100 * check["rel_error"].mean()
    ax.axhline(0, color="black", lw=1)
    ax.axhline(mean, color="#D55E00", ls="--", lw=1.2, label=f"signed mean {mean:+.2f}%")
    if len(order) > 8:  # many labels: upright, one per column, never into their neighbours or the y label
        ax.set_xticks(range(len(order)), order, rotation=90, ha="center")
    else:
        ax.set_xticks(range(len(order)), order, rotation=35, ha="right", rotation_mode="anchor")
    held = (f"Extrapolation to N = {check['params'].max():.4g}, fitted without it"
            if check.attrs.get("hold_out", "params") == "params" else
            f"Extrapolation to the largest token budgets ({check.attrs.get('law', '')} law)")
    ax.set(ylabel="(predicted - observed) / observed (%)", title=held)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return fig
