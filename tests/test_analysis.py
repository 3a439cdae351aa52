"""Analysis: fitting on the real Chinchilla data, recovery on simulated runs, validation, composability,
run-table errors and the command-line contract."""
import json

import numpy as np
import pandas as pd
import pytest
from markupsafe import escape

from capscale.analysis.bootstrap import bootstrap, prediction_interval
from capscale.analysis.extrapolation import extrapolation_check
from capscale.analysis.compose import compose_grid, compose_runs, read_grid
from capscale.analysis.health import disjoint, fit_health, resolved_chain, seed_scatter
from capscale.analysis.formula_laws import FrantarLaw, KumarLaw, UnifiedLaw
from capscale.analysis.laws import DecoupledLaw
from capscale.analysis.report import markdown_text
from capscale.analysis.runs import RunTableError, load_runs
from capscale.analysis.simulate import simulate_runs
from capscale.analysis.validate import validate
from capscale import data
from capscale.capacity import InputError, gmse, rho

REFERENCE = data.path("reference")
CHINCHILLA = data.path("reference", "chinchilla_epoch_240.csv")
REPLICATION = {"A": 477.84, "B": 2143.86, "E": 1.8172, "alpha": 0.34731, "beta": 0.36718}
SPECS = {"bf16": ("bf16", None), "int8": ("int8", None), "int4": ("int4", None), "int3": ("int3", None),
         "int2": ("int2", None), "int4/int4": ("int4", "int4"), "bf16/int4": ("bf16", "int4")}


def capacity_effs():
    """True efficiencies that follow rho(GMSE) with the published constants."""
    g = {s: gmse(s, exact=True).gmse for s in ("int8", "int4", "int3", "int2")}
    eff = {"bf16": 1.0, **{s: rho(v) for s, v in g.items()}}
    eff["int4/int4"], eff["bf16/int4"] = rho(g["int4"]) ** 2, rho(g["int4"])
    return eff


@pytest.fixture(scope="module")
def chinchilla():
    return load_runs(CHINCHILLA)


def test_chinchilla_fit_reaches_replication_optimum(chinchilla):
    fit = DecoupledLaw().fit(chinchilla)
    assert fit.objective_ <= 1.018275e-3
    for name, value in REPLICATION.items():
        assert fit.params_[name] == pytest.approx(value, rel=0.01), name


def test_fixing_E_at_the_optimum_reproduces_the_free_fit(chinchilla):
    fixed = DecoupledLaw(fix_E=1.8172).fit(chinchilla)
    assert fixed.params_["E"] == 1.8172 and fixed.objective_ == pytest.approx(1.018275e-3, rel=1e-5)
    assert DecoupledLaw(fix_E=1.5).fit(chinchilla).objective_ > 1.1e-3


def test_chinchilla_bootstrap_standard_errors_have_the_replications_size(chinchilla):
    fit = DecoupledLaw().fit(chinchilla)
    boot = bootstrap(fit, chinchilla, n_boot=24, seed=1, progress=False)
    se = boot.intervals()["se"]
    assert boot.n_failed == 0
    assert 0.007 < se["alpha"] < 0.03 and 0.01 < se["beta"] < 0.04 and 0.012 < se["E"] < 0.05


def test_bootstrap_is_reproducible_whatever_the_worker_count(chinchilla):
    fit = DecoupledLaw().fit(chinchilla)
    one = bootstrap(fit, chinchilla, n_boot=4, seed=7, n_jobs=1, progress=False).samples
    two = bootstrap(fit, chinchilla, n_boot=4, seed=7, n_jobs=2, progress=False).samples
    pd.testing.assert_frame_equal(one.sort_values("alpha").reset_index(drop=True),
                                  two.sort_values("alpha").reset_index(drop=True))


def test_decoupled_fit_recovers_known_efficiencies():
    truth = {"bf16": 1.0, "int8": 0.98, "int4": 0.8, "int2": 0.4, "2:4": 0.55}
    runs = load_runs(simulate_runs(truth, noise=0.004, seed=3))
    fit = DecoupledLaw().fit(runs)
    for label, value in truth.items():
        assert fit.eff_[label] == pytest.approx(value, abs=0.03), label
    assert fit.params_["alpha"] == pytest.approx(0.34, abs=0.03)


def test_unified_law_recovers_rho_constants_and_fits_nearly_as_well():
    runs = load_runs(simulate_runs(capacity_effs(), noise=0.002, seed=0,
                                   specs=SPECS))
    decoupled, unified = DecoupledLaw().fit(runs), UnifiedLaw().fit(runs)
    assert unified.params_["F"] == pytest.approx(0.41, abs=0.05)
    assert unified.params_["C"] == pytest.approx(1.39, abs=0.2)
    assert unified.rmse_log_ < 1.5 * decoupled.rmse_log_


def test_kumar_and_frantar_laws_fit_their_data():
    runs = load_runs(simulate_runs(capacity_effs(), noise=0.002, specs=SPECS))
    kumar = KumarLaw().fit(runs)
    # capacity-shaped efficiencies are not Kumar's form, but its bits law must order them and fit within a few x
    assert kumar.efficiency("int2") < kumar.efficiency("int4") < kumar.efficiency("int8") < 1
    assert kumar.efficiency("int4") == pytest.approx(capacity_effs()["int4"], abs=0.1)
    assert kumar.rmse_log_ < 5 * DecoupledLaw().fit(runs).rmse_log_
    sparse = {"bf16": 1.0, "sparse(0.5)": 0.75, "2:4": 0.6, "sparse(0.75)": 0.45}
    frantar = FrantarLaw().fit(load_runs(simulate_runs(sparse, noise=0.002)))
    assert frantar.eff_["sparse(0.5)"] > frantar.eff_["sparse(0.75)"]
    assert frantar.rmse_log_ < 0.01


def test_validation_predicts_formats_that_follow_capacity():
    runs = load_runs(simulate_runs(capacity_effs(), noise=0.002, specs=SPECS))
    v = validate(runs, n_boot=16, seed=0, progress=False)
    table = v.table.set_index("format")
    assert (abs(table["predicted"] / table["fitted"] - 1) < 0.06).all()
    assert table["inside"].mean() >= 0.8 and (table["overlap"] >= table["inside"]).all()
    assert v.constants["F"] == pytest.approx(0.41, abs=0.06)


def test_validation_flags_a_format_off_the_capacity_curve():
    eff = capacity_effs()
    eff["int3"] = 0.35  # far below rho(GMSE int3) = 0.67
    v = validate(load_runs(simulate_runs(eff, noise=0.002, specs=SPECS)), n_boot=16, progress=False)
    assert not v.table.set_index("format").loc["int3", "inside"]


def test_prediction_interval_and_extrapolation():
    runs = load_runs(simulate_runs({"bf16": 1.0, "int4": 0.8}, noise=0.004))
    fit = DecoupledLaw().fit(runs)
    boot = bootstrap(fit, runs, n_boot=16, progress=False)
    new = pd.DataFrame({"format": ["int4"], "params": [8e8], "tokens": [1.6e10]})
    out = prediction_interval(fit, boot, new).iloc[0]
    assert out["lo"] < out["predicted"] < out["hi"]
    check = extrapolation_check(fit, runs)
    assert check["rel_error"].abs().max() < 0.02


def test_paired_comparison_orders_formats_by_their_loss_penalty():
    from capscale.analysis.compare import paired_comparison
    runs = load_runs(simulate_runs({"bf16": 1.0, "int8": 0.99, "int4": 0.8, "int2": 0.4}, noise=0.002))
    table = paired_comparison(runs).set_index("format")
    assert list(table.index) == ["int8", "int4", "int2"]
    assert table.loc["int2", "lo"] > table.loc["int4", "hi"] > 0 and table.loc["int4", "worse_in_cells"] == 15


def test_runs_composability_detects_parts():
    eff = {"bf16": 1.0, "int4": 0.8, "bf16/int4": 0.9, "int4/int4": 0.72, "2:4": 0.5, "2:4+int4": 0.3}
    table = compose_runs(eff, None).set_index("combined")
    assert table.loc["int4/int4", "ratio"] == pytest.approx(1.0)
    assert table.loc["2:4+int4", "ratio"] == pytest.approx(0.75)
    assert set(table.index) == {"int4/int4", "2:4+int4"}


def test_grid_composability_reproduces_published_products():
    product = compose_grid(read_grid(REFERENCE / "capacity_wbits_x_abits.csv"))["product"]
    for bits, published in [(1, 0.04), (2, 0.22), (3, 0.57), (4, 0.82)]:
        assert product.loc[str(bits), f"a{bits}"] == pytest.approx(published, abs=0.01)
    product = compose_grid(read_grid(REFERENCE / "capacity_bits_x_sparsity.csv"))["product"]
    for bits, published in [(2, (0.48, 0.39, 0.28)), (4, (0.74, 0.61, 0.43))]:
        assert product.loc[str(bits), ["s0.25", "s0.50", "s0.75"]].to_numpy() == pytest.approx(published, abs=0.01)


def _write(tmp_path, frame, name="runs.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("mutate,message", [
    (lambda f: f.drop(columns="loss"), "missing column(s) ['loss']"),
    (lambda f: f.assign(loss=f["loss"].astype(object).where(f.index != 3, "abc")), "row 5, column 'loss'"),
    (lambda f: f.assign(params=f["params"].where(f.index != 0, -5)), "row 2, column 'params'"),
    (lambda f: f.assign(tokens=f["tokens"].where(f.index != 1, np.nan)), "row 3, column 'tokens'"),
    (lambda f: pd.concat([f, f.iloc[[2]]]), "duplicates an earlier ok row"),
    (lambda f: f[f["format"] != "bf16"], "no baseline rows"),
    (lambda f: f.assign(status=f["status"].where(f.index != 0, "weird")), "column 'status'"),
])
def test_run_table_errors_name_file_row_and_column(tmp_path, mutate, message):
    frame = simulate_runs({"bf16": 1.0, "int4": 0.8}).assign(status="ok")
    path = _write(tmp_path, mutate(frame))
    with pytest.raises(RunTableError) as info:
        load_runs(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_too_few_runs_for_a_format_is_reported(tmp_path):
    frame = simulate_runs({"bf16": 1.0, "int4": 0.8})
    frame = pd.concat([frame, frame.iloc[[0]].assign(format="int2", w_format="int2")])
    with pytest.raises(RunTableError, match="int2"):
        DecoupledLaw().fit(load_runs(_write(tmp_path, frame)))


def test_column_mapping_and_status_filtering(tmp_path):
    frame = simulate_runs({"bf16": 1.0, "int4": 0.8}).rename(columns={"loss": "val_loss", "params": "n_params"})
    frame["status"] = "ok"
    frame.loc[0, "status"], frame.loc[0, "val_loss"] = "diverged", np.nan
    runs = load_runs(_write(tmp_path, frame), mapping="loss=val_loss,params=n_params")
    assert len(runs) == len(frame) - 1 and len(runs.attrs["skipped"]) == 1


def test_cli_fit_json_contract(chinchilla, capscale_cli):
    out = capscale_cli("fit", str(CHINCHILLA), "--json")
    printed = json.loads(out.stdout)
    assert printed["command"] == "fit" and printed["level"] == 0.95
    result = printed["results"]
    assert result["law"] == "decoupled" and result["n_runs"] == 240 and result["objective"] <= 1.018275e-3
    assert set(result["params"]) == {"A", "B", "E", "alpha", "beta"}
    alpha = result["params"]["alpha"]  # with the default bootstrap's interval (replication: se 0.015)
    assert alpha["value"] == pytest.approx(0.3473, abs=1e-3) and alpha["se"] == pytest.approx(0.015, rel=0.3)
    assert alpha["ci"][0] < alpha["value"] < alpha["ci"][1] and result["bootstrap"]["replicates"] == 200
    assert result["eff"]["bf16"]["value"] == 1.0


def test_cli_fit_validate_compose_on_a_run_table(tmp_path, capsys):
    """The JSON contracts of fit and validate on the command line (parsed and printed by `capscale.cli.main`, in
    this process); compose and predict print what LawFit returns (the slow tier runs them all as commands in
    fresh interpreters: test_a_saved_fit_is_reused...)."""
    import capscale
    from capscale.cli import main
    path = tmp_path / "runs.jsonl"
    frame = simulate_runs(capacity_effs(), noise=0.003, specs=SPECS)
    path.write_text("\n".join(json.dumps(r) for r in frame.to_dict("records")) + "\n")

    def command_json(*argv):
        assert main(list(argv)) in (0, None)
        printed = json.loads(capsys.readouterr().out)
        assert printed["command"] == argv[0]
        return printed["results"]
    fit = command_json("fit", str(path), "--bootstrap", "8", "--json", "--query", "params > 3e7", "--jobs", "2")
    assert fit["n_runs"] == 7 * 4 * 3 and len(fit["eff"]["int4"]["ci"]) == 2 and fit["eff"]["int4"]["se"] > 0
    val = command_json("validate", str(path), "--bootstrap", "8", "--json", "--jobs", "2")
    assert set(val["rho"]) == {"L", "F", "C"}
    row = val["formats"][0]
    assert set(row) >= {"format", "fitted", "predicted", "inside", "overlap"}
    assert row["fitted"]["ci"][0] <= row["fitted"]["value"] <= row["fitted"]["ci"][1] and len(row["predicted"]["ci"]) == 2
    slope = val["calibration"]["slope"]
    assert "calibration" in val and slope["ci"][0] < slope["ci"][1]
    result = capscale.fit(load_runs(path), bootstrap=8, progress=False)
    _, wald = result.compose()
    comp = wald.table.to_dict("records")
    assert comp[0]["combined"] == "int4/int4" and 0 <= comp[0]["p"] <= 1 and comp[0]["ratio_lo"] < comp[0]["ratio_hi"]
    pred = result.predict_format("int5", None, 1e8, 2e9)
    assert rho(gmse("int4", exact=True).gmse) < pred["eff"] < 1 and pred["loss_interval"][0] < pred["loss"]


def test_cli_bad_run_table_exits_2_naming_the_problem(tmp_path, capscale_cli):
    path = _write(tmp_path, simulate_runs({"bf16": 1.0, "int4": 0.8}).drop(columns="tokens"))
    out = capscale_cli("fit", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr and "tokens" in out.stderr
    with pytest.raises(InputError, match="nope.csv"):
        load_runs(tmp_path / "nope.csv")


def test_report_writes_html_markdown_json_and_figures(tmp_path):
    import capscale
    runs = load_runs(simulate_runs(capacity_effs(), noise=0.003, specs=SPECS))
    report = capscale.fit(runs, bootstrap=8, progress=False).report(
        tmp_path, progress=False, grids={"wbits_x_abits": REFERENCE / "capacity_wbits_x_abits.csv"})
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 9
    assert {"decoupled", "validation", "composability", "law_comparison", "verdicts", "provenance"} <= set(report.results)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["decoupled"]["n_runs"] == len(runs)
    assert (tmp_path / "loss_vs_params.png").stat().st_size > 10_000
    # verdict first, the same text everywhere: report.md opens with it, results.json holds it
    topics = [s["topic"] for s in results["verdicts"]]
    assert topics[0] == "Does capacity predict efficiency?" and "calibration slope" in results["verdicts"][0]["text"]
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.index("## Summary") < markdown.index("## 1. Capacity")
    assert markdown_text(results["verdicts"][0]["text"]) in markdown and str(escape(results["verdicts"][0]["text"])) in html
    assert "| format" in markdown and "```\n|" not in markdown  # real Markdown tables, not fenced text
    # provenance: what reproduces the report
    origin = results["provenance"]
    assert origin["runs"] == len(runs) and origin["bootstrap_replicates"] == 8 and origin["level"] == 0.95
    assert origin["numpy"] == np.__version__ and origin["law"] == "decoupled" and origin["date"].startswith("20")
    assert html.count("<caption>") >= 8 and 'id="provenance-json"' in html


@pytest.mark.slow
def test_bootstrap_intervals_cover_the_truth_at_about_the_nominal_rate():
    truth = {"bf16": 1.0, "int4": 0.8, "int2": 0.45}
    hits = []
    for rep in range(20):
        runs = load_runs(simulate_runs(truth, noise=0.01, seed=100 + rep))
        fit = DecoupledLaw().fit(runs)
        iv = bootstrap(fit, runs, n_boot=60, seed=rep, progress=False).intervals()
        hits += [iv.loc["eff[int4]", "lo"] <= 0.8 <= iv.loc["eff[int4]", "hi"],
                 iv.loc["alpha", "lo"] <= 0.34 <= iv.loc["alpha", "hi"]]
    assert 0.75 <= np.mean(hits) <= 1.0


def test_fit_health_compares_misfit_with_seed_scatter_and_flags_an_unidentified_E():
    eff = {"bf16": 1.0, "int4": 0.8, "int2": 0.4}
    runs = load_runs(pd.concat([simulate_runs(eff, noise=0.004, seed=s).assign(seed=s) for s in (0, 1)]))
    assert seed_scatter(runs) == pytest.approx(0.004, rel=0.3)
    assert np.isnan(seed_scatter(runs[runs["seed"] == 0]))
    law = DecoupledLaw().fit(runs)
    boot = bootstrap(law, runs, 30, n_jobs=1, progress=False)
    intervals = boot.intervals(law.values())
    health = fit_health(law, runs, boot).set_index("check")
    assert health.loc["irreducible loss E", "verdict"] == "ok"
    assert health.loc["residual RMSE, log loss", "verdict"] == "ok"
    assert disjoint(intervals, "int2", "int4") and disjoint(intervals, "int4", "bf16")
    assert not disjoint(intervals, "int4", "int4")
    assert resolved_chain(intervals, law.formats_) == ["int2", "int4", "bf16"]
    overlapping = pd.DataFrame({"lo": [0.1, 0.3, 0.35, 1.0], "hi": [0.4, 0.5, 0.9, 1.0]},
                               index=["eff[a]", "eff[b]", "eff[c]", "eff[bf16]"])
    assert len(resolved_chain(overlapping, ["a", "b", "c", "bf16"])) == 2  # a, then bf16: b and c overlap a or each other
    first = runs[runs["seed"] == 0]
    with_replicates = fit_health(DecoupledLaw().fit(first), first, None, replicates=runs[runs["seed"] == 1])
    assert with_replicates.set_index("check").loc["residual RMSE, log loss", "verdict"] == "ok"

    no_floor = load_runs(simulate_runs(eff, noise=0.001, law={"E": 0.0}))
    fit = DecoupledLaw().fit(no_floor)
    assert fit_health(fit, no_floor, None).set_index("check").loc["irreducible loss E", "verdict"] == "weak"
    held = DecoupledLaw(fix_E=0.3).fit(no_floor)
    assert fit_health(held, no_floor, None).set_index("check").loc["irreducible loss E", "verdict"] == "reported"


def test_a_label_only_table_fits_and_reports_without_capacity_sections(tmp_path):
    """Labels capscale cannot parse and no GMSE columns: the decoupled law fits; what needs capacity says why."""
    import capscale
    frame = simulate_runs({"dense": 1.0, "myfmt": 0.8, "w4a4": 0.6, "fmt_c": 0.5, "fmt_d": 0.9}).drop(
        columns=["w_format", "a_format"])
    path = _write(tmp_path, frame)
    runs = load_runs(path, baseline="dense")
    eff = capscale.fit(runs, baseline="dense", bootstrap=8, progress=False).as_json()["eff"]
    assert eff["myfmt"]["value"] == pytest.approx(0.8, rel=0.1) and eff["dense"]["value"] == 1.0
    with pytest.raises(InputError, match="myfmt.*w_gmse|w_gmse.*myfmt"):
        capscale.fit(runs, law="unified", baseline="dense", bootstrap=0)
    capscale.fit(runs, baseline="dense", bootstrap=8, progress=False).report(tmp_path / "r", progress=False)
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["validation"] is None and "Gaussian MSE" in results["capacity_omitted"]
    assert "Omitted:" in (tmp_path / "r" / "report.md").read_text()


def test_cell_bootstrap_resamples_whole_cells_with_all_their_formats():
    from capscale.analysis.bootstrap import resample
    runs = load_runs(simulate_runs({"bf16": 1.0, "int4": 0.8, "int2": 0.4}, noise=0.003))
    sample = resample(runs, np.random.default_rng(0), unit="cells")
    per_cell = sample.groupby(["params", "tokens"])["format"].agg(lambda f: sorted(f))
    assert all(len(f) % 3 == 0 and sorted(set(f)) == ["bf16", "int2", "int4"] for f in per_cell)
    law = DecoupledLaw().fit(runs)
    boot = bootstrap(law, runs, 16, seed=0, progress=False, unit="cells")
    assert boot.n_failed == 0 and boot.intervals(law.values()).loc["eff[int4]", "lo"] < 0.8


def test_the_confidence_level_is_a_parameter(tmp_path, capscale_cli):
    import capscale
    runs = load_runs(simulate_runs({"bf16": 1.0, "int4": 0.8, "int2": 0.4}, noise=0.004))
    ci = {level: capscale.fit(runs, bootstrap=24, level=level, progress=False, n_jobs=1).as_json()["eff"]["int4"]["ci"]
          for level in (0.8, 0.95)}
    assert ci[0.8][0] > ci[0.95][0] and ci[0.8][1] < ci[0.95][1]  # same refits, a narrower central share
    path = _write(tmp_path, simulate_runs({"bf16": 1.0, "int4": 0.8}))
    assert capscale_cli("fit", str(path), "--level", "1.5").returncode == 2


def test_calibration_regression_recovers_slope_1_when_capacity_predicts_efficiency():
    from capscale.analysis.statistics import calibration
    runs = load_runs(simulate_runs(capacity_effs(), noise=0.002, specs=SPECS))
    v = validate(runs, n_boot=24, seed=0, progress=False)
    cal = calibration(v.table, v.boot.samples)
    slope, lo, hi = cal.slope
    assert lo <= 1 <= hi and cal.joint_p > 0.05 and "slope" in str(cal.summary())


def test_composability_wald_detects_a_pair_that_does_not_multiply():
    from capscale.analysis.statistics import composability_wald
    eff = {"bf16": 1.0, "int4": 0.8, "bf16/int4": 0.9, "int4/int4": 0.72, "2:4": 0.6, "2:4+int4": 0.3}  # 0.3 != 0.48
    runs = load_runs(simulate_runs(eff, noise=0.002))
    law = DecoupledLaw().fit(runs)
    boot = bootstrap(law, runs, 40, seed=0, progress=False)
    wald = composability_wald([("int4/int4", "int4", "bf16/int4"), ("2:4+int4", "2:4", "int4")], law.eff_,
                              boot.samples).table.set_index("combined")
    assert wald.loc["int4/int4", "p"] > 0.05 and wald.loc["2:4+int4", "p"] < 0.01
    assert wald.loc["2:4+int4", "verdict"] == "does not multiply"


@pytest.mark.slow  # a calibration study: many simulated tables
def test_paired_mixed_model_flags_a_true_zero_difference_at_about_the_nominal_rate():
    from capscale.analysis.statistics import paired_mixed
    flagged, differs = 0, 0
    for seed in range(40):
        runs = load_runs(simulate_runs({"bf16": 1.0, "same": 1.0, "worse": 0.6}, noise=0.01, seed=seed))
        table = paired_mixed(runs).table.set_index("format")
        flagged += bool(table.loc["same", "differs"])
        differs += bool(table.loc["worse", "differs"])
    assert flagged <= 5 and differs == 40  # 5% nominal: 2 expected of 40, Holm only lowers it


@pytest.mark.slow  # eight CLI runs
def test_a_saved_fit_is_reused_with_the_same_numbers_and_refused_for_other_data(tmp_path, capscale_cli):
    path = _write(tmp_path, simulate_runs(capacity_effs(), noise=0.003, specs=SPECS))
    saved = tmp_path / "study.fit.json"
    assert capscale_cli("fit", str(path), "--bootstrap", "12", "-o", str(saved)).returncode == 0
    for command in (["validate", str(path)], ["compose", str(path)],
                    ["predict", "int5", "--params", "1e8", "--tokens", "2e9", "--runs", str(path)]):
        reused = capscale_cli(*command, "--fit", str(saved), "--json")
        refit = capscale_cli(*command, "--bootstrap", "12", "--seed", "0", "--json")
        assert reused.returncode == 0 and json.loads(reused.stdout) == json.loads(refit.stdout), command
    other = _write(tmp_path, simulate_runs(capacity_effs(), noise=0.003, specs=SPECS, seed=1), "other.csv")
    refused = capscale_cli("validate", str(other), "--fit", str(saved))
    assert refused.returncode == 2 and "other data" in refused.stderr


def test_the_kumar_law_reads_bits_columns_of_a_label_only_table():
    """Bits per value from w_bits/a_bits (or `bits`) columns: Kumar's constants recovered for labels capscale
    cannot parse; a format without bits is named."""
    g_w, g_a = 2.0, 1.5
    bits = {"dense": (16, 16), "w4": (4, 16), "w3": (3, 16), "w2": (2, 16), "w4a4": (4, 4), "w3a6": (3, 6)}
    kumar = lambda w, a: (1 - np.exp(-w / g_w)) * (1 - np.exp(-a / g_a))  # noqa: E731
    eff = {label: kumar(w, a) / kumar(16, 16) for label, (w, a) in bits.items()}
    frame = simulate_runs(eff, noise=0.001, seed=2).drop(columns=["w_format", "a_format"])
    frame["w_bits"], frame["a_bits"] = (frame["format"].map({k: v[i] for k, v in bits.items()}) for i in (0, 1))
    fit = KumarLaw(baseline="dense").fit(load_runs(frame, baseline="dense"))
    assert fit.params_["g_w"] == pytest.approx(g_w, rel=0.15) and fit.params_["g_a"] == pytest.approx(g_a, rel=0.15)
    frame.loc[frame["format"] == "w3a6", "w_bits"] = np.nan  # and its label is no spec
    with pytest.raises(InputError, match="w3a6"):
        KumarLaw(baseline="dense").fit(load_runs(frame, baseline="dense"))


@pytest.mark.parametrize("slope, intercept, p, expected", [
    ((0.83, 0.69, 0.97), (-0.08, -0.19, 0.03), 0.051, "the slope's interval lies below 1"),
    ((0.9, -0.1, 1.9), (0.0, -0.1, 0.1), 0.5, "slope's interval reaches 0"),
    ((1.0, 0.8, 1.2), (0.0, -0.1, 0.1), 0.5, "Capacity predicts efficiency, with no bias detected"),
    ((1.0, 0.8, 1.2), (0.0, -0.1, 0.1), 0.01, "does not predict efficiency without bias")])
def test_capacity_verdict_agrees_with_the_intervals_it_shows(slope, intercept, p, expected):
    """A slope interval of [0.69, 0.97] once read 'reaches 0'; the words must follow the numbers beside them."""
    from types import SimpleNamespace
    from capscale.analysis.verdicts import capacity_sentence
    table = pd.DataFrame({"inside": [True], "overlap": [True]})
    validation = SimpleNamespace(table=table, level=0.95)
    cal = SimpleNamespace(slope=slope, intercept=intercept, joint_p=p, level=0.95)
    assert expected in capacity_sentence(validation, cal, None)


def test_a_two_format_study_validates_against_the_published_constants(capscale_cli, tmp_path):
    """Too few formats to refit rho, yet each format's efficiency is checked against rho(GMSE) at the published
    constants (simulated runs whose efficiencies follow them, so every check must pass)."""
    effs = capacity_effs()
    runs = simulate_runs({f: effs[f] for f in ("bf16", "int4", "int3")}, noise=0.002, seed=5)
    table = tmp_path / "mine.csv"
    runs.to_csv(table, index=False)
    refused = capscale_cli("validate", str(table), "--bootstrap", "0")
    assert refused.returncode == 2 and "--constants published" in refused.stderr
    out = capscale_cli("validate", str(table), "--constants", "published", "--bootstrap", "40", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    rows = {r["format"]: r for r in result["results"]}
    assert set(rows) == {"int4", "int3"} and result["constants"] == "published"
    for r in rows.values():
        assert r["inside"] and r["fitted"]["value"] == pytest.approx(r["predicted"], abs=0.1)


def test_bootstrap_standard_error_survives_a_runaway_replicate():
    """`--resample cells` once printed se 1.98e+28 beside a sane interval: one replicate ran off along a ridge."""
    from capscale.analysis.bootstrap import BootstrapResult
    rng = np.random.default_rng(0)
    values = rng.normal(2.0, 0.1, 400)
    values[7] = 1.98e30
    se = BootstrapResult(pd.DataFrame({"A": values}), n_failed=0).intervals()["se"]["A"]
    assert se == pytest.approx(0.1, rel=0.15)


@pytest.mark.slow
def test_report_json_title_and_form(capscale_cli, tmp_path):
    out = capscale_cli("report", str(data.path("study_runs.jsonl")), "--bootstrap", "5", "-o", str(tmp_path / "r"),
                       "--json", "--title", "My study", "--form", "logistic")
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout)["results"]
    assert results["title"] == "My study" and results["validation"]["form"] == "logistic"
    assert "My study" in (tmp_path / "r" / "report.html").read_text()
