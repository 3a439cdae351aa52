"""`capscale demo`: the whole claim of the toolkit on the shipped CPU study, in about 15 seconds.

Capacity of the study's formats; decoupled and unified fits with bootstrap; leave-one-format-out
validation of capacity predictions; composability on runs and on the published grids; the report.
`--train` first regenerates a small study from scratch with the trainer's sweep.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd

from capscale import capacity, data
from capscale.capacity.paths import report_folder
from capscale.analysis.lawfit import fit
from capscale.analysis.verdicts import format_interval
from capscale.analysis.runs import format_table, load_runs
from capscale.analysis.names import DEFAULT_STUDY
from capscale.analysis.studies import STUDIES, published_efficiencies, published_table, study_runs
from capscale.trainers.sweep import load_sweep, run_sweep


def _study(study: str, train: bool, out: Path):
    """(runs, their seed repeats or None, the study's name in titles)."""
    if train:
        if study != "cpu":
            raise capacity.InputError(f"--train regenerates the CPU study; the {study} study's runs are published ones")
        out.mkdir(parents=True, exist_ok=True)
        sweep = out / "demo_small.toml"
        shutil.copy(data.path("demo_small.toml"), sweep)
        small = load_sweep(sweep)
        run_sweep(small)
        return load_runs(small.runs), None, small.runs.name
    if study == "cpu":  # every run is there with 2 seeds: the fit-health check reads the scatter from the table itself
        return load_runs(study_runs("cpu"), name="cpu"), None, "cpu_study_runs.jsonl"
    return load_runs(study_runs(study), name=study), None, f"the {study} study ({STUDIES[study].describe})"


def _parses(spec: str) -> bool:
    try:
        capacity.parse(spec)
        return True
    except capacity.InputError:
        return False


def run_demo(out: "str | Path" = "capscale-demo", train: bool = False, n_boot: int = 200, seed: int = 0,
             n_jobs: int | None = None, overwrite: bool = False, study: str = DEFAULT_STUDY) -> Path:
    started = time.time()
    if study not in STUDIES:
        raise capacity.InputError(f"unknown study {study!r}; the shipped studies are {', '.join(STUDIES)}")
    out = report_folder(out, overwrite)
    runs, replicates, runs_path = _study(study, train, out)
    info = format_table(runs)
    named = sorted({s for s in pd.concat([info["w_format"], info["a_format"]]) if s is not None})
    specs = [s for s in named if _parses(s)]
    print("== Capacity of the study's formats (GMSE, rho with the published constants) ==")
    if specs:
        print(capacity.compare(specs, samples=1 << 20)[["spec", "bits_per_value", "gmse", "rho", "rho_per_bit",
                                                        "rd_bound", "method"]].to_string(index=False,
                                                                                         float_format="{:.4g}".format))
    if len(specs) < len(named):
        print(f"labels, not specs capscale can measure (no capacity): {', '.join(sorted(set(named) - set(specs)))}")
    print(f"\n== Fitting {len(runs)} runs of {runs['format'].nunique()} formats from {runs_path} "
          f"({n_boot} bootstrap refits) ==")
    options = {} if train else STUDIES[study].fit_options  # a shipped study's stated settings (the CPU study's E)
    if "provenance" in runs.attrs:
        print(f"source: {runs.attrs['provenance']['source']}")
    if "selection" in runs.attrs:
        print(f"fitted: {runs.attrs['selection']}")
    for option, value in options.items():
        print(f"law setting: {option} = {value} (the study's, stated in capscale.analysis.studies)")
    grids = {p.stem.removeprefix("capacity_"): p for p in sorted(data.path("reference").glob("capacity_*.csv"))}
    report = fit(runs, bootstrap=n_boot, seed=seed, n_jobs=n_jobs, **options).report(
        out, grids=grids, n_jobs=n_jobs, title=f"capscale demo: {runs_path}", replicates=replicates,
        published=published_efficiencies(study) if not train else None)
    res = report.results
    print(f"\n== Summary (the same text heads {out / 'report.md'} and is in results.json) ==")
    for line in report.verdicts:
        print(f"- {line['topic']} {line['text']}")
    print("\n== Details ==")
    dec = res["decoupled"]
    print(f"decoupled law: alpha {dec['params']['alpha']['value']:.3f}, beta {dec['params']['beta']['value']:.3f}, "
          f"E {dec['params']['E']['value']:.3f}; residual RMSE {dec['rmse_log_loss']:.4f} (log loss)")
    print(report.law_comparison.to_string(index=False, float_format="{:.4g}".format))
    print("\nfit health:")
    for h in report.health.itertuples():
        print(f"  {h.check}: {h.value} ({h.verdict}); {h.detail}")
    print(f"\n== Paired comparison with '{capacity.BASELINE}' at equal (N, D): mean log loss ratio (law-free) ==")
    print(report.paired.to_string(index=False, float_format="{:.4f}".format))
    if report.mixed is not None:
        print("mixed model (random intercept per (N, D) cell), Holm-adjusted over the formats:")
        print(report.mixed.table[["format", "cells", "log_loss_diff", "lo", "hi", "p_holm", "wilcoxon_p", "differs", "note"]]
              .to_string(index=False, float_format="{:.4g}".format))
    drift = report.results["drift_test"]
    print(f"\n== Is the efficiency constant across token budgets? (paired drift test, the {drift['law']} law) ==")
    print(pd.DataFrame(drift["results"]).drop(columns=["ci", "reason", "p"]).to_string(
        index=False, float_format="{:.4g}".format))
    if report.validation is None:
        print(f"\n== Capacity predictions: not made ({res['capacity_omitted']}) ==")
        _published_and_rest(report, res, out, started)
        return out
    t = report.validation.table
    print("\n== Capacity predictions vs trained efficiencies (leave-one-format-out) ==")
    print(pd.DataFrame({"format": t["format"], "fitted eff": t["fitted"].round(3),
                        "95% CI": [format_interval(a, b, ".3f") for a, b in zip(t["fitted_lo"], t["fitted_hi"])],
                        "predicted": t["predicted"].round(3),
                        "interval": [format_interval(a, b, ".3f") for a, b in zip(t["pred_lo"], t["pred_hi"])],
                        "prediction inside CI": t["inside"], "intervals overlap": t["overlap"]}).to_string(index=False))
    print(report.validation.verdicts())
    _published_and_rest(report, res, out, started)
    return out


def _published_and_rest(report, res, out: Path, started: float) -> None:
    """The published comparison, composability, grids and extrapolation: what the demo prints after capacity."""
    if report.results.get("published_comparison"):
        table = published_table(pd.DataFrame(report.results["published_comparison"]), res["decoupled"]["level"])
        print("\n== Against the published efficiencies ==")
        print(table.drop(columns="note").to_string(index=False, float_format="{:.3f}".format))
    if report.calibration is not None:
        print(report.calibration.verdict())
    if report.wald is not None:
        print("\n== Composability: eff(combined) / (eff(part 1) x eff(part 2)), Wald test of ratio = 1 ==")
        for r in report.wald.table.itertuples():
            print(f"  {r.combined:<12} = {r.part1} x {r.part2}: ratio {r.ratio:.3f} "
                  f"{format_interval(r.ratio_lo, r.ratio_hi, '.3f')}, p = {r.p:.3g} -> {r.verdict}")
    for name, g in res["grids"].items():
        print(f"  grid {name}: product-of-edges max |error| {g['max_abs_error']:.3f} (worst {g['worst_cell'][:2]})")
    if res.get("extrapolation"):
        e = res["extrapolation"]
        print(f"\nextrapolation to the largest models (held out): {e['text']}")
    if res.get("extrapolation_tokens"):
        e = res["extrapolation_tokens"]
        print(f"extrapolation to the largest token budgets (held out, {e['law']} law): {e['text']}")
    print(f"\nreport: {(out / 'report.html').resolve()}  ({time.time() - started:.0f} s)")
