"""The report: every analysis of a run table in one folder: report.html (self-contained, figures
embedded), report.md (figures beside it as PNG), results.json, and the figures."""
from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd

from capscale.capacity import BASELINE, InputError, bits_of, pair_rho

from . import plots
from .bootstrap import bootstrap, extrapolation_check, extrapolation_summary
from .compare import paired_comparison
from .compose import compose_grid, compose_runs, read_grid
from .health import fit_health
from .laws import DecoupledLaw, make_law
from .runs import format_table
from .statistics import calibration, composability_wald, paired_mixed
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
    return out


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plots.plt.close(fig)
    return buf.getvalue()


def _table_html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", border=0, classes="t")


def format_interval(lo, hi, spec: str = ".3g") -> str:
    """'[lo, hi]', or '' where there is no interval (no bootstrap)."""
    return "" if pd.isna(lo) else f"[{lo:{spec}}, {hi:{spec}}]"


def build_report(runs: pd.DataFrame, folder: "str | Path", n_boot: int = 200, seed: int = 0, delta: float = 1e-3,
                 grids: dict | None = None, title: str = "capscale report", progress: bool = True,
                 n_jobs: int | None = None, replicates: pd.DataFrame | None = None, baseline: str = BASELINE,
                 level: float = 0.95, law: DecoupledLaw | None = None, boot=None) -> Report:
    """Fit, bootstrap, validate, compose and plot `runs` into `folder`; `replicates` (optional seed repeats
    of some runs, not fitted) give the fit-health check its seed-to-seed scatter. A saved `law` and `boot`
    (`capscale fit -o`) are reused instead of refitting."""
    folder = writable_folder(folder)
    if law is None:
        law = DecoupledLaw(baseline, delta).fit(runs)
        boot = bootstrap(law, runs, n_boot, seed, n_jobs=n_jobs, progress=progress, level=level) if n_boot else None
    baseline, level = law.baseline, boot.level if boot is not None else level
    pct = f"{level:.0%}"
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

    info = format_table(runs)
    capacity_table = info.reset_index()[["format", "w_spec", "a_spec", "w_gmse", "a_gmse", "runs"]].assign(
        bits_per_value=lambda d: [_bits_or_nan(w) for w in d["w_spec"]],
        capacity=lambda d: pair_rho(d["w_gmse"].to_numpy(), d["a_gmse"].to_numpy()))  # published constants
    eff_table = pd.DataFrame([{"format": f, "eff": v,
                               "eff_lo": intervals.loc[f"eff[{f}]", "lo"] if intervals is not None else np.nan,
                               "eff_hi": intervals.loc[f"eff[{f}]", "hi"] if intervals is not None else np.nan}
                              for f, v in law.eff_.items()])
    per_bit = eff_table.merge(capacity_table[["format", "bits_per_value"]], on="format").rename(columns={"eff": "fitted"})

    figures = {"loss_vs_params": ("Loss against model size, with the fitted decoupled law", plots.loss_vs_params(runs, law)),
               "residuals": ("Residuals of the decoupled fit by format", plots.residuals(runs, law))}
    if validation is not None:
        figures["efficiency_vs_gmse"] = ("Fitted efficiency against Gaussian MSE, with the fitted rho curve",
                                         plots.efficiency_vs_gmse(validation, validation.draws))
        figures["loo_predictions"] = ("Leave-one-format-out capacity predictions against fitted efficiencies",
                                      plots.loo_predictions(validation))
    if per_bit["bits_per_value"].notna().any():
        figures["per_bit"] = ("Fitted efficiency against bits per value", plots.per_bit(per_bit.dropna()))
    if boot is not None and len(boot.samples):
        figures["bootstrap"] = ("Bootstrap distributions", plots.bootstrap_distributions(boot.samples, law.formats_))
    if not comp.empty:
        figures["composability"] = ("Composability on trained runs", plots.composability(comp, level))
    grid_results = {}
    for name, path in (grids or {}).items():
        grid_results[name] = compose_grid(read_grid(path))
        figures[f"grid_{name}"] = (f"Capacity grid '{name}': product-of-edges prediction",
                                   plots.grid_heatmaps(name, grid_results[name]))
    images = {key: _figure_png(fig) for key, (_, fig) in figures.items()}
    for key, data in images.items():
        (folder / f"{key}.png").write_bytes(data)

    results = {"title": title, "source": runs.attrs.get("source"), "baseline": baseline,
               "decoupled": fit_json(law, intervals, boot), "law_comparison": comparison.to_dict("records"),
               "validation": None if validation is None else validation.as_json(), "composability": comp.to_dict("records"),
               "paired_comparison": paired.to_dict("records"), "health": health.to_dict("records"),
               "capacity": capacity_table.to_dict("records"),
               "extrapolation": None if extrap is None else extrapolation_summary(extrap),
               "grids": {n: {k: r[k] for k in ("edge_row", "edge_col", "max_abs_error", "rms_error", "rank1_rms_error")}
                         | {"worst_cell": list(r["worst_cell"])} for n, r in grid_results.items()},
               "skipped_runs": runs.attrs.get("skipped", []), "capacity_omitted": capacity_omitted,
               "calibration": None if stats_["calibration"] is None else stats_["calibration"].as_json(),
               "composability_wald": None if stats_["wald"] is None else stats_["wald"].table.to_dict("records"),
               "paired_mixed": None if stats_["mixed"] is None else stats_["mixed"].table.to_dict("records")}
    (folder / "results.json").write_text(json.dumps(results, indent=1, default=str))

    params = pd.DataFrame([{"parameter": k, "value": v,
                            f"{pct} CI": format_interval(*intervals.loc[k, ["lo", "hi"]]) if intervals is not None else "",
                            "s.e.": intervals.loc[k, "se"] if intervals is not None else np.nan}
                           for k, v in law.params_.items()])
    effs = eff_table.assign(**{f"{pct} CI": [format_interval(a, b) for a, b in zip(eff_table.eff_lo, eff_table.eff_hi)]})[
        ["format", "eff", f"{pct} CI"]]
    sections = [
        ("Capacity of the formats", "GMSE (exact where available, else Monte Carlo) and capacity rho with the "
         "published constants; a weights/activations pair's capacity is the product; blank spec = uncompressed.",
         capacity_table.fillna({"w_spec": "", "a_spec": ""})),
        ("Decoupled fit", f"loss = A (N eff)^-alpha + B D^-beta + E over {law.n_runs_} runs; objective "
         f"{law.objective_:.4e} (sum of Huber, delta {delta:g}, on log loss); residual RMSE {law.rmse_log_:.4f} "
         f"in log loss, {law.rmse_loss_:.4f} in loss; "
         + (f"{len(boot.samples)} bootstrap refits ({boot.n_failed} failed)." if boot else "no bootstrap."), params),
        ("Fit health", "Can efficiencies be read from this fit? E away from its bound, misfit against the "
         f"seed-to-seed scatter, and which formats the {pct} intervals tell apart.", health),
        ("Efficiency per format", f"{pct} bootstrap intervals; baseline '{baseline}' fixed at 1.", effs),
        ("Paired comparison at equal size and tokens", f"Law-free: mean log(loss / loss of '{baseline}') over the "
         f"(N, D) cells both formats were trained at, {pct} t-interval, cells where the format is worse, Wilcoxon p.",
         paired),
        ("Laws compared", "Fit errors of the decoupled law (one efficiency per format), the unified law "
         "(eff = rho(GMSE)), Kumar et al.'s bits law and, on sparse runs, Frantar et al.'s law.", comparison),
    ]
    sections.append(_validation_section(validation) if validation is not None else
                    ("Capacity predictions against trained runs", f"Omitted: {capacity_omitted}", pd.DataFrame()))
    if stats_["calibration"] is not None:
        cal = stats_["calibration"]
        sections.append(("Calibration: does capacity predict efficiency?", "WLS of log fitted efficiency on log "
                         "leave-one-out predicted capacity, weights from the bootstrap variances. " + cal.verdict() + ".",
                         cal.coefficients()))
    if stats_["wald"] is not None:
        sections.append(("Composability: Wald tests", "log eff(AB) - log eff(A) - log eff(B) = 0, variance from the "
                         "bootstrap covariance of the three log efficiencies.", stats_["wald"].table))
    if stats_["mixed"] is not None:
        sections.append(("Paired differences: mixed model", f"log loss ~ format + a random intercept per (N, D) cell; "
                         f"difference to '{baseline}' with its {pct} interval, p and Holm-adjusted p over the "
                         f"{len(stats_['mixed'].table)} formats; the Wilcoxon signed-rank p on cell means beside it.",
                         stats_["mixed"].table))
    if not comp.empty:
        sections.append(("Composability", "Ratio eff(combined) / (eff(part 1) x eff(part 2)); 1 inside the "
                                          "interval means the capacities multiply.", comp))
    if extrap is not None:
        sections.append(("Extrapolation", f"Fitted without the largest models (N = {runs['params'].max():.4g}), "
                                          "then predicted them.", extrap))
    for name, r in grid_results.items():
        sections.append((f"Capacity grid '{name}'", f"Edges: row {r['edge_row']}, column {r['edge_col']}; "
                         f"max |error| {r['max_abs_error']:.3f}, RMS {r['rms_error']:.3f}, rank-1 RMS "
                         f"{r['rank1_rms_error']:.3f}; worst cell {r['worst_cell'][:2]}.",
                         r["product"].round(3).reset_index()))
    _render(folder, title, sections, figures, images)
    return Report(folder, results, validation, comp, paired, comparison, health, stats_["calibration"],
                  stats_["wald"], stats_["mixed"])


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


def _bits_or_nan(spec) -> float:
    try:
        return bits_of(spec)
    except InputError:
        return float("nan")


def _validation_section(validation):
    table = validation.table.assign(
        fitted_ci=lambda d: [format_interval(a, b) for a, b in zip(d.fitted_lo, d.fitted_hi)],
        predicted_interval=lambda d: [format_interval(a, b) for a, b in zip(d.pred_lo, d.pred_hi)])
    table = table[["format", "w_gmse", "a_gmse", "capacity", "fitted", "fitted_ci", "predicted", "predicted_interval",
                   "inside", "overlap"]]
    return ("Capacity predictions against trained runs", "Leave-one-format-out: predicted = rho refitted without "
            f"the format. inside: the prediction falls inside the fitted {validation.level:.0%} interval; overlap (weaker): the "
            f"prediction interval and the fitted interval share a value. {validation.verdicts()}.", table)


TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("capscale.analysis", "templates"),
                               autoescape=jinja2.select_autoescape(["html.j2"]), keep_trailing_newline=True)


def _render(folder, title, sections, figures, images):
    """report.md and report.html from their templates: the same sections, tables and figures."""
    sections = [{"heading": h, "text": text, "table_html": _table_html(table),
                 "table_md": table.to_markdown(index=False, floatfmt=".4g")} for h, text, table in sections]
    figures = [{"key": key, "caption": caption, "png_base64": base64.b64encode(images[key]).decode()}
               for key, (caption, _) in figures.items()]
    for name in ("report.md", "report.html"):
        (folder / name).write_text(TEMPLATES.get_template(f"{name}.j2").render(title=title, sections=sections,
                                                                              figures=figures))
