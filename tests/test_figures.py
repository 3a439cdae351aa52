"""Figures that read at a glance: no text drawn over other text, shades a reader can tell apart within a family,
a legend whose markers are the plotted ones (the QuEST study: 20 formats; Quartet: 7 budget panels, 14 labels)."""
import itertools
import warnings

import numpy as np
import pytest
from matplotlib import colors as mcolors
from matplotlib.text import Text

import capscale
from capscale.analysis import plots, plots_inference
from capscale.analysis.families import format_styles
from capscale.analysis.runs import format_table, load_runs
from capscale.analysis.studies import study_runs


def _in_view(ax, text, axis: str) -> bool:
    lo, hi = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    position = text.get_position()[0 if axis == "x" else 1]
    return lo - 1e-9 * abs(lo) <= position <= hi + 1e-9 * abs(hi)


def overlapping_text(fig) -> list:
    """Pairs of drawn texts (titles, axis labels, tick labels in view, annotations) whose tight boxes intersect."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    items = [fig._suptitle, fig._supxlabel]
    for ax in fig.axes:
        items += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        items += [t for t in ax.get_xticklabels() if _in_view(ax, t, "x")]
        items += [t for t in ax.get_yticklabels() if _in_view(ax, t, "y")]
    boxes = [(t.get_text(), Text.get_window_extent(t, renderer)) for t in items
             if t is not None and t.get_visible() and t.get_text().strip()]
    return [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2)
            if box_a.width > 0 and box_b.width > 0 and box_a.overlaps(box_b)]


@pytest.fixture(scope="module")
def quest():
    runs = load_runs(study_runs("quest"), name="quest")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = capscale.fit(runs, bootstrap=12, progress=False, n_jobs=1)
    return runs, fit, format_styles(format_table(runs), "bf16")


def test_no_figure_draws_text_over_text(quest):
    runs, fit, styles = quest
    figures = {"loss_vs_params": plots.loss_vs_params(runs, fit.law, styles),
               "residuals": plots.residuals_vs_nd(runs, fit.law, styles),
               "efficiency_vs_capacity": plots_inference.efficiency_vs_capacity(fit.validate(progress=False, n_jobs=1),
                                                                                 styles),
               "paired_forest": plots_inference.paired_forest(fit.paired_mixed().table, styles, "bf16", 0.95)}
    quartet = load_runs(study_runs("quartet"), name="quartet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quartet_fit = capscale.fit(quartet, bootstrap=0, progress=False)
    quartet_styles = format_styles(format_table(quartet), "bf16")
    figures["quartet loss_vs_params"] = plots.loss_vs_params(quartet, quartet_fit.law, quartet_styles)
    figures["quartet extrapolation"] = plots.extrapolation(quartet_fit.extrapolation("tokens")[0], quartet_styles)
    for name, fig in figures.items():
        assert overlapping_text(fig) == [], name
        plots.plt.close(fig)


def test_shades_within_a_family_differ_and_the_legend_shows_each_formats_marker(quest):
    runs, fit, styles = quest
    for family, members in styles.groupby("family"):
        rgb = np.array([mcolors.to_rgb(c) for c in members["color"]])
        if len(rgb) > 1:
            distances = [np.linalg.norm(a - b) for a, b in itertools.combinations(rgb, 2)]
            assert min(distances) > 0.08, family
    fig, ax = plots.plt.subplots()
    plots.family_legend(ax, styles)
    legend = ax.get_legend()
    assert [h.get_marker() for h in legend.legend_handles] == list(styles["marker"])
    assert [t.get_text().split(" (")[0] for t in legend.get_texts()] == list(styles.index)
    plots.plt.close(fig)
