"""Decisions: `plan` (the best format and size for a budget) and `frontier` (capacity per bit of format designs)."""
import json
import os
import warnings

import numpy as np
import pytest
from scipy import optimize

import capscale
from capscale.analysis.frontier import expand, frontier, pareto
from capscale.analysis.plan import Budget, optimum, parse_amount, parse_speedups, plan, plan_curves
from capscale.analysis.runs import load_runs
from capscale.analysis.simulate import TRUTH, simulate_runs
from capscale.capacity import InputError

TRUE_EFF = {"bf16": 1.0, "int4": 0.8, "int4/int4": 0.55, "int2": 0.3}
SPECS = {"int4/int4": ("int4", "int4"), "int4": ("int4", None), "int2": ("int2", None)}
BITS = {"bf16": 16, "int4": 4, "int4/int4": 4, "int2": 2}


@pytest.fixture(scope="module")
def simulated_fit():
    runs = load_runs(simulate_runs(TRUE_EFF, specs=SPECS, noise=0.003, seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return capscale.fit(runs, bootstrap=40, progress=False, n_jobs=1)


def _true_optimum(label, budget, speedup=1.0):
    """The truth's optimum by brute force over log N (no closed form): what plan must find."""
    def loss(log_n):
        n = np.exp(log_n)
        if budget.memory and n > 8 * budget.memory / BITS[label]:
            return 1e9  # outside the memory budget
        d = min(budget.tokens or np.inf, budget.flops * speedup / (6 * n)) if budget.flops else budget.tokens
        return TRUTH["A"] * (n * TRUE_EFF[label]) ** -TRUTH["alpha"] + TRUTH["B"] * d ** -TRUTH["beta"] + TRUTH["E"]
    grid = np.linspace(np.log(1e5), np.log(1e13), 4001)
    values = np.array([loss(g) for g in grid])
    start = grid[values.argmin()]
    best = optimize.minimize_scalar(loss, bounds=(start - 0.01, start + 0.01), method="bounded")
    return np.exp(best.x), best.fun


@pytest.mark.parametrize("budget", [Budget(flops=1e19), Budget(memory=2e8, flops=1e20),
                                    Budget(flops=1e20, tokens=2e10), Budget(memory=1e8, tokens=1e10)])
def test_closed_form_optimum_matches_brute_force(budget):
    for label in TRUE_EFF:
        n, _, loss = optimum(TRUTH, TRUE_EFF[label], BITS[label], 1.0, budget)
        n_ref, loss_ref = _true_optimum(label, budget)
        assert float(loss) == pytest.approx(loss_ref, rel=1e-6)
        assert float(n) == pytest.approx(n_ref, rel=2e-2)


@pytest.mark.parametrize("budget, speedup", [(Budget(flops=1e19), {}), (Budget(flops=1e19), {"int4/int4": 3.0}),
                                             (Budget(memory=1e8, tokens=1e10), {})])
def test_plan_picks_the_true_optimum(simulated_fit, budget, speedup):
    result = plan(simulated_fit, budget, speedup=speedup)
    truth = {f: _true_optimum(f, budget, speedup.get(f, 1.0)) for f in TRUE_EFF}
    true_best = min(truth, key=lambda f: truth[f][1])
    assert result.best == true_best
    row = result.table.loc[true_best]
    assert row["loss"] == pytest.approx(truth[true_best][1], rel=3e-3)
    assert row["loss_lo"] < row["loss"] < row["loss_hi"]
    assert row["params"] == pytest.approx(truth[true_best][0], rel=0.25)
    assert result.table["p_best"].sum() == pytest.approx(1.0)
    assert 0.5 < result.wins.loc[true_best].drop(true_best).min() <= 1.0
    assert true_best in result.verdict()


def test_speedup_changes_the_decision(simulated_fit):
    """At equal compute a 3x faster W4A4 wins; at 1x it does not: the speed-up table is used."""
    assert plan(simulated_fit, Budget(flops=1e19)).best != "int4/int4"
    assert plan(simulated_fit, Budget(flops=1e19), speedup={"int4/int4": 3.0}).best == "int4/int4"


def test_untrained_formats_use_published_rho_and_extrapolation_is_flagged(simulated_fit):
    result = plan(simulated_fit, Budget(memory=1e10, tokens=1e12), formats=["int4", "nf4", "int3/int3"])
    t = result.table
    assert t.loc["nf4", "efficiency_from"].startswith("rho(GMSE)")
    assert t.loc["nf4", "eff"] == pytest.approx(capscale.capacity.rho(capscale.capacity.spec_gmse("nf4")))
    assert t.loc["nf4", "bits"] == pytest.approx(4.5)
    assert all("outside the fitted" in note for note in t["extrapolated"])
    assert json.loads(json.dumps(result.as_json()))["formats"][0]["format"] == result.best


def test_plan_curves_mark_the_envelope(simulated_fit):
    curves = plan_curves(simulated_fit, [1e8, 1e9, 1e10], "memory", Budget(memory=1e9, tokens=1e10))
    assert curves.groupby("budget")["envelope"].sum().tolist() == [1, 1, 1]
    per_budget = curves.groupby("budget")
    assert (per_budget.apply(lambda g: g.loc[g["envelope"], "loss"].iloc[0] == g["loss"].min())).all()


def test_bad_budgets_say_what_is_needed():
    with pytest.raises(InputError, match="memory budget alone"):
        Budget(memory=1e9)
    with pytest.raises(InputError, match="4GB"):
        parse_amount("four", "--weight-memory")
    assert parse_amount("4GB", "--weight-memory") == 4e9 and parse_amount("1 GiB", "--weight-memory") == 2 ** 30
    assert parse_speedups(["4:8(vector=2)+int4(scale_from=row)/int4=2"]) == {"4:8(vector=2)+int4(scale_from=row)/int4": 2}
    with pytest.raises(InputError, match="FORMAT=FACTOR"):
        parse_speedups(["int4"])


def test_family_expansion():
    assert expand("int{2..4}(group={32,row})") == ["int2(group=32)", "int2(group=row)", "int3(group=32)",
                                                   "int3(group=row)", "int4(group=32)", "int4(group=row)"]
    assert expand("nvfp4") == ["nvfp4"]
    for bad in ("int{2..4", "int{{2..4}}", "int{8..2}", "int{2,,3}", "int{1..100000}"):
        with pytest.raises(InputError):
            expand(bad)


def test_pareto():
    bits, cap = np.array([2, 3, 3, 4, 4.5]), np.array([0.5, 0.4, 0.7, 0.7, 0.8])
    assert pareto(bits, cap).tolist() == [True, False, True, False, True]


def test_frontier_is_monotone_and_never_beats_shannon(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSCALE_CACHE", str(tmp_path))
    result = frontier(["int", "lloydmax", "nf4", "fp", "mx", "nvfp4"], samples=1 << 17, progress=False)
    t = result.table
    assert len(t) > 70 and not result.skipped
    assert (t["gmse"] + 4 * t["stderr"] >= t["shannon_gmse"]).all()
    assert (t["capacity"] <= t["shannon_capacity"] + 1e-9).all() and (t["bits_over_shannon"] > 0).all()
    front = result.frontier
    assert front["bits"].is_monotonic_increasing and front["capacity"].is_monotonic_increasing
    assert front["bits"].min() <= 2 and front["bits"].max() >= 8
    best_int = [t[(t["family"] == "int") & (t["spec"].str.startswith(f"int{b}("))]["capacity"].max() for b in range(2, 9)]
    assert np.all(np.diff(best_int) > 0)  # each extra bit buys capacity
    four = result.at_bits(4)
    assert four.iloc[0]["capacity"] >= four.loc[four["spec"] == "int4(group=row,scale_format=fp16)", "capacity"].iloc[0]
    assert (tmp_path / "frontier-gmse.json").is_file()
    again = frontier(["int"], samples=1 << 17, progress=False)   # from the cache: the same numbers
    merged = again.table.merge(t, on="spec")
    assert np.allclose(merged["gmse_x"], merged["gmse_y"])


@pytest.mark.slow  # a report / two command-line runs: the slow tier
def test_frontier_cli_and_plan_cli(capscale_cli, tmp_path):
    env = {**os.environ, "CAPSCALE_CACHE": str(tmp_path)}
    out = capscale_cli("frontier", "int{2..4}", "mxfp4", "not_a_format{1,2}", "--json", "--figure",
                       str(tmp_path / "f.svg"), env=env)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {d["spec"] for d in data["results"]} == {"int2", "int3", "int4", "mxfp4"} and len(data["skipped"]) == 2
    assert (tmp_path / "f.svg").read_text().lstrip().startswith("<?xml")
    runs = tmp_path / "runs.csv"
    load_runs(simulate_runs(TRUE_EFF, specs=SPECS, noise=0.003))[["format", "w_format", "a_format", "params", "tokens",
                                                                 "loss"]].to_csv(runs, index=False)
    out = capscale_cli("plan", str(runs), "--flops", "1e19", "--bootstrap", "20", "--speedup", "int4/int4=3",
                       "--json", env=env)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["command"] == "plan" and plan["results"][0]["format"] == "int4/int4"
    assert plan["results"][0]["loss"]["ci"][0] <= plan["results"][0]["loss"]["value"] <= plan["results"][0]["loss"]["ci"][1]
    out = capscale_cli("plan", str(runs), "--weight-memory", "1GB", env=env)
    assert out.returncode == 2 and "memory budget alone" in out.stderr
