"""The report's sections, in the order of its argument: what the formats are (capacity), whether the fit can be
read (fit and health), what it says (efficiencies), whether capacity predicts it, whether capacities compose,
which law fits, what the runs show without any law (paired), how far the law extrapolates, and the raw numbers.
Each section pairs its figures with its tables; each figure's caption doubles as its alt text."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from . import plots, plots_inference
from .studies import published_table
from .verdicts import format_interval


@dataclass
class ReportContext:
    """Everything the sections are built from: the fit, its bootstrap and each analysis's result."""
    runs: pd.DataFrame
    law: object                 # the fitted DecoupledLaw
    boot: object                # BootstrapResult, or None without a bootstrap
    intervals: pd.DataFrame     # per parameter: lo, hi, se
    level: float
    styles: pd.DataFrame        # per format: family, colour, marker
    info: pd.DataFrame          # analysis.runs.format_table
    capacity_table: pd.DataFrame
    eff_table: pd.DataFrame
    health: pd.DataFrame
    validation: object          # Validation, or None where capacity is unknown
    capacity_omitted: list
    stats: dict                 # the statsmodels tests: calibration, wald, mixed
    comp: pd.DataFrame          # composability
    comparison: pd.DataFrame    # law comparison
    paired: pd.DataFrame
    extrap: pd.DataFrame        # the extrapolation check, or None
    extrap_errors: dict         # its errors, or None
    grid_results: dict
    replicates: int
    published: pd.DataFrame | None = None  # analysis.studies.published_comparison, for a published study
    decision: dict | None = None  # plan, curves and frontier for "What to use" (analysis.report.decisions), or why not
    backward: dict | None = None  # {"table": analysis.backward.backward_table, "regression": OLS or None}
    fit: object = None          # the LawFit itself
    extrap_tokens: pd.DataFrame = None  # the same, holding out the largest token budgets per parameter, or None
    extrap_tokens_errors: dict = None
    drift: object = None        # the paired drift test (analysis.constancy.ConstancyTest)


def build_sections(ctx: ReportContext) -> tuple[list[dict], dict]:
    """[{id, heading, text, figures: [key], tables: [(caption, DataFrame)]}] and {key: (caption, Figure)}."""
    law, boot, level, styles, baseline = ctx.law, ctx.boot, ctx.level, ctx.styles, ctx.law.baseline
    pct = f"{level:.0%}"
    figures, sections = {}, []

    def section(key, heading, text, figs=(), tables=()):
        for fig_key, caption, fig in figs:
            figures[fig_key] = (caption, fig)
        sections.append({"id": key, "heading": heading, "text": text, "figures": [k for k, _, _ in figs],
                         "tables": list(tables)})

    cap = ctx.capacity_table
    section("capacity", "1. Capacity of the formats",
            "Each format's Gaussian MSE (exact where available, else Monte Carlo) and its capacity rho with the "
            "published constants; a weights/activations pair's capacity is the product of the two; a blank spec is "
            "uncompressed. Families (colour and marker in every figure) follow the format's components.",
            [("capacity_vs_bits", "Capacity rho of each format against its weights' bits per value, coloured and "
              "marked by family.", plots.capacity_vs_bits(cap, styles))] if cap["capacity"].notna().any() else [],
            [("Formats", cap.fillna({"w_format": "", "a_format": ""}))])

    params = pd.DataFrame([{"parameter": k, "value": v,
                            f"{pct} interval": format_interval(*ctx.intervals.loc[k, ["lo", "hi"]]) if boot else "",
                            "s.e.": ctx.intervals.loc[k, "se"] if boot else float("nan")}
                           for k, v in law.params_.items()])
    figs = [("parity", f"Predicted against observed loss for all {law.n_runs_} runs, by family; the dashed line is "
             "perfect prediction.", plots.parity(ctx.runs, law, styles)),
            ("residuals", "Residuals of the decoupled fit against model size N and tokens D, with their mean per "
             "value: a size or token budget the law misfits shows as a mean away from zero.",
             plots.residuals_vs_nd(ctx.runs, law, styles))]
    if boot is not None and len(boot.samples) > 2:
        figs.append(("bootstrap_joint", "Bootstrap refits in the (alpha, E) and (alpha, beta) planes, with the fit "
                     "to all runs as a star: the trade-offs behind the marginal intervals.",
                     plots_inference.bootstrap_joint(boot.samples, law.params_)))
    section("fit", "2. The fit and its health",
            f"loss = A (N eff)^-alpha + B D^-beta + E over {law.n_runs_} runs, Huber (delta {law.delta:g}) on log "
            f"loss; objective {law.objective_:.4e}, residual RMSE {law.rmse_log_:.4f} in log loss. "
            + (f"{len(boot.samples)} bootstrap refits ({boot.n_failed} failed), {pct} percentile intervals. "
               if boot else "No bootstrap. ")
            + "The health checks say whether efficiencies can be read from this fit: E away from its bound, misfit "
              "against the seed-to-seed scatter, and how many formats the intervals tell apart.",
            figs, [("Fitted constants", params), ("Fit health", ctx.health)])

    eff = ctx.eff_table
    section("efficiency", "3. Efficiency per format",
            f"The efficiency multiplier of each format (effective parameters per parameter) from the decoupled law, "
            f"with {pct} bootstrap intervals; '{baseline}' is fixed at 1.",
            [("efficiency_forest", f"Fitted efficiency per format with its {pct} bootstrap interval, best first, "
              "coloured by family.", plots_inference.efficiency_forest(eff, styles, baseline, level))]
            if boot is not None else [],
            [("Efficiencies", eff.assign(**{f"{pct} interval": [format_interval(a, b) for a, b in zip(eff.eff_lo, eff.eff_hi)]})
              [["format", "family", "eff", f"{pct} interval"]])]
            + ([("Published efficiencies: capscale's fit and its leave-one-format-out capacity prediction against the "
                 "values the source publishes", published_table(ctx.published, level))] if ctx.published is not None else []))

    if ctx.backward is not None:
        section("backward", "3b. Data efficiency of the backward formats", *_backward_section(ctx))

    v, cal = ctx.validation, ctx.stats["calibration"]
    if v is None:
        section("capacity-vs-efficiency", "4. Capacity against efficiency", f"Omitted: {ctx.capacity_omitted}")
    else:
        t = v.table.assign(fitted_interval=lambda d: [format_interval(a, b) for a, b in zip(d.fitted_lo, d.fitted_hi)],
                           prediction_interval=lambda d: [format_interval(a, b) for a, b in zip(d.pred_lo, d.pred_hi)])
        rho_ci = ", ".join(f"{k} = {val:.3g} {format_interval(*v.constants_ci[k][:2])}" if k in v.constants_ci else
                           f"{k} = {val:.3g}" for k, val in v.constants.items())
        tables = [("Leave-one-format-out predictions", t[["format", "w_gmse", "a_gmse", "capacity", "fitted",
                                                         "fitted_interval", "predicted", "prediction_interval",
                                                         "inside", "overlap"]])]
        if cal is not None:
            tables.append(("Calibration regression (WLS of log fitted on log predicted efficiency)", cal.coefficients()))
        section("capacity-vs-efficiency", "4. Capacity against efficiency",
                f"rho fitted to the fitted efficiencies ({v.form} form, anchored at the baseline): {rho_ci} ({pct}). "
                "Leave-one-format-out: each format predicted by rho refitted without it. inside: the prediction falls "
                f"inside the fitted {pct} interval; overlap (weaker): the two intervals share a value. {v.verdicts()}. "
                + ("" if cal is None else f"Calibration: {cal.verdict()}.")
                + ("" if not v.warnings else " Warnings: " + "; ".join(v.warnings) + "."),
                [("efficiency_vs_capacity", "Fitted efficiency with its interval against the fitted rho curve and its "
                  "bootstrap band; a W/A pair sits at the GMSE whose capacity equals the product of its two; the "
                  "shaded bar beside each point is its leave-one-format-out prediction interval.",
                  plots_inference.efficiency_vs_capacity(v, styles))], tables)

    wald, comp = ctx.stats["wald"], ctx.comp
    figs, tables = [], []
    if not comp.empty:
        table = wald.table if wald is not None else comp
        figs.append(("composability", f"eff(combined) / (eff(part 1) x eff(part 2)) with its {pct} interval; the "
                     "dashed line at 1 is 'the capacities multiply'.", plots_inference.composability(table, level)))
        tables.append(("Composability on trained runs" + (" (Wald tests, bootstrap covariance)" if wald else ""), table))
    for name, r in ctx.grid_results.items():
        figs.append((f"grid_{name}", f"Published capacity grid '{name}' and the error of predicting each cell as the "
                     "product of its edges.", plots_inference.grid_heatmaps(name, r)))
        tables.append((f"Capacity grid '{name}': product of edges (row {r['edge_row']}, column {r['edge_col']}; "
                       f"max |error| {r['max_abs_error']:.3f}, rank-1 RMS {r['rank1_rms_error']:.3f})",
                       r["product"].round(3).reset_index()))
    section("composability", "5. Do capacities compose?",
            "A combined format (weights and activations, or sparsity and quantization) against its parts: "
            "log eff(AB) - log eff(A) - log eff(B) = 0 tested with the bootstrap covariance of the three log "
            "efficiencies (Wald); on published grids, each cell predicted as the product of its edges."
            if figs else "Not tested: no combined format was trained with both its parts, and no grid was given.",
            figs, tables)

    section("laws", "6. Laws compared",
            "Fit errors of the decoupled law (one efficiency per format), the unified law (eff = rho(GMSE)), Kumar et "
            "al.'s bits law and, on sparse runs, Frantar et al.'s law. Their constants, with bootstrap intervals: "
            "`capscale fit --law NAME`.", (), [("Fit errors per law", ctx.comparison)])

    mixed = ctx.stats["mixed"]
    figs = [("loss_vs_params", f"Loss against model size per tokens-per-parameter ratio (seed means; bars: seed "
             f"standard deviation where repeated) with the fitted law, and below, loss relative to '{baseline}' at the "
             "same (N, D).", plots.loss_vs_params(ctx.runs, law, styles, ctx.replicates))]
    tables = [("Paired comparison (mean log loss ratio over shared cells, t-interval, Wilcoxon)", ctx.paired)]
    if mixed is not None and len(mixed.table):
        figs.insert(0, ("paired_forest", f"Mixed-model log-loss difference to '{baseline}' at equal (N, D) with its "
                        f"{pct} interval; open markers: not different after Holm adjustment.",
                        plots_inference.paired_forest(mixed.table, styles, baseline, level)))
        tables.insert(0, ("Mixed model: log loss ~ format + random intercept per (N, D) cell", mixed.table))
    section("paired", "7. Paired comparisons at equal size and tokens",
            f"Law-free: each format's log loss against '{baseline}' trained at the same (N, D). The mixed model has a "
            f"random intercept per cell (seeds nest in cells); p-values Holm-adjusted over the formats, with the "
            "Wilcoxon signed-rank test on cell means beside it.", figs, tables)

    figs, tables, text = [], [], []
    if ctx.extrap is not None:
        text.append(f"Fitted without the largest models (N = {ctx.runs['params'].max():.4g}), then asked to predict them: "
                    f"{ctx.extrap_errors['text']}.")
        figs.append(("extrapolation", "Relative error of each held-out run by format; the dashed line is the signed mean "
                     "error: points all on one side mean the law is biased when it extrapolates.",
                     plots.extrapolation(ctx.extrap, styles)))
        tables.append(("Held-out runs (largest models)", ctx.extrap))
    if ctx.extrap_tokens is not None:
        text.append(f"Fitted without the {ctx.extrap_tokens_errors['held_out']}, then asked to predict them (where a "
                    f"format's cost grows with D/N a constant efficiency fails here, one way): "
                    f"{ctx.extrap_tokens_errors['text']}. Every law's errors on this hold-out are in section 2's "
                    "'Fit errors per law'.")
        figs.append(("extrapolation_tokens", "Relative error of each run at the held-out largest token budgets per "
                     "parameter, by format.", plots.extrapolation(ctx.extrap_tokens, styles)))
        tables.append(("Held-out runs (largest token budgets)", ctx.extrap_tokens))
    if ctx.drift is not None:
        tables.append(("Paired drift test: does each format's cost change with tokens per parameter?",
                       ctx.drift.table))
        text.append(ctx.drift.sentence())
    if text:
        section("extrapolation", "8. Extrapolation and the token budget", " ".join(text), figs, tables)

    if ctx.decision is not None:
        section("what-to-use", "9. What to use", *_what_to_use(ctx.decision, styles))

    raw = ctx.runs[["format", "params", "tokens", "loss"] + (["seed"] if "seed" in ctx.runs else [])].assign(
        predicted=law.predict(ctx.runs), residual=-law.residuals_).sort_values(["format", "params", "tokens"])
    skipped = ctx.runs.attrs.get("skipped", [])
    section("appendix", "Appendix: the runs",
            f"Every fitted run with its prediction and log residual (log observed - log predicted). {len(skipped)} run(s) not fitted (status not ok).",
            (), [("Fitted runs", raw)] + ([("Runs not fitted", pd.DataFrame(skipped))] if skipped else []))
    return sections, figures


def _what_to_use(decision: dict, styles) -> tuple:
    """The plan at the budget of the largest fitted model's uncompressed weights, its curves, and the frontier of
    the built-in format families at 4 bits."""
    from . import plots_decisions
    if "omitted" in decision:
        return f"Omitted: {decision['omitted']}", (), ()
    plan, front = decision["plan"], decision["frontier"]
    unranked = decision.get("unranked", {})
    not_ranked = (f" Not ranked ({len(unranked)} of {len(unranked) + len(plan.table)} formats): "
                  + "; ".join(f"{f}: {why}" for f, why in unranked.items()) + "; the ranking and its shares are "
                  "among the ranked formats only.") if unranked else ""
    text = (f"{plan.verdict()}{not_ranked} The budget is the largest fitted model's weights in the baseline format (each format "
            "gets the parameters that memory holds) and the largest fitted token count; capscale plan answers for "
            "any other budget, with speed-ups. Formats ranked by predicted loss, with the share of bootstrap "
            "replicates in which each is the best. The capacity frontier (rho(GMSE) at the published constants "
            f"against bits per value, {len(front.table)} designs of the built-in families) puts "
            f"{front.at_bits(4).iloc[0]['spec']} first near 4 bits; capscale frontier explores other families.")
    figs = [("plan_curves", "Predicted loss at each format's optimum against the weight-memory budget (the dotted line "
             "is the budget of the table), and each format's gap to the best.",
             plots_decisions.budget_curves(decision["curves"], styles, marked=plan.budget.memory)),
            ("frontier", "Capacity of format designs against bits per value; the step line is the Pareto frontier, "
             "the dashed curve Shannon's bound rho(2^-2R).",
             plots_decisions.capacity_frontier(front.table, front.constants))]
    shown = plan.table.reset_index()[["rank", "format", "eff", "bits", "params", "tokens", "loss", "loss_lo",
                                      "loss_hi", "p_best", "extrapolated"]]
    near4 = front.at_bits(4).head(10)[["family", "spec", "bits", "gmse", "capacity", "bits_over_shannon"]]
    return text, figs, [(f"Best (N, D) per format at {plan.budget.describe()}", shown),
                        ("Designs within half a bit of 4 bits, most capacity first", near4)]


def _backward_section(ctx) -> tuple:
    """effD per backward configuration, the effN-effD plane, and the exploratory regression of effD."""
    from .backward import efficiency_plane
    table, reg, pct = ctx.backward["table"], ctx.backward["regression"], f"{ctx.level:.0%}"
    text = ("The runs train some configurations with formats in the backward pass, so the law has a data efficiency "
            "per backward configuration: loss = A (N effN)^-alpha + B (D effD)^-beta + E, exact gradients at "
            f"effD = 1 ({pct} bootstrap intervals). Each backward format's Gaussian error is split into squared bias "
            "and rounding variance (nearest rounding is all bias, stochastic rounding all variance). ")
    text += ("The regression of log effD on the formats' log GMSE and bias share is exploratory: "
             f"{len(reg.model.endog)} configurations, R^2 {reg.rsquared:.2f}." if reg is not None else
             "Too few backward configurations with a known GMSE for the exploratory regression of effD (its "
             "coefficients and two residual degrees of freedom).")
    shown = table.assign(**{f"{pct} interval": [format_interval(a, b) for a, b in zip(table.effD_lo, table.effD_hi)]})
    tables = [("Data efficiency per backward configuration", shown[["backward", "effD", f"{pct} interval", "runs",
                                                                      "gmse", "bias_sq", "variance"]])]
    if reg is not None:
        coefficients = pd.DataFrame({"term": reg.params.index, "coef": reg.params.to_numpy(),
                                     "std err": reg.bse.to_numpy(), "p": reg.pvalues.to_numpy()})
        tables.append(("Exploratory regression of log effD (OLS)", coefficients))
    figs = [("efficiency_plane", "Each trained configuration at its forward pair's effN and its backward formats' "
             "effD, with both intervals: a format that costs parameters moves left, one that costs data moves down.",
             efficiency_plane(ctx.fit, table))]
    return text, figs, tables
