"""LawFit, the one results object of a fit: fitted numbers and their intervals, a summary in three renderings,
predictions with intervals, saving and reloading, and the analyses that start from it."""
import numpy as np
import pandas as pd
import pytest

import capscale
from capscale.analysis.lawfit import LawFit
from capscale.analysis.runs import load_runs
from capscale.analysis.simulate import simulate_runs
from capscale.capacity import InputError

TRUE_EFF = {"bf16": 1.0, "int8": 0.97, "int4": 0.8, "int3": 0.62, "int2": 0.35}


@pytest.fixture(scope="module")
def fitted():
    runs = load_runs(simulate_runs(TRUE_EFF, noise=0.003, specs={f: (f, None) for f in TRUE_EFF}))
    return capscale.fit(runs, bootstrap=40, seed=3, level=0.9, progress=False, n_jobs=1)


def test_a_fit_recovers_the_law_and_its_intervals_cover_the_truth(fitted):
    assert isinstance(fitted, LawFit) and fitted.level == 0.9 and fitted.seed == 3
    for label, value in TRUE_EFF.items():
        assert fitted.eff[label] == pytest.approx(value, abs=0.05), label
    intervals = fitted.conf_int()
    covered = [intervals.loc[f"eff[{f}]", "lo"] <= v <= intervals.loc[f"eff[{f}]", "hi"]
               for f, v in TRUE_EFF.items() if f != "bf16"]
    assert sum(covered) >= 3  # 90% intervals over 4 formats
    wider = fitted.conf_int(level=0.99)
    assert (wider["hi"] - wider["lo"] >= intervals["hi"] - intervals["lo"] - 1e-12).all()
    assert set(fitted.params) == {"A", "alpha", "B", "beta", "E"}


def test_the_summary_renders_as_text_markdown_and_html_with_the_level(fitted):
    summary = fitted.summary()
    text, markdown, html = str(summary), summary.as_markdown(), summary.as_html()
    for rendering in (text, markdown, html):
        assert "eff[int4]" in rendering and "alpha" in rendering and "0.05" in rendering and "0.95" in rendering
    assert "| eff[int2]" in markdown and "<caption>" in html and "40 refits" in text
    assert repr(fitted).startswith("<LawFit decoupled: ")


def test_predictions_come_with_intervals_that_contain_them(fitted):
    new = pd.DataFrame({"format": ["int4", "int2", "bf16"], "params": [4e8, 4e8, 8e8], "tokens": [8e9, 8e9, 2e10]})
    point = fitted.predict(new)
    table = fitted.predict(new, interval=True)
    assert np.allclose(table["loss"], point)
    assert ((table["lo"] <= table["loss"]) & (table["loss"] <= table["hi"]) & (table["lo"] < table["hi"])).all()
    assert table.loc[1, "loss"] > table.loc[0, "loss"]  # int2 trains worse than int4 at the same (N, D)
    without = capscale.fit(fitted.runs, bootstrap=0, progress=False)
    with pytest.raises(InputError, match="bootstrap"):
        without.predict(new, interval=True)
    with pytest.raises(InputError, match="bootstrap"):
        without.conf_int()


def test_a_saved_fit_reloads_with_the_same_numbers_and_is_refused_for_other_data(fitted, tmp_path):
    path = fitted.save(tmp_path / "fit.json")
    again = LawFit.load(path, fitted.runs)
    assert again.eff == fitted.eff and again.seed == 3 and again.level == 0.9
    pd.testing.assert_frame_equal(again.conf_int(), fitted.conf_int())
    other = fitted.runs.assign(loss=fitted.runs["loss"] * 1.01)
    with pytest.raises(InputError, match="other data"):
        LawFit.load(path, other)


def test_the_analyses_start_from_the_fit(fitted):
    health = fitted.health()
    assert "irreducible loss E" in set(health["check"])
    validation = fitted.validate(progress=False, n_jobs=1)
    assert set(validation.table["format"]) == set(TRUE_EFF) - {"bf16"}
    laws = fitted.compare_laws()
    assert laws.loc[laws["law"] == "decoupled", "parameters"].item() == 5 + len(TRUE_EFF) - 1
    assert {"decoupled", "unified"} <= set(laws["law"])
    table, wald = fitted.compose()
    assert table.empty and wald is None  # no combined format among these
    assert set(fitted.paired()["format"]) == set(TRUE_EFF) - {"bf16"}
    assert fitted.as_json()["eff"]["int4"]["ci"][0] < fitted.eff["int4"] < fitted.as_json()["eff"]["int4"]["ci"][1]


def test_fit_reads_a_path_and_refuses_an_unknown_law(tmp_path):
    path = tmp_path / "runs.csv"
    simulate_runs({"bf16": 1.0, "int4": 0.8}).to_csv(path, index=False)
    result = capscale.fit(path, bootstrap=0, progress=False)
    assert result.eff["int4"] == pytest.approx(0.8, abs=0.05) and result.boot is None
    with pytest.raises(InputError, match="unknown law"):
        capscale.fit(path, law="chinchilla", bootstrap=0)


def test_a_weak_fit_warns_in_python_too():
    """E at its bound was only in law.warnings_; a notebook user must see it without looking there."""
    import warnings
    from capscale import data
    from capscale.analysis.names import FitWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        law = capscale.fit(data.path("study_runs.jsonl"), bootstrap=0, progress=False)
    texts = [str(w.message) for w in caught if issubclass(w.category, FitWarning)]
    assert texts and texts == law.law.warnings_


def test_every_results_object_follows_one_protocol(fitted):
    """summary() -> Summary in three renderings; as_json() -> one strict-JSON object, intervals as ci."""
    import json

    from capscale.analysis.constancy import constancy_test
    from capscale.analysis.frontier import frontier
    from capscale.capacity.gmse import error_split, gmse
    from capscale.capacity.results import Summary
    effs = {"bf16": 1.0, "int8": 0.97, "bf16/int8": 0.96, "int8/int8": 0.93, "int4": 0.8, "int2": 0.4}
    specs = {"bf16": ("bf16", None), "int8": ("int8", None), "bf16/int8": (None, "int8"),
             "int8/int8": ("int8", "int8"), "int4": ("int4", None), "int2": ("int2", None)}
    fit = capscale.fit(load_runs(simulate_runs(effs, noise=0.003, specs=specs)), bootstrap=20, progress=False,
                       n_jobs=1)
    validation = fit.validate(progress=False)
    assert fit.validate(progress=False) is validation  # computed once per fit
    _, wald = fit.compose()
    results = [fit, validation, fit.calibration(validation), wald, fit.paired_mixed(),
               constancy_test(fit.law, fit.runs), fit.plan(flops=1e19),
               frontier(["{int2,int4}"], samples=1 << 14, cache=False, progress=False),
               gmse("int4", samples=1 << 14), error_split("int4(rounding=stochastic)", samples=1 << 14)]
    assert all(r is not None for r in results)
    for result in results:
        summary = result.summary()
        assert isinstance(summary, Summary), type(result)
        text, markdown, html = str(summary), summary.as_markdown(), summary.as_html()
        assert summary.title in text and summary.title in markdown and "<caption>" in html
        json.dumps(result.as_json(), allow_nan=False)
    ratios = wald.as_json()["results"]
    assert ratios and all(len(r["ratio"]["ci"]) == 2 for r in ratios)
    assert set(fit.conf_int().columns) == {"value", "se", "lo", "hi"}
