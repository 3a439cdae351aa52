"""Analysis commands: `capscale fit | validate | predict | compose | report | demo`.

Building the parser imports nothing heavy (the choices come from `analysis.names`); each command imports the
analysis it runs, so `capscale gmse` never loads pandas, statsmodels or matplotlib."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from capscale.analysis.names import DEFAULT_STUDY, LAW_NAMES, TOKEN_LAWS, MAX_REPLICATES, RESAMPLING_UNITS, RHO_FORMS, STUDY_NAMES
from capscale.capacity import BASELINE, InputError

from .options import level, nonnegative, positive, renamed, whole

MAX_JOBS = 256
from .output import emit_json, print_table


def add_run_arguments(p, bootstrap_default: int = 0, runs_option: bool = False) -> None:
    help_runs = "run table: CSV or JSON lines (format, params, tokens, loss, ...)"
    if runs_option:
        p.add_argument("--runs", metavar="RUNS", help=help_runs)
    else:
        p.add_argument("runs", metavar="RUNS", nargs="?", help=help_runs + " (or --study)")
    p.add_argument("--study", choices=STUDY_NAMES, default=None,
                   help="instead of RUNS, a study shipped inside the package (quest, t5, quartet: published runs; cpu: "
                        "capscale's)")
    p.add_argument("--drop-duplicates", action="store_true",
                   help="drop ok rows that repeat an earlier row exactly (format, params, tokens, loss, seed), with a "
                        "count, instead of refusing the table")
    p.add_argument("--baseline", default=None, help=f"label of the uncompressed baseline (eff = 1; default {BASELINE})")
    p.add_argument("--query", default=None, help="rows to keep: comparisons of columns with numbers or labels, "
                                                 "joined by and/or/not, e.g. \"params > 2e4 and format != 'int2'\"")
    p.add_argument("--map", action="append", default=None, metavar="SCHEMA=COLUMN,...",
                   help="read other column names, e.g. --map loss=val_loss,params=n_params")
    p.add_argument("--bootstrap", type=whole(0, MAX_REPLICATES), default=bootstrap_default, metavar="B",
                   help=f"bootstrap replicates (default: %(default)s, at most {MAX_REPLICATES:,})")
    p.add_argument("--seed", type=whole(0), default=0, help="bootstrap seed (default: %(default)s)")
    p.add_argument("--resample", default="formats", choices=RESAMPLING_UNITS,
                   help="bootstrap unit: runs within each format, or whole (N, D, seed) cells with all their formats")
    p.add_argument("--delta", type=positive, default=None, help="Huber delta on log-loss residuals (default 1e-3)")
    p.add_argument("--level", type=level, default=0.95, help="confidence level of every interval (default 0.95)")
    p.add_argument("--jobs", type=whole(1, MAX_JOBS), default=None,
                   help=f"bootstrap worker processes (default: the cores, up to 8; at most {MAX_JOBS})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a text summary")


def _warn(messages) -> None:
    for message in messages:
        print(f"warning: {message}", file=sys.stderr)


def runs_from_args(args):
    from capscale.analysis.runs import load_runs
    if (args.runs is None) == (args.study is None):
        raise InputError("give a run table (RUNS) or a shipped study (--study NAME), one of the two")
    if args.study:
        from capscale.analysis.studies import study_runs
        source = study_runs(args.study)
        source.attrs["source"] = f"the shipped {args.study} study"
    else:
        source = args.runs
    runs = load_runs(source, mapping=args.map, query=args.query, baseline=args.baseline or BASELINE,
                     drop_duplicates=getattr(args, "drop_duplicates", False))
    if runs.attrs.get("dropped_duplicates"):
        print(f"dropped {runs.attrs['dropped_duplicates']} duplicate row(s) (--drop-duplicates)", file=sys.stderr)
    return runs


def fit_from_args(args, runs, law: str = "decoupled", **law_options):
    """The LawFit the options ask for: loaded from --fit FILE (no refitting; its intervals at --level, from its
    saved replicates), or fitted and bootstrapped now."""
    from capscale.analysis.lawfit import LawFit, fit
    if getattr(args, "fit", None):
        result = LawFit.load(args.fit, runs, level=args.level)
        for option, asked, saved in (("--delta", args.delta, result.law.delta),
                                     ("--baseline", args.baseline, result.law.baseline)):
            if asked is not None and asked != saved:
                raise InputError(f"--fit {args.fit} was fitted with {option} {saved}; it cannot answer for "
                                 f"{option} {asked}: refit without --fit")
        return result
    if getattr(args, "study", None) and law == "decoupled":  # the settings a shipped study states (its fix_E)
        from capscale.analysis.studies import STUDIES
        law_options = {**STUDIES[args.study].fit_options, **law_options}
    return fit(runs, law=law, bootstrap=args.bootstrap, level=args.level, baseline=args.baseline or BASELINE,
               resample=args.resample, seed=args.seed, delta=args.delta or 1e-3, n_jobs=args.jobs, **law_options)


def add_fit_file_argument(p) -> None:
    p.add_argument("--fit", metavar="FILE", help="reuse a fit saved by `capscale fit RUNS -o FILE` (same table): no "
                                                 "refitting, the saved bootstrap replicates give the intervals")


def _fit_command(args) -> None:
    runs = runs_from_args(args)
    if args.fix_E is not None and args.law not in ("decoupled", *TOKEN_LAWS):
        raise InputError(f"--fix-E applies to the decoupled, drift and qat-error laws, not {args.law}")
    result = fit_from_args(args, runs, args.law, **({"fix_E": args.fix_E} if args.fix_E is not None else {}))
    _warn(result.warnings)
    if args.output:
        result.save(args.output, overwrite=args.overwrite)
        print(f"fit saved to {args.output}", file=sys.stderr)
    if args.json:
        emit_json("fit", result.as_json(), result.level)
        return
    print(result.summary())
    if runs.attrs.get("skipped"):
        print(f"  not fitted (status not ok): {len(runs.attrs['skipped'])} run(s)")
    if args.extrapolate:
        for hold_out in ("params", "tokens"):
            _, summary = result.extrapolation(hold_out)
            print(f"extrapolation, fitted without the {summary['held_out']}: {summary['text']}" if summary else
                  f"extrapolation by {hold_out}: not possible (too few sizes or token budgets)")
        print(result.drift_test().sentence())


def add_fit_command(sub) -> None:
    p = sub.add_parser("fit", help="fit a scaling law with per-format efficiencies",
                       description="Fit loss = A (N eff)^-alpha + B D^-beta + E over formats (Huber on log loss, "
                                   "global optimum by variable projection), with bootstrap intervals.")
    add_run_arguments(p, bootstrap_default=200)  # every fitted constant is printed with its interval
    p.add_argument("--law", default="decoupled", choices=LAW_NAMES,
                   help="decoupled: one eff per format; unified: eff = rho(GMSE); kumar: bits law; frantar: sparsity "
                        "law; drift: eff drifts with tokens per parameter (per format, saturating where the runs ask); "
                        "qat-error: Chen et al.'s additive k D^gD / N^gN per format")
    p.add_argument("--extrapolate", action="store_true",
                   help="also fit without the largest N, and without the largest token budgets per parameter, predict "
                        "them, and run the paired drift test")
    p.add_argument("-o", "--output", default=None, metavar="FILE",
                   help="save the fit and its bootstrap replicates (JSON) for validate/predict/compose/report --fit "
                        "(a new file, or one capscale saved a fit in)")
    p.add_argument("--overwrite", action="store_true", help="let -o replace a file capscale did not write")
    p.add_argument("--fix-E", type=nonnegative, default=None, metavar="E",
                   help="hold the irreducible loss E fixed where the runs cannot identify it (0: a pure power law)")
    p.set_defaults(func=_fit_command)


def _validate_command(args) -> None:
    result = fit_from_args(args, runs_from_args(args))
    if args.constants:
        from capscale.analysis.validate import constants_verdict
        table = result.check_constants(args.constants)
        if args.json:
            emit_json("validate", table.to_dict("records"), result.level, constants=args.constants,
                      verdict=constants_verdict(table, result.level))
        else:
            print(f"fitted efficiency against rho(GMSE) at the {args.constants} constants (no refit):\n"
                  + table.to_string(index=False, float_format="{:.4g}".format)
                  + "\n" + constants_verdict(table, result.level))
        return
    v = result.validate(form=args.form)
    _warn(v.warnings)
    cal = result.calibration(v)
    if args.json:
        emit_json("validate", {**v.as_json(), "calibration": None if cal is None else cal.as_json()}, v.level)
    else:
        print(v.summary(), *([] if cal is None else ["", cal.summary()]), sep="\n")


def add_validate_command(sub) -> None:
    p = sub.add_parser("validate", help="check capacity predictions against fitted efficiencies",
                       description="Fit rho(GMSE) to the decoupled efficiencies (weights x activations as a "
                                   "product), then leave-one-format-out: each format predicted without it.")
    add_run_arguments(p, bootstrap_default=200)
    p.add_argument("--form", default="tanh", choices=RHO_FORMS, help="rho form (default: %(default)s)")
    p.add_argument("--constants", choices=("published",), default=None,
                   help="instead of refitting rho (which needs at least 4 compressed formats), check each format's "
                        "fitted efficiency against rho(GMSE) at the published constants: any number of formats")
    add_fit_file_argument(p)
    p.set_defaults(func=_validate_command)


def _value_ci(out: dict) -> dict:
    """predict_format's {eff, eff_interval, loss, loss_interval, ...} with each interval beside its value as ci."""
    rows = {}
    for key, value in out.items():
        if key.endswith("_interval"):
            continue
        interval = out.get(f"{key}_interval")
        rows[key] = {"value": value, "ci": list(interval) if interval is not None else None} \
            if f"{key}_interval" in out else value
    return rows


def _predict_command(args) -> None:
    from capscale.analysis.verdicts import format_interval
    out = fit_from_args(args, runs_from_args(args)).predict_format(args.spec, args.a_format, args.params,
                                                                    args.tokens, form=args.form)
    if args.json:
        emit_json("predict", [{"spec": args.spec, "a_format": args.a_format, "params": args.params,
                               "tokens": args.tokens, **_value_ci(out)}], args.level)
    else:
        interval = lambda iv: "" if iv is None else " " + format_interval(*iv, ".4g")  # noqa: E731
        print(f"{args.spec}" + (f" / {args.a_format}" if args.a_format else "") +
              f": predicted efficiency {out['eff']:.4g}{interval(out['eff_interval'])}, "
              f"loss at N={args.params:.4g}, D={args.tokens:.4g}: {out['loss']:.4g}{interval(out['loss_interval'])}")


def add_predict_command(sub) -> None:
    p = sub.add_parser("predict", help="predict efficiency and loss of an untrained format",
                       description="Predicted efficiency (rho fitted on the trained formats) and loss of SPEC.")
    p.add_argument("spec", metavar="SPEC", help="weights format spec")
    p.add_argument("--a-format", default=None, help="activations format spec")
    p.add_argument("--params", type=positive, required=True)
    p.add_argument("--tokens", type=positive, required=True)
    p.add_argument("--form", default="tanh", choices=RHO_FORMS)
    add_run_arguments(p, bootstrap_default=200, runs_option=True)
    add_fit_file_argument(p)
    p.set_defaults(func=_predict_command)


def _compose_command(args) -> None:
    if args.capacity_grid:
        if args.runs is not None:
            raise InputError("give a run table (RUNS) or --capacity-grid CSV, not both")
        from capscale.analysis.compose import compose_grid, grid_summary, read_grid
        result = compose_grid(read_grid(args.capacity_grid), args.edge_row, args.edge_col)
        if args.json:
            emit_json("compose", {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in result.items()})
        else:
            print(grid_summary(result))
        return
    fit = fit_from_args(args, runs_from_args(args))
    table, wald = fit.compose()
    nothing = "no combined format whose two parts were also trained (W/A with W and bf16/A, or S+Q with S and Q)"
    if args.json:
        emit_json("compose", [] if table.empty else (table if wald is None else wald.table).to_dict("records"),
                  fit.level, reason=nothing if table.empty else None)
    elif table.empty:
        print(nothing)
    else:
        print_table(table if wald is None else wald.table)


def add_compose_command(sub) -> None:
    p = sub.add_parser("compose", help="test whether capacities multiply (runs or a capacity grid)",
                       description="eff(combined) / (eff(part1) eff(part2)) with bootstrap intervals, or with "
                                   "--capacity-grid a capacity table predicted from its uncompressed edges.")
    add_run_arguments(p, bootstrap_default=200)
    p.add_argument("--capacity-grid", metavar="CSV", help="a capacity grid CSV (row labels, column labels) instead of "
                                                          "a run table")
    renamed(p, "--grid", "--capacity-grid CSV")
    p.add_argument("--edge-row", default=None, help="grid row where the other part is uncompressed")
    p.add_argument("--edge-col", default=None, help="grid column where the other part is uncompressed")
    add_fit_file_argument(p)
    p.set_defaults(func=_compose_command)


def _report_command(args) -> None:
    from capscale.analysis.runs import load_runs
    from capscale.capacity.paths import report_folder
    report_folder(args.output, args.overwrite)  # before any work that would be lost
    runs = runs_from_args(args)
    grids = dict(g.split("=", 1) if "=" in g else (Path(g).stem, g) for g in args.capacity_grid or [])
    replicates = (load_runs(args.replicates, mapping=args.map, baseline=args.baseline or BASELINE)
                  if args.replicates else None)
    report = fit_from_args(args, runs).report(args.output, grids=grids, n_jobs=args.jobs, replicates=replicates,
                                              overwrite=args.overwrite, title=args.title, form=args.form)
    if args.json:
        emit_json("report", json.loads((report.folder / "results.json").read_text()), report.results["decoupled"]["level"],
                  written=str(report.folder))
    else:
        print(f"report written to {report.folder / 'report.html'} (and report.md, results.json, figures)")


def add_report_command(sub) -> None:
    p = sub.add_parser("report", help="write an HTML/Markdown/JSON report with figures",
                       description="Fit, bootstrap, validate capacity predictions, test composability and plot "
                                   "everything into a folder.")
    add_run_arguments(p, bootstrap_default=200)
    p.add_argument("-o", "--output", default="capscale-report",
                   help="output folder: new, empty, or holding a previous capscale report")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that holds other files too")
    p.add_argument("--capacity-grid", action="append", metavar="[NAME=]CSV", help="also analyse a capacity grid CSV")
    renamed(p, "--grid", "--capacity-grid [NAME=]CSV")
    p.add_argument("--title", default="capscale report", help="the report's title (default: %(default)s)")
    p.add_argument("--form", default="tanh", choices=RHO_FORMS,
                   help="rho form of the capacity regression (default: %(default)s)")
    p.add_argument("--replicates", metavar="RUNS", help="run table repeating some runs with other seeds (not "
                                                        "fitted): the fit-health check compares the misfit with it")
    add_fit_file_argument(p)
    p.set_defaults(func=_report_command)


def add_demo_command(sub) -> None:
    p = sub.add_parser("demo", help="the main job: capacity, fits, validation, composability and a report",
                       description="Run the whole analysis on a study shipped inside the package and write a "
                                   "report folder. Studies: quest (the default: QuEST's 104 published runs, 30M-800M "
                                   "parameters, where the papers checked the claim; the summary compares the fit with "
                                   "the published efficiencies), t5 (the 48 published sparse T5 runs), cpu (capscale's "
                                   "own CPU study). --train regenerates a small CPU study first.")
    p.add_argument("-o", "--output", default="capscale-demo", help="report folder: new, empty, or holding a "
                                                                   "previous capscale report (default: ./capscale-demo)")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that holds other files too")
    p.add_argument("--study", choices=STUDY_NAMES, default=DEFAULT_STUDY,
                   help="the shipped study to analyse (default: %(default)s)")
    p.add_argument("--train", action="store_true", help="train a small CPU study from scratch first (~10 min on 2 "
                                                        "cores; with --study cpu)")
    p.add_argument("--bootstrap", type=whole(0, MAX_REPLICATES), default=200,
                   help="bootstrap replicates (default: %(default)s)")
    p.add_argument("--seed", type=whole(0), default=0, help="bootstrap seed (default: %(default)s)")
    p.add_argument("--jobs", type=whole(1, MAX_JOBS), default=None, help="bootstrap worker processes")
    p.set_defaults(func=_demo_command)


def _demo_command(args) -> None:
    from .demo import run_demo
    run_demo(args.output, args.train, args.bootstrap, args.seed, args.jobs, args.overwrite, study=args.study)


ADDERS = (add_fit_command, add_validate_command, add_predict_command, add_compose_command, add_report_command,
          add_demo_command)
