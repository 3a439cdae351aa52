"""One JSON shape: every `--json` prints one object {"command", "level", "results", ...}, intervals as
{"value", "ci": [lo, hi]}, an empty result an empty list with a reason (never prose)."""
import json

import pytest

from capscale.analysis.simulate import simulate_runs
from capscale.cli import main

SPECS = {"bf16": ("bf16", None), "int4": ("int4", None), "int3": ("int3", None), "int2": ("int2", None),
         "int4/int4": ("int4", "int4"), "bf16/int4": ("bf16", "int4")}


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    path = tmp_path_factory.mktemp("json") / "runs.csv"
    simulate_runs({"bf16": 1.0, "int4": 0.84, "int3": 0.65, "int2": 0.41, "int4/int4": 0.69, "bf16/int4": 0.83}, specs=SPECS, noise=0.003,
                  seed=0).to_csv(path, index=False)
    return str(path)


def printed(capsys, *argv) -> dict:
    assert main(list(argv)) in (0, None)
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out, dict) and out["command"] == argv[0] and {"level", "results"} <= set(out), out
    return out


def intervals(node) -> list:
    """Every {"value", "ci"} in a JSON tree."""
    if isinstance(node, dict):
        found = [node] if {"value", "ci"} <= set(node) else []
        return found + [i for v in node.values() for i in intervals(v)]
    if isinstance(node, list):
        return [i for v in node for i in intervals(v)]
    return []


def test_every_json_command_prints_one_object_with_value_and_ci(capsys, table, tmp_path):
    small = ["--bootstrap", "6", "--jobs", "1"]
    outputs = {
        "gmse": printed(capsys, "gmse", "int4", "nvfp4", "--samples", "65536", "--json"),
        "compare": printed(capsys, "compare", "int4", "int2", "--samples", "65536", "--json"),
        "fit": printed(capsys, "fit", table, *small, "--json"),
        "validate": printed(capsys, "validate", table, *small, "--constants", "published", "--json"),
        "compose": printed(capsys, "compose", table, *small, "--json"),
        "predict": printed(capsys, "predict", "int5", "--params", "1e8", "--tokens", "2e9", "--runs", table, *small,
                           "--json"),
        "plan": printed(capsys, "plan", table, "--flops", "1e20", "--law", "decoupled", *small, "--json"),
        "frontier": printed(capsys, "frontier", "int{2..3}", "--samples", "4096", "--no-cache", "--json"),
    }
    for name, out in outputs.items():
        found = intervals(out["results"])
        assert found, name
        for node in found:
            assert node["ci"] is None or (len(node["ci"]) == 2 and node["ci"][0] <= node["ci"][1]), (name, node)
    assert outputs["compose"]["results"][0]["combined"] == "int4/int4"


def test_an_empty_result_is_an_empty_list_with_its_reason(capsys, tmp_path):
    path = tmp_path / "two.csv"
    simulate_runs({"bf16": 1.0, "int4": 0.84}, noise=0.003).to_csv(path, index=False)
    out = printed(capsys, "compose", str(path), "--bootstrap", "4", "--jobs", "1", "--json")
    assert out["results"] == [] and "no combined format" in out["reason"]


@pytest.mark.parametrize("command, old, new", [
    (["train"], "--runs", "-o/--output"), (["train"], "--memory", "--device-memory"),
    (["sweep", "demo_small"], "--runs", "-o/--output"), (["plan", "--study", "quest"], "--memory", "--weight-memory"),
    (["compose"], "--grid", "--capacity-grid"), (["report", "--study", "quest"], "--grid", "--capacity-grid")])
def test_an_option_name_that_meant_two_things_is_refused_with_its_new_name(capsys, command, old, new):
    with pytest.raises(SystemExit) as exit_:
        main([*command, old, "x"])
    assert exit_.value.code == 2 and f"{old} was renamed {new}" in capsys.readouterr().err
