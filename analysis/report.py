"""The report: every analysis of a run table in one folder: report.html (self-contained, figures
embedded), report.md (figures beside it as PNG), results.json, and the figures."""
from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass
from html import escape
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd

from capscale.capacity import InputError, pair_rho
from capscale.capacity.paths import report_folder, strict_json, write_files

from . import plots
from .backward import backward_sentence, backward_table, effd_regression, has_backward
from .compose import compose_grid, read_grid
from .families import format_styles
from .laws import DecoupledLaw
from .names import eff_key
from .parallel import chunked_map
from .report_sections import ReportContext, build_sections
from .runs import format_table
from .studies import published_comparison, published_sentence
from .verdicts import drift_sentence, provenance, verdicts


@dataclass
class Report:
    folder: Path
    results: dict
    validation: object
    composability: pd.DataFrame
    paired: pd.DataFrame
    law_comparison: pd.DataFrame
    health: pd.DataFrame
    calibration: object = None
    wald: object = None
    mixed: object = None
    verdicts: list = None   # the verdict sentences: [{"topic", "text"}]


def _figure_files(fig) -> tuple[bytes, bytes]:
    """(PNG at 150 dpi, embedded in the pages; SVG, for papers) of a figure. The tight box is found once for both
    (savefig's "tight" finds it per file, with the padding savefig adds)."""
    png, svg = io.BytesIO(), io.BytesIO()
    box = fig.get_tightbbox(fig.canvas.get_renderer()).padded(plots.plt.rcParams["savefig.pad_inches"])
    fig.savefig(png, format="png", dpi=150, bbox_inches=box)
    fig.savefig(svg, format="svg", bbox_inches=box)
    return png.getvalue(), svg.getvalue()


_FIGURES: dict = {}  # the figures forked workers save: set before the fork copies them (nothing is pickled)


def _save_figures(keys: list) -> list:
    return [_figure_files(_FIGURES[key]) for key in keys]


def _all_figure_files(figures: dict, n_jobs: int | None) -> dict:
    """Every figure's files, saved by forked workers side by side (rendering is most of a report's time), then
    closed."""
    keys = list(figures)
    _FIGURES.update({key: fig for key, (_, fig) in figures.items()})
    n_jobs = max(1, min(n_jobs or os.cpu_count() or 1, len(keys)))
    try:
        files = chunked_map(_save_figures, keys, n_jobs, n_chunks=n_jobs)
    finally:
        _FIGURES.clear()
        for _, fig in figures.values():
            plots.plt.close(fig)
    return dict(zip(keys, files))


def _table_html(frame: pd.DataFrame, caption: str) -> str:
    """An HTML table with its caption and column headers (pandas writes <th> for every column)."""
    html = frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", border=0, classes="t")
    head_end = html.index(">", html.index("<table")) + 1
    return html[:head_end] + f"<caption>{escape(caption)}</caption>" + html[head_end:]


def markdown_text(text) -> str:
    """Text safe inside Markdown (a table cell included): HTML escaped as the HTML report escapes it, and the
    characters that would make a table column, a link, an image or code escaped."""
    text = escape(str(text), quote=False)
    for char in "\\|[]`":
        text = text.replace(char, "\\" + char)
    return text.replace("\n", " ")


def _table_md(frame: pd.DataFrame) -> str:
    if not len(frame.columns):
        return ""
    cells = frame.astype(object).where(frame.notna(), "").rename(columns=markdown_text)  # blanks in any dtype
    cells = cells.apply(lambda col: col.map(markdown_text) if col.dtype == object else col)
    return cells.to_markdown(index=False, floatfmt=".4g")


def build_report(fit, folder: "str | Path", grids: dict | None = None, title: str = "capscale report",
                 progress: bool = True, n_jobs: int | None = None, replicates: pd.DataFrame | None = None,
                 command: str | None = None, overwrite: bool = False, published: pd.DataFrame | None = None,
                 form: str = "tanh") -> Report:
    """Every analysis of a decoupled LawFit into `folder`: validation, composability, paired comparisons, health,
    extrapolation and figures. `grids`: {name: path} of capacity grids to analyse too; `replicates` (optional
    seed repeats of some runs, not fitted) give the fit-health check its seed-to-seed scatter and the loss figure
    its seed bars; `published` (format, published_lo, published_hi, note: a published study's efficiencies)
    are compared with the fit and the capacity predictions, first in the summary."""
    if not isinstance(fit.law, DecoupledLaw):
        raise InputError(f"the report reads a decoupled fit (one efficiency per format), got the {fit.law.name} law")
    folder = report_folder(folder, overwrite)
    runs, law, boot, level, baseline = fit.runs, fit.law, fit.boot, fit.level, fit.baseline
    intervals = fit.conf_int() if fit.has_intervals else None
    comparison = fit.compare_laws()
    try:
        validation, capacity_omitted = fit.validate(form=form, progress=progress, n_jobs=n_jobs), None
    except InputError as err:  # labels without a GMSE, or too few formats: the capacity sections say why instead
        validation, capacity_omitted = None, str(err)
    comp, wald = fit.compose()
    paired = fit.paired()
    stats_ = {"calibration": fit.calibration(validation), "wald": wald, "mixed": fit.paired_mixed()}
    health = fit.health(replicates)
    extrap, extrap_errors = fit.extrapolation()
    extrap_tokens, extrap_tokens_errors = fit.extrapolation("tokens")
    drift = fit.drift_test()
    grid_results = {name: compose_grid(read_grid(path)) for name, path in (grids or {}).items()}

    info = format_table(runs)
    styles = format_styles(info, baseline)
    capacity_table = info.reset_index()[["format", "w_format", "a_format", "w_gmse", "a_gmse", "w_bits", "runs"]].rename(
        columns={"w_bits": "bits_per_value"}).assign(
        family=lambda d: styles.loc[d["format"], "family"].to_numpy(),
        capacity=lambda d: pair_rho(d["w_gmse"].to_numpy(), d["a_gmse"].to_numpy()))  # published constants
    known = intervals.index if intervals is not None else ()  # the baseline's eff is 1 by definition: no interval
    eff_table = pd.DataFrame([{"format": f, "family": styles.at[f, "family"], "eff": v,
                               "eff_lo": intervals.at[eff_key(f), "lo"] if eff_key(f) in known else np.nan,
                               "eff_hi": intervals.at[eff_key(f), "hi"] if eff_key(f) in known else np.nan}
                              for f, v in fit.eff.items()])
    verdict_lines = verdicts(validation, stats_["calibration"], capacity_omitted, stats_["mixed"], baseline, stats_["wald"],
                            comp, health, fit.warnings, extrap_errors,
                            pd.Series(law.residuals_, index=runs.index).groupby(runs["params"]).mean())
    verdict_lines.insert(3, {"topic": "Is the efficiency constant across token budgets?",
                             "text": drift_sentence(drift, extrap_tokens_errors)})
    against = None if published is None else published_comparison(fit, validation, published)
    if against is not None and len(against):
        verdict_lines.insert(0, {"topic": "Does the fit reproduce the published efficiencies?",
                                 "text": published_sentence(against, level)})
    origin = provenance(runs, fit.seed, law, boot, level, command)
    decision = decisions(fit, info, progress)
    backward = None
    if has_backward(law):
        table = backward_table(fit)
        backward = {"table": table, "regression": effd_regression(table)}
        verdict_lines.insert(0, {"topic": "What do the backward formats cost?", "text": backward_sentence(table, level)})

    results = {"title": title, "verdicts": verdict_lines, "provenance": origin, "source": runs.attrs.get("source"),
               "baseline": baseline, "decoupled": fit.as_json(),
               "law_comparison": comparison.to_dict("records"),
               "validation": None if validation is None else validation.as_json(), "composability": comp.to_dict("records"),
               "paired_comparison": paired.to_dict("records"), "health": health.to_dict("records"),
               "capacity": capacity_table.to_dict("records"), "extrapolation": extrap_errors,
               "extrapolation_tokens": extrap_tokens_errors, "drift_test": drift.as_json(),
               "grids": {n: {k: r[k] for k in ("edge_row", "edge_col", "max_abs_error", "rms_error", "rank1_rms_error")}
                         | {"worst_cell": list(r["worst_cell"])} for n, r in grid_results.items()},
               "skipped_runs": runs.attrs.get("skipped", []), "capacity_omitted": capacity_omitted,
               "calibration": None if stats_["calibration"] is None else stats_["calibration"].as_json(),
               "composability_wald": None if stats_["wald"] is None else stats_["wald"].table.to_dict("records"),
               "paired_mixed": None if stats_["mixed"] is None else stats_["mixed"].table.to_dict("records"),
               "published_comparison": None if against is None else against.to_dict("records"),
               "plan": None if "plan" not in decision else decision["plan"].as_json(),
               "plan_unranked": decision.get("unranked", {}),
               "backward": None if backward is None else {
                   "table": backward["table"].to_dict("records"),
                   "regression": None if backward["regression"] is None else
                   backward["regression"].params.to_dict()}}

    context = ReportContext(runs=runs, law=law, boot=boot, intervals=intervals, level=level, styles=styles, info=info,
                            capacity_table=capacity_table, eff_table=eff_table, health=health, validation=validation,
                            capacity_omitted=capacity_omitted, stats=stats_, comp=comp, comparison=comparison, paired=paired,
                            extrap=extrap, extrap_errors=extrap_errors, extrap_tokens=extrap_tokens,
                            extrap_tokens_errors=extrap_tokens_errors, drift=drift, grid_results=grid_results, replicates=replicates,
                            published=against, decision=decision, backward=backward, fit=fit)
    sections, figures = build_sections(context)
    files = _all_figure_files(figures, n_jobs)
    images = {key: png for key, (png, _) in files.items()}
    pages = _render(title, verdict_lines, sections, figures, images, origin)
    write_files(folder, {"results.json": json.dumps(strict_json(results), indent=1, default=str,
                                                    allow_nan=False).encode(),
                         **{f"{key}.png": data for key, data in images.items()},
                         **{f"{key}.svg": svg for key, (_, svg) in files.items()}, **pages})
    return Report(folder, results, validation, comp, paired, comparison, health, stats_["calibration"],
                  stats_["wald"], stats_["mixed"], verdict_lines)


def decisions(fit, info: pd.DataFrame, progress: bool) -> dict:
    """"What to use": the plan at the largest fitted model's weight memory in the baseline format and the largest
    fitted token count, its curves over a 100x range of memory, and the frontier of the built-in families (vector
    quantization left out: its codebooks take minutes to build the first time)."""
    from .frontier import frontier
    from .names import FRONTIER_FAMILIES
    from .plan import Budget, plan, plan_curves
    from capscale.capacity.gmse import RUN_SAMPLES
    known = [f for f in fit.eff if np.isfinite(info["w_bits"].get(f, np.nan))]
    unranked = {f: "its bits per value are unknown (a label capscale cannot parse, no w_bits column), so its memory "
                   "cannot be counted" for f in fit.eff if f not in known}
    if fit.baseline not in known or len(known) < 2:
        return {"omitted": "the formats' bits per value are unknown (labels capscale cannot parse, no w_bits "
                           "column), so their memory cannot be counted", "unranked": unranked}
    budget = Budget(memory=fit.runs["params"].max() * info.at[fit.baseline, "w_bits"] / 8,
                    tokens=fit.runs["tokens"].max())
    return {"plan": plan(fit, budget, known), "unranked": unranked,
            "curves": plan_curves(fit, budget.memory * np.logspace(-1, 1, 9), "memory", budget, known),
            # the run table's sample size, so that a format in both prints one GMSE
            "frontier": frontier([f for f in FRONTIER_FAMILIES if f != "vq"], samples=RUN_SAMPLES, progress=progress)}


TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("capscale.analysis", "templates"),
                               autoescape=jinja2.select_autoescape(["html.j2"]), keep_trailing_newline=True)
TEMPLATES.filters["md"] = markdown_text


def _render(title, verdicts, sections, figures, images, origin) -> dict[str, bytes]:
    """report.md and report.html from their templates: the same verdicts, sections, figures, tables, provenance."""
    for section in sections:
        section["tables"] = [{"caption": caption, "html": _table_html(table, caption), "md": _table_md(table)}
                             for caption, table in section["tables"]]
        section["figures"] = [{"key": key, "caption": figures[key][0], "png_base64": base64.b64encode(images[key]).decode()}
                              for key in section["figures"]]
    return {name: TEMPLATES.get_template(f"{name}.j2").render(
                title=title, verdicts=verdicts, sections=sections, provenance=origin,
                provenance_json=json.dumps(origin, indent=1)).encode()
            for name in ("report.md", "report.html")}
