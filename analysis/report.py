"""The report: every analysis of a run table in one folder: report.html (self-contained, figures
embedded), report.md (figures beside it as PNG), results.json, and the figures."""
from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd

from capscale.capacity import BASELINE, InputError, pair_rho

from . import plots
from .bootstrap import bootstrap, extrapolation_check, extrapolation_summary
from .compare import paired_comparison
from .compose import compose_grid, compose_runs, read_grid
from .families import format_styles
from .health import fit_health
from .laws import DecoupledLaw, exponent_at_edge, make_law
from .report_sections import build_sections
from .runs import format_table
from .statistics import calibration, composability_wald, paired_mixed
from .summary import provenance, verdict
from .validate import validate


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
    summary: list = None    # the verdict sentences: [{"topic", "text"}]


def writable_folder(folder: "str | Path") -> Path:
    """The output folder, created and checked writable now, before any computation that would be lost."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"-o {folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".capscale-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise InputError(f"-o {folder}: cannot write there ({err.strerror})") from None
    return folder


def _law_comparison(runs, decoupled, delta):
    """How well each law fits (not its constants: those need their own bootstrap; `capscale fit --law` gives them
    with intervals)."""
    rows = [("decoupled", len(decoupled.params_) + len(decoupled.eff_) - 1, decoupled)]
    for name in ("unified", "kumar", "frantar"):
        try:
            fit = make_law(name, baseline=decoupled.baseline, delta=delta).fit(runs)
        except ValueError:  # e.g. no sparsity runs for the Frantar law
            continue
        rows.append((name, len(fit.params_), fit))
    table = pd.DataFrame([{"law": n, "parameters": k, "runs": f.n_runs_, "objective": f.objective_,
                           "rmse_log_loss": f.rmse_log_, "rmse_loss": f.rmse_loss_} for n, k, f in rows])
    return table


def _finite(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def fit_json(law, intervals: pd.DataFrame | None, boot=None) -> dict:
    def p(name, value):
        if intervals is None or name not in intervals.index:
            return {"value": float(value), "se": None, "ci": None}
        row = intervals.loc[name]
        return {"value": float(value), "se": _finite(row["se"]), "ci": [_finite(row["lo"]), _finite(row["hi"])]}
    return {"law": law.law, "n_runs": law.n_runs_, "objective": law.objective_,
            "rmse_log_loss": law.rmse_log_, "rmse_loss": law.rmse_loss_,
            "params": {k: p(k, v) for k, v in law.params_.items()},
            "eff": {k: p(f"eff[{k}]", v) for k, v in law.eff_.items()},
            "bootstrap": None if boot is None else {"replicates": len(boot.samples) + boot.n_failed,
                                                     "failed": boot.n_failed},
            "warnings": fit_warnings(law, boot)}


def fit_warnings(law, boot=None) -> list[str]:
    """What a reader should know before trusting the numbers: weak estimates, refits that would not converge."""
    out = list(law.warnings_)
    if boot is not None and boot.n_failed > 0.05 * (len(boot.samples) + boot.n_failed):
        out.append(f"{boot.n_failed} of {len(boot.samples) + boot.n_failed} bootstrap refits failed: the fit is fragile "
                   "and its intervals understate the uncertainty")
    if boot is not None and len(boot.samples) and {"alpha", "beta"} <= set(boot.samples):
        edge = exponent_at_edge(boot.samples[["alpha", "beta"]]).any(axis=1).mean()
        if edge > 0.05:
            out.append(f"{edge:.0%} of bootstrap refits put alpha or beta at the edge of the range searched: those "
                       "resamples lack the distinct sizes or token budgets that identify the law (with --resample "
                       "cells, too few (N, D) cells), so the intervals are wide or unbounded")
    return out


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plots.plt.close(fig)
    return buf.getvalue()


def _table_html(frame: pd.DataFrame, caption: str) -> str:
    """An HTML table with its caption and column headers (pandas writes <th> for every column)."""
    html = frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", border=0, classes="t")
    head_end = html.index(">", html.index("<table")) + 1
    return html[:head_end] + f"<caption>{escape(caption)}</caption>" + html[head_end:]


def _table_md(frame: pd.DataFrame) -> str:
    return frame.fillna("").to_markdown(index=False, floatfmt=".4g") if len(frame.columns) else ""


def build_report(runs: pd.DataFrame, folder: "str | Path", n_boot: int = 200, seed: int = 0, delta: float = 1e-3,
                 grids: dict | None = None, title: str = "capscale report", progress: bool = True,
                 n_jobs: int | None = None, replicates: pd.DataFrame | None = None, baseline: str = BASELINE,
                 level: float = 0.95, law: DecoupledLaw | None = None, boot=None, command: str | None = None) -> Report:
    """Fit, bootstrap, validate, compose and plot `runs` into `folder`; `replicates` (optional seed repeats
    of some runs, not fitted) give the fit-health check its seed-to-seed scatter and the loss figure its seed
    bars. A saved `law` and `boot` (`capscale fit -o`) are reused instead of refitting."""
    folder = writable_folder(folder)
    if law is None:
        law = DecoupledLaw(baseline, delta).fit(runs)
        boot = bootstrap(law, runs, n_boot, seed, n_jobs=n_jobs, progress=progress, level=level) if n_boot else None
    baseline, delta, level = law.baseline, law.delta, boot.level if boot is not None else level
    intervals = boot.intervals(law.values()) if boot else None
    comparison = _law_comparison(runs, law, delta)
    try:
        validation, capacity_omitted = validate(runs, law=law, boot=boot, n_boot=0, progress=progress), None
    except InputError as err:  # labels without a GMSE, or too few formats: the capacity sections say why instead
        validation, capacity_omitted = None, str(err)
    comp = compose_runs(law.eff_, boot)
    paired = paired_comparison(runs, baseline, level)
    stats_ = _statistics(runs, law, boot, validation, comp, baseline, level)
    health = fit_health(law, runs, boot, replicates)
    extrap = extrapolation_check(law, runs) if runs["params"].nunique() > 2 else None
    extrap_summary = None if extrap is None else extrapolation_summary(extrap)
    grid_results = {name: compose_grid(read_grid(path)) for name, path in (grids or {}).items()}

    info = format_table(runs)
    styles = format_styles(info, baseline)
    capacity_table = info.reset_index()[["format", "w_spec", "a_spec", "w_gmse", "a_gmse", "w_bits", "runs"]].rename(
        columns={"w_bits": "bits_per_value"}).assign(
        family=lambda d: styles.loc[d["format"], "family"].to_numpy(),
        capacity=lambda d: pair_rho(d["w_gmse"].to_numpy(), d["a_gmse"].to_numpy()))  # published constants
    eff_table = pd.DataFrame([{"format": f, "family": styles.at[f, "family"], "eff": v,
                               "eff_lo": intervals.loc[f"eff[{f}]", "lo"] if intervals is not None else np.nan,
                               "eff_hi": intervals.loc[f"eff[{f}]", "hi"] if intervals is not None else np.nan}
                              for f, v in law.eff_.items()])
    summary = verdict(validation, stats_["calibration"], capacity_omitted, stats_["mixed"], baseline, stats_["wald"],
                      comp, health, fit_warnings(law, boot), extrap_summary,
                      pd.Series(law.residuals_, index=runs.index).groupby(runs["params"]).mean())
    origin = provenance(runs, seed, law, boot, level, command)

    results = {"title": title, "summary": summary, "provenance": origin, "source": runs.attrs.get("source"),
               "baseline": baseline, "decoupled": fit_json(law, intervals, boot),
               "law_comparison": comparison.to_dict("records"),
               "validation": None if validation is None else validation.as_json(), "composability": comp.to_dict("records"),
               "paired_comparison": paired.to_dict("records"), "health": health.to_dict("records"),
               "capacity": capacity_table.to_dict("records"), "extrapolation": extrap_summary,
               "grids": {n: {k: r[k] for k in ("edge_row", "edge_col", "max_abs_error", "rms_error", "rank1_rms_error")}
                         | {"worst_cell": list(r["worst_cell"])} for n, r in grid_results.items()},
               "skipped_runs": runs.attrs.get("skipped", []), "capacity_omitted": capacity_omitted,
               "calibration": None if stats_["calibration"] is None else stats_["calibration"].as_json(),
               "composability_wald": None if stats_["wald"] is None else stats_["wald"].table.to_dict("records"),
               "paired_mixed": None if stats_["mixed"] is None else stats_["mixed"].table.to_dict("records")}
    (folder / "results.json").write_text(json.dumps(results, indent=1, default=str))

    context = dict(runs=runs, law=law, boot=boot, intervals=intervals, level=level, styles=styles, info=info,
                   capacity_table=capacity_table, eff_table=eff_table, health=health, validation=validation,
                   capacity_omitted=capacity_omitted, stats=stats_, comp=comp, comparison=comparison, paired=paired,
                   extrap=extrap, extrap_summary=extrap_summary, grid_results=grid_results, replicates=replicates)
    sections, figures = build_sections(context)
    images = {key: _figure_png(fig) for key, (_, fig) in figures.items()}
    for key, data in images.items():
        (folder / f"{key}.png").write_bytes(data)
    _render(folder, title, summary, sections, figures, images, origin)
    return Report(folder, results, validation, comp, paired, comparison, health, stats_["calibration"],
                  stats_["wald"], stats_["mixed"], summary)


def _statistics(runs, law, boot, validation, comp, baseline, level) -> dict:
    """The statsmodels tests, where the data allow them (None where not)."""
    has_boot = boot is not None and len(boot.samples) > 2
    out = {"calibration": None, "wald": None, "mixed": None}
    if validation is not None and has_boot and len(validation.table) >= 3:
        out["calibration"] = calibration(validation.table, boot.samples, level)
    if not comp.empty and has_boot:
        out["wald"] = composability_wald(list(comp[["combined", "part1", "part2"]].itertuples(index=False, name=None)),
                                         law.eff_, boot.samples, level)
    try:
        out["mixed"] = paired_mixed(runs, baseline, level)
    except InputError:
        pass
    return out


TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("capscale.analysis", "templates"),
                               autoescape=jinja2.select_autoescape(["html.j2"]), keep_trailing_newline=True)


def _render(folder, title, summary, sections, figures, images, origin):
    """report.md and report.html from their templates: the same summary, sections, figures, tables, provenance."""
    for section in sections:
        section["tables"] = [{"caption": caption, "html": _table_html(table, caption), "md": _table_md(table)}
                             for caption, table in section["tables"]]
        section["figures"] = [{"key": key, "caption": figures[key][0], "png_base64": base64.b64encode(images[key]).decode()}
                              for key in section["figures"]]
    for name in ("report.md", "report.html"):
        (folder / name).write_text(TEMPLATES.get_template(f"{name}.j2").render(
            title=title, summary=summary, sections=sections, provenance=origin,
            provenance_json=json.dumps(origin, indent=1)))
