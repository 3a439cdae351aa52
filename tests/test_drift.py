"""The efficiency is not a constant: the paired drift test, the token-dependent laws, hold-outs by token budget, and
Quartet's published runs (targets from the Quartet paper, with tolerances)."""
import warnings

import numpy as np
import pandas as pd
import pytest

import capscale
from capscale.analysis.constancy import best_supported_law, constancy_test
from capscale.analysis.drift import DriftLaw, QATErrorLaw
from capscale.analysis.extrapolation import extrapolation_check, extrapolation_errors
from capscale.analysis.health import fit_health
from capscale.analysis.laws import DecoupledLaw, make_law
from capscale.analysis.names import LAW_NAMES
from capscale.analysis.runs import load_runs
from capscale.analysis.simulate import simulate_runs
from capscale.analysis.studies import study_runs
from capscale.capacity import InputError

DESIGN = dict(sizes=(2e7, 5e7, 1e8, 2e8), tokens_per_param=(25, 50, 100, 200, 400, 800), noise=0.005)


@pytest.fixture(scope="module")
def quartet():
    return load_runs(study_runs("quartet"), name="quartet")


@pytest.fixture(scope="module")
def quartet_forward(quartet):
    return quartet[quartet["backward"] == "none"]


def test_quartet_reproduces_the_published_effn_and_effd(quartet):
    law = DecoupledLaw().fit(quartet)
    published_n = {"mxfp4 QuEST": 0.645, "mxfp4 RTN": 0.606, "mxfp4 EDEN128": 0.639, "mxfp4 SR": 0.433}
    for label, value in published_n.items():
        assert law.eff_[label] == pytest.approx(value, abs=0.025), label
    published_d = {"mxfp4 RTN": 0.819, "mxfp4 SR": 0.842, "mxfp4 EDEN128": 0.890}
    for label, value in published_d.items():
        assert law.eff_d_[label] == pytest.approx(value, abs=0.06), label
    # QuEST's backward scheme: 4 runs at one size; the paper's 0.181 and this fit agree that it is by far the worst
    assert law.eff_d_["mxfp4 QuEST"] < 0.35 and law.eff_d_["mxfp4 QuEST"] == min(law.eff_d_.values())


def test_the_drift_test_rejects_constant_efficiency_on_quartets_forward_runs(quartet_forward):
    test = constancy_test(DecoupledLaw().fit(quartet_forward), quartet_forward)
    formats = sorted(set(quartet_forward["format"]) - {"bf16"})
    assert sorted(test.drifting) == formats  # every forward scheme's gap grows with D/N
    table = test.table.set_index("format")
    assert (table["slope"] > 0).all() and (table["eff_change"] < 0).all()
    assert table.loc["mxfp4 QuEST", "cells"] == 21 and table.loc["mxfp4 QuEST", "p_holm"] < 1e-6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = capscale.fit(quartet_forward, bootstrap=0, progress=False)
    assert any("efficiency constant across token budgets" in str(w.message) for w in caught)
    health = fit.health().set_index("check")
    assert health.loc["efficiency constant across token budgets", "verdict"] == "weak"


def test_a_token_law_fitted_up_to_200_tokens_per_param_predicts_the_quantized_runs_beyond_350(quartet_forward):
    errors = {}
    for name in ("decoupled", "drift"):
        check = extrapolation_check(make_law(name), quartet_forward, "tokens")
        ratio = check["tokens"] / check["params"]
        assert ratio.min() > 350 and check.attrs["n_fitted"] == (quartet_forward["tokens"] / quartet_forward["params"]
                                                                  <= 210).sum()
        errors[name] = extrapolation_errors(check)
    drift, constant = errors["drift"], errors["decoupled"]
    # the drift law: the quantized runs within 1.5x the baseline runs' own error there, and no bias of their own
    # beyond the baseline's (the shared D term errs the same way for every format)
    assert drift["compressed_mean_abs_log_error"] <= 1.5 * drift["baseline_mean_abs_log_error"]
    assert abs(drift["compressed_mean_log_error"]) <= 1.5 * drift["baseline_mean_abs_log_error"]
    # the constant law, beside it: twice the baseline's error, every gap under-predicted (optimistic)
    assert constant["compressed_mean_abs_log_error"] > 1.5 * constant["baseline_mean_abs_log_error"]
    assert constant["gap_above"] == 0 and constant["gap_n"] == 14


def test_the_drift_test_holds_its_size_on_constant_efficiency_tables():
    """40 simulated tables x 2 formats (the slow tier's 200 tables measured 4.75% per format, 4.5% family-wise)."""
    rejected = []
    for seed in range(40):
        runs = simulate_runs({"bf16": 1.0, "int4": 0.8, "int2": 0.4}, seed=seed, **DESIGN)
        rejected += list(constancy_test(DecoupledLaw().fit(runs), runs).table["p"] < 0.05)
    assert np.mean(rejected) <= 0.125  # nominal 5%; binomial sd over 80 tests is 2.4%


@pytest.mark.slow
def test_the_drift_test_size_over_200_simulated_tables():
    rejected, family = [], []
    for seed in range(200):
        runs = simulate_runs({"bf16": 1.0, "int4": 0.8, "int2": 0.4}, seed=seed, **DESIGN)
        test = constancy_test(DecoupledLaw().fit(runs), runs)
        rejected += list(test.table["p"] < 0.05)
        family.append(bool(test.drifting))
    assert 0.02 <= np.mean(rejected) <= 0.08 and np.mean(family) <= 0.08


def test_drifting_tables_are_found_and_the_drift_law_recovers_the_drift():
    truth = {"int4": -0.05, "int2": 0.0}
    runs = load_runs(simulate_runs({"bf16": 1.0, "int4": 0.8, "int2": 0.4}, seed=3, drift=truth, **DESIGN))
    test = constancy_test(DecoupledLaw().fit(runs), runs)
    assert test.drifting == ["int4"]
    fit = capscale.fit(runs, law="drift", bootstrap=60, progress=False, n_jobs=1)
    intervals = fit.conf_int()
    for label, value in truth.items():
        lo, hi = intervals.loc[f"drift[{label}]", ["lo", "hi"]]
        assert lo <= value <= hi, (label, lo, hi)
    lo, hi = intervals.loc["eff[int4]", ["lo", "hi"]]
    assert lo <= 0.8 <= hi  # the efficiency at the reference 100 tokens per parameter
    assert fit.drift_test().drifting == []  # nothing left for the drift law's residuals


def test_the_drift_law_finds_a_saturation_the_runs_show():
    runs = simulate_runs({"bf16": 1.0, "int4": 0.8}, seed=1, drift={"int4": -0.08}, saturation=400,
                         sizes=(2e7, 5e7, 1e8, 2e8), tokens_per_param=(25, 50, 100, 200, 400, 800, 1600, 3200),
                         noise=0.002)
    law = DriftLaw().fit(runs)
    assert law.saturation_ in (256.0, 512.0)
    assert law.drift_["int4"] == pytest.approx(-0.08, abs=0.02)
    assert np.isinf(DriftLaw().fit(simulate_runs({"bf16": 1.0, "int4": 0.8}, seed=1, **DESIGN)).saturation_)


def test_the_qat_error_law_recovers_its_own_form():
    rng = np.random.default_rng(0)
    rows = []
    for label, k in (("bf16", 0.0), ("int4", 0.5), ("int2", 2.0)):
        for n in DESIGN["sizes"]:
            for r in DESIGN["tokens_per_param"]:
                d = n * r
                loss = 400 * n ** -0.34 + 1800 * d ** -0.37 + 1.7 + k * d ** 0.2 / n ** 0.3
                rows.append({"format": label, "params": n, "tokens": d, "loss": loss * np.exp(rng.normal(0, 0.002))})
    law = QATErrorLaw().fit(pd.DataFrame(rows))
    assert law.params_["gD"] == pytest.approx(0.2, abs=0.06) and law.params_["gN"] == pytest.approx(0.3, abs=0.08)
    assert law.k_["int2"] / law.k_["int4"] == pytest.approx(4.0, rel=0.15)


def test_every_law_is_listed_and_the_formula_laws_refuse_a_label_only_table_by_name(quartet_forward):
    assert {"drift", "qat-error"} <= set(LAW_NAMES)
    labels_only = quartet_forward[["format", "params", "tokens", "loss"]]
    for law in ("unified", "kumar", "frantar"):
        with pytest.raises(InputError, match=law):
            capscale.fit(labels_only, law=law, bootstrap=0, progress=False)
    for law in ("drift", "qat-error"):
        assert capscale.fit(labels_only, law=law, bootstrap=0, progress=False).law.n_runs_ == len(labels_only)


def test_compare_laws_fits_every_law_on_the_same_rows_and_holds_out_token_budgets(quartet_forward):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = capscale.fit(quartet_forward, bootstrap=0, progress=False)
    table = fit.compare_laws().set_index("law")
    assert list(table.index) == list(LAW_NAMES)
    for law in ("unified", "kumar", "frantar"):  # no capacity or sparsity in this table: said, not dropped
        assert table.loc[law, "note"].startswith("not fitted")
    fitted = table[table["runs"].notna()]
    assert (fitted["runs"] == len(quartet_forward)).all() and fitted["same_rows"].all()
    assert table.loc["drift", "heldout_compressed_mae"] < table.loc["decoupled", "heldout_compressed_mae"]
    assert best_supported_law(quartet_forward, "bf16")[0] in ("drift", "qat-error")
    runs = simulate_runs({"bf16": 1.0, "int4": 0.8}, seed=2, **DESIGN)
    assert best_supported_law(runs, "bf16")[0] == "decoupled"


def test_token_laws_save_load_predict_with_intervals_and_plan(tmp_path):
    runs = load_runs(simulate_runs({"bf16": 1.0, "int4": 0.8}, seed=4, drift={"int4": -0.04}, **DESIGN))
    for law in ("drift", "qat-error"):
        fit = capscale.fit(runs, law=law, bootstrap=12, progress=False, n_jobs=1)
        loaded = capscale.LawFit.load(fit.save(tmp_path / f"{law}.json"), runs)
        assert loaded.law.values() == pytest.approx(fit.law.values())
        new = pd.DataFrame({"format": ["int4", "bf16"], "params": [4e8, 4e8], "tokens": [4e11, 4e11]})
        pred = loaded.predict(new, interval=True)
        assert not pred.isna().any().any() and (pred["lo"] < pred["loss"]).all() and (pred["loss"] < pred["hi"]).all()
        plan = fit.plan(flops=1e21)
        assert set(plan.table["law"]) == {law} and plan.table["loss_lo"].notna().all()
    forged = tmp_path / "drift.json"
    text = forged.read_text().replace('"name": "drift"', '"name": "frantar"')
    forged.write_text(text)
    with pytest.raises(InputError):
        capscale.LawFit.load(forged, runs)


def test_health_reads_residuals_by_budget_and_format_and_measures_scatter_only_from_genuine_repeats():
    from capscale.analysis.health import repeat_cells, seed_scatter
    runs = load_runs(simulate_runs({"bf16": 1.0, "int4": 0.8}, seed=5, **DESIGN))
    twice = pd.concat([runs.assign(seed=0), runs.assign(seed=1)])  # one run recorded twice is not a repeat
    assert repeat_cells(twice) == 0 and np.isnan(seed_scatter(twice))
    law = DecoupledLaw().fit(runs)
    health = fit_health(law, runs).set_index("check")
    for check in ("largest mean residual of one token budget", "largest mean residual of one format",
                  "efficiency constant across token budgets"):
        assert check in health.index
    assert health.loc["residual RMSE, log loss", "detail"].startswith("seed scatter not measured")
    crossed = simulate_runs({"bf16": 1.0, "int4": 0.8}, eff_d={"none": 1.0, "int8": 1.2}, seed=6,
                            sizes=(2e7, 5e7, 1e8), tokens_per_param=(25, 100, 400), noise=0.003)
    crossed_law = DecoupledLaw().fit(crossed)
    row = fit_health(crossed_law, crossed).set_index("check").loc["data efficiencies at most 1"]
    assert row["verdict"] == "weak" and "effD[int8]" in row["detail"]


def test_e_is_identified_only_by_a_narrow_interval():
    from capscale.analysis.bootstrap import bootstrap
    runs = load_runs(simulate_runs({"bf16": 1.0, "int4": 0.8}, seed=7, **DESIGN))
    law = DecoupledLaw().fit(runs)
    boot = bootstrap(law, runs, 20, n_jobs=1, progress=False)
    row = fit_health(law, runs, boot).set_index("check").loc["irreducible loss E"]
    lo, hi = boot.intervals(law.values()).loc["E", ["lo", "hi"]]
    assert (row["verdict"] == "ok") == (hi <= 2 * lo)
    assert "hi/lo <= 2" in row["detail"]


def test_a_crossed_label_only_table_reads_bf16_gradients_as_exact_ones():
    """`forward`/`backward` columns, no `format` column, bf16 for exact gradients: effD[exact] = 1 (today's refusal
    of such a table, and bf16 as a backward configuration of its own, were the bugs)."""
    table = simulate_runs({"bf16": 1.0, "int4": 0.8}, eff_d={"none": 1.0, "int8": 0.8}, noise=0.002, seed=1,
                          tokens_per_param=(20, 50, 100))
    table = table.drop(columns=["format", "w_format", "a_format"])
    table["backward"] = table["backward"].replace("none", "bf16")
    runs = load_runs(table, name="crossed")
    law = DecoupledLaw().fit(runs)
    assert set(law.eff_d_) == {"none", "int8"} and law.eff_d_["none"] == 1.0
    assert law.eff_d_["int8"] == pytest.approx(0.8, abs=0.06)


def test_what_to_use_lists_the_formats_it_could_not_rank(tmp_path):
    from capscale.analysis.report import decisions
    from capscale.analysis.runs import format_table
    runs = load_runs(simulate_runs({"bf16": 1.0, "mine A": 0.8, "mine B": 0.6}, noise=0.003, seed=2), name="labels")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = capscale.fit(runs, bootstrap=0, progress=False)
    decision = decisions(fit, format_table(runs), progress=False)
    assert "omitted" in decision and set(decision["unranked"]) == {"mine A", "mine B"}
    assert "bits per value are unknown" in decision["unranked"]["mine A"]
