"""The reference studies shipped in the package: published runs read into run tables, fitted where the papers
fitted them. Published numbers are targets with tolerances (../shared/reference/published/README.md)."""
import json

import pandas as pd
import pytest

from capscale import data
from capscale.analysis.lawfit import fit
from capscale.analysis.runs import load_runs
from capscale.analysis.studies import (published_comparison, published_efficiencies, quest_runs, study_runs,
                                       t5_runs)
from capscale.capacity import InputError


def test_quest_runs_read_the_quantizer_class_not_its_bits_field():
    runs = quest_runs()
    assert len(runs) == 104 and runs["format"].nunique() == 21
    fp4 = runs[runs["quest_w_quant"] == "HalfHadamardFP4TrustQuantizer"]
    assert set(fp4["w_format"]) == {"fp4_e2m1"} and set(fp4["a_format"]) == {"fp4_e2m1"}  # its bits fields say 16
    weight_only = runs[(runs["quest_a_quant"] == "NoQuantizer") & (runs["quest_w_quant"] != "NoQuantizer")]
    assert weight_only["a_format"].isna().all() and set(weight_only["format"]) == {"int2", "int3", "int4",
                                                                                  "int1 [clip, half rotation]"}
    four_eight = runs[runs["quest_w_quant"].str.contains("FourEight")]
    assert set(four_eight["w_format"]) == {"4:8(vector=2)+int4(scale_from=row)"} and set(four_eight["a_format"]) == {"int4"}
    assert set(runs.loc[runs["quest_w_quant"] == "TrustQuantizer", "rotation"]) == {"none"}
    assert runs.attrs["provenance"]["source"].startswith("IST-DASLab/QuEST")
    for study in ("quest", "t5"):
        assert "License" in data.path("published", study, "LICENSE").read_text()


def test_quest_fit_reproduces_every_published_efficiency():
    """Done-when of the reference-studies issue: each published efficiency within 0.05 (here within 0.03)."""
    law = fit(load_runs(quest_runs(), name="quest"), bootstrap=0, progress=False)
    table = published_comparison(law, None, published_efficiencies("quest"))
    assert len(table) == 13
    assert table["off_published"].max() < 0.03, table[["format", "fitted", "published"]]


def test_t5_fit_reproduces_the_independent_fit():
    runs = t5_runs()
    assert len(runs) == 48 and runs.loc[runs["sparsity"] == 0, "format"].eq("bf16").all()
    law = fit(load_runs(runs, name="t5"), bootstrap=0, progress=False)
    for spec, target in [("sparse(0.5)", 0.89), ("sparse(0.75)", 0.57), ("sparse(0.875)", 0.31)]:
        assert law.eff[spec] == pytest.approx(target, abs=0.01)


def test_unknown_study_and_unknown_quantizer_are_refused(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="shipped studies are quest, t5, quartet, cpu"):
        study_runs("c4")
    runs = json.loads(data.path("published", "quest", "runs_for_scaling.json").read_text())[:3]
    runs[1]["w_quant"] = "os.system"
    (tmp_path / "quest").mkdir()
    (tmp_path / "quest" / "runs_for_scaling.json").write_text(json.dumps(runs))
    monkeypatch.setattr(data, "path", lambda *parts: tmp_path.joinpath(*parts[1:]))
    with pytest.raises(InputError, match="run 2: unknown QuEST quantizer class 'os.system'"):
        quest_runs()


@pytest.mark.slow
def test_demo_on_the_quest_study_states_published_and_predicted_efficiencies(capscale_cli, tmp_path):
    out = capscale_cli("demo", "--study", "quest", "--bootstrap", "20", "-o", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    first = results["verdicts"][0]
    assert first["topic"] == "Does the fit reproduce the published efficiencies?"
    table = pd.DataFrame(results["published_comparison"])
    assert table["off_published"].max() < 0.05 and table["predicted"].notna().all()
    assert "Published efficiencies" in (tmp_path / "r" / "report.md").read_text()


def test_the_paired_test_never_scores_a_format_on_cells_it_does_not_share_with_bf16():
    """QuEST's int4/int4, int3/int3, int2/int2 share no (N, D) cell with bf16: once reported +0.112, +0.136, +0.189
    and counted among the formats that differ; now listed as not compared, with the reason."""
    from capscale.analysis.statistics import paired_mixed
    from capscale.analysis.verdicts import differences_sentence
    mixed = paired_mixed(load_runs(quest_runs(), name="quest"), "bf16")
    rows = mixed.table.set_index("format")
    for fmt in ("int4/int4", "int3/int3", "int2/int2"):
        assert rows.loc[fmt, "note"] == "not compared: no (N, D) cell shared with bf16"
        assert pd.isna(rows.loc[fmt, "log_loss_diff"]) and not rows.loc[fmt, "differs"]
    sentence = differences_sentence(mixed, "bf16")
    assert "15 of 17 formats differ" in sentence and "int4/int4 (no (N, D) cell shared with bf16)" in sentence


def test_a_slash_splits_a_label_only_between_two_specs():
    from capscale.capacity.runtable import split_label
    assert split_label("int4/int4") == ("int4", "int4") and split_label("bf16/nvfp4") == ("bf16", "nvfp4")
    assert split_label("nvfp4 4/6") == ("nvfp4 4/6", None)  # once weights 'nvfp4 4', activations '6'
    table = load_runs(pd.DataFrame({"format": ["bf16", "bf16", "nvfp4 4/6", "nvfp4 4/6", "bf16", "nvfp4 4/6"],
                                    "params": [1e6, 2e6, 1e6, 2e6, 4e6, 4e6], "tokens": [2e7, 8e7, 2e7, 8e7, 4e8, 4e8],
                                    "loss": [3.0, 2.8, 3.1, 2.9, 2.6, 2.7]}), name="slash")
    row = table[table["format"] == "nvfp4 4/6"].iloc[0]
    assert row["a_format"] is None and "read as one label" in row["capacity_note"]
