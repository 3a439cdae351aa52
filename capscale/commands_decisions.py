"""Decision commands: `capscale plan` (the best format and size for a budget) and `capscale frontier` (the
capacity-per-bit frontier of format designs)."""
from __future__ import annotations

import sys

from capscale.analysis.names import TOKEN_LAWS
from capscale.capacity import BASELINE, InputError

from .commands_analysis import _warn, add_fit_file_argument, add_run_arguments, fit_from_args, runs_from_args
from .options import renamed, whole
from .output import emit_json

CURVE_SPAN = (-1.5, 1.5, 25)  # the figure's budgets: 10^-1.5 to 10^1.5 times the one asked, 25 points


def _plan_command(args) -> None:
    if args.figure:
        from capscale.capacity.paths import figure_file
        figure_file(args.figure)  # before any fitting
    import numpy as np
    from capscale.analysis.plan import Budget, parse_amount, parse_speedups, plan, plan_curves
    budget = Budget(memory=parse_amount(args.weight_memory, "--weight-memory") if args.weight_memory else None,
                    flops=parse_amount(args.flops, "--flops") if args.flops else None,
                    tokens=parse_amount(args.tokens, "--tokens") if args.tokens else None)
    runs = runs_from_args(args)
    law = args.law
    if getattr(args, "fit", None) is None and law == "auto":
        from capscale.analysis.constancy import best_supported_law
        from capscale.analysis.studies import STUDIES
        options = STUDIES[args.study].fit_options if getattr(args, "study", None) else {}
        law, why = best_supported_law(runs, args.baseline or BASELINE, args.delta or 1e-3, args.level, **options)
        print(f"law: {why}", file=sys.stderr)
    fit = fit_from_args(args, runs, "decoupled" if law == "auto" else law)
    _warn(fit.warnings)
    speedup = parse_speedups(args.speedup)
    result = plan(fit, budget, args.formats, speedup)
    if args.figure:
        from capscale.analysis.plots_decisions import budget_curves, save
        vary = "memory" if budget.memory else "flops"
        centre = getattr(budget, vary)
        curves = plan_curves(fit, centre * np.logspace(*CURVE_SPAN), vary, budget, args.formats, speedup)
        from capscale.analysis.families import format_styles
        from capscale.analysis.runs import format_table
        styles = format_styles(format_table(fit.runs), fit.baseline)
        save(budget_curves(curves, styles, marked=centre), args.figure)
        print(f"figure written to {args.figure}", file=sys.stderr)
    if args.json:
        plan_json = result.as_json()
        plan_json.pop("level", None)
        emit_json("plan", plan_json.pop("formats"), result.level, **plan_json)
        return
    shown = result.table.reset_index()[["rank", "format", "law", "efficiency_from", "eff", "bits", "params", "tokens",
                                         "loss", "loss_lo", "loss_hi", "p_best", "extrapolated"]]
    print(shown.to_string(index=False, float_format="{:.4g}".format))
    print(result.verdict())


def add_plan_command(sub) -> None:
    p = sub.add_parser(
        "plan", help="the loss-optimal format, model size and tokens for a memory or compute budget",
        description="For each format: the model size N and tokens D that minimise the fitted law's loss within the "
                    "budget (weights' memory = N x bits per value / 8; compute = 6 N D / speed-up; tokens: the data "
                    "there is), ranked, with bootstrap intervals on the loss and the share of replicates in which each "
                    "format is best. Formats the fit lacks (any spec or W/A label) get rho(GMSE) at the published "
                    "constants. Optima outside the fitted sizes or token counts are flagged as extrapolated.")
    add_run_arguments(p, bootstrap_default=200)
    add_fit_file_argument(p)
    p.add_argument("--weight-memory", metavar="BYTES", help="the model weights' memory budget: bytes, or with a unit "
                                                           "(4GB, 512MiB)")
    renamed(p, "--memory", "--weight-memory (bytes of the weights; train's budget is --device-memory)")
    p.add_argument("--flops", metavar="F", help="training compute budget in FLOPs (6 N D), e.g. 1e20")
    p.add_argument("--tokens", metavar="D", help="training tokens available (needed with --weight-memory alone)")
    p.add_argument("--law", default="auto", choices=("auto", "decoupled", *TOKEN_LAWS),
                   help="the law to plan under; auto (default): the decoupled law unless the paired drift test finds a "
                        "format whose cost changes with tokens per parameter, then the token-dependent law that best "
                        "predicts the held-out largest budgets (the choice and its reason are printed)")
    p.add_argument("--formats", nargs="+", metavar="FORMAT", default=None,
                   help="formats to consider: fitted labels, or specs/W/A labels for formats never trained "
                        "(default: every fitted format)")
    p.add_argument("--speedup", action="append", metavar="FORMAT=FACTOR", default=None,
                   help="training speed-up of a format on your hardware, e.g. int4/int4=2 (default 1 for all)")
    p.add_argument("--figure", metavar="PATH", help="also draw loss against the budget per format (.png or .svg)")
    p.set_defaults(func=_plan_command)


def _constants(text: str | None) -> dict | None:
    """--constants: 'published', or L=..,F=..,C=.. (e.g. the constants `capscale validate` fitted)."""
    if text in (None, "published"):
        return None
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("L", "F", "C"):
            raise InputError(f"--constants {text!r}: expected 'published' or L=..,F=..,C=.. (e.g. L=1,F=0.41,C=1.39)")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise InputError(f"--constants {text!r}: {key.strip()} is not a number") from None
        if not 0 < out[key.strip()] < 100:
            raise InputError(f"--constants {text!r}: {key.strip()} must be positive and below 100")
    return out


def _frontier_command(args) -> None:
    if args.figure:
        from capscale.capacity.paths import figure_file
        figure_file(args.figure)
    from capscale.analysis.frontier import frontier
    result = frontier(args.families or None, samples=args.samples, seed=args.seed,
                      constants=_constants(args.constants), cache=not args.no_cache)
    if result.skipped:
        print(f"warning: {len(result.skipped)} design(s) do not parse and were skipped: "
              + "; ".join(f"{s}: {r}" for s, r in list(result.skipped.items())[:5]), file=sys.stderr)
    if args.figure:
        from capscale.analysis.plots_decisions import capacity_frontier, save
        save(capacity_frontier(result.table, result.constants), args.figure)
        print(f"figure written to {args.figure}", file=sys.stderr)
    table = result.table if args.all else result.at_bits(args.bits) if args.bits else result.frontier
    if args.json:
        front = result.as_json()
        emit_json("frontier", front.pop("designs", front.pop("table", [])), 0.95, shown=table["spec"].tolist(), **front)
        return
    columns = ["family", "spec", "bits", "gmse", "stderr", "method", "capacity", "shannon_capacity",
               "bits_over_shannon", "on_frontier"]
    print(table[columns].to_string(index=False, float_format="{:.4g}".format))
    print(f"{len(result.table)} designs, {int(result.table['on_frontier'].sum())} on the frontier (no design has "
          "more capacity at as few bits); capacity = rho(GMSE) at "
          + ("the published constants" if args.constants in (None, "published") else args.constants))


def add_frontier_command(sub) -> None:
    from capscale.analysis.names import FRONTIER_FAMILIES
    p = sub.add_parser(
        "frontier", help="the capacity-per-bit frontier of format designs, with Shannon's bound",
        description="Expand format families (brace ranges over spec parameters, e.g. "
                    "'int{2..8}(group={32,64,128,row},scale_format={fp16,e8m0})'), measure each design's Gaussian MSE "
                    "(exact where possible, Monte Carlo with standard errors otherwise; cached), and report the "
                    "Pareto frontier of capacity rho(GMSE) against bits per value beside Shannon's bound "
                    f"rho(2^-2R). Built-in families: {', '.join(FRONTIER_FAMILIES)} (the default: all of them).")
    p.add_argument("families", nargs="*", metavar="FAMILY", help="built-in family names or brace specs")
    p.add_argument("--samples", type=whole(2, 1 << 26), default=1 << 18,
                   help="Monte Carlo values per design (default: %(default)s)")
    p.add_argument("--seed", type=whole(0), default=0, help="Monte Carlo seed (default: %(default)s)")
    p.add_argument("--constants", default="published", metavar="published|L=..,F=..,C=..",
                   help="rho constants for capacity (default: %(default)s)")
    p.add_argument("--bits", type=float, default=None, help="show the designs within half a bit of BITS, best first")
    p.add_argument("--all", action="store_true", help="show every design, not only the frontier")
    p.add_argument("--no-cache", action="store_true", help="measure again instead of reading the GMSE cache")
    p.add_argument("--figure", metavar="PATH", help="also draw the frontier (.png or .svg)")
    p.add_argument("--json", action="store_true", help="print JSON (every design) instead of a table")
    p.set_defaults(func=_frontier_command)


ADDERS = (add_plan_command, add_frontier_command)
