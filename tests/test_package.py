"""The package: one namespace with its data inside, and one meaning for every uncompressed name."""
import argparse
import json
import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import capscale
from capscale import data
from capscale.analysis.laws import DecoupledLaw
from capscale.analysis.simulate import simulate_runs
from capscale.capacity import UNCOMPRESSED_BITS, bits_of, is_uncompressed, spec_gmse
from capscale.trainers.compression_config import Compression
from capscale.trainers.layers import CompressedLinear

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(UNCOMPRESSED_BITS))
def test_an_uncompressed_name_means_the_same_to_gmse_train_and_fit(name):
    # gmse: no error, exactly; bits as declared
    assert capscale.gmse(name, samples=1 << 16).gmse == 0 == capscale.gmse(name, exact=True).gmse == spec_gmse(name)
    assert bits_of(name) == capscale.parse(name).bits_per_value == UNCOMPRESSED_BITS[name]
    assert is_uncompressed(name)
    # train: nothing applied to weights or activations
    comp = Compression(name, name)
    assert comp.w_fmt is None and comp.a_fmt is None and comp.label == capscale.BASELINE
    layer = CompressedLinear(16, 8, comp)
    torch.nn.init.normal_(layer.weight)
    x = torch.randn(4, 16)
    assert torch.equal(layer(x), F.linear(x, layer.weight))
    record = comp.to_record()
    assert record["w_gmse"] == record["a_gmse"] == 0 and Compression.from_record(record) == comp
    # fit: a table whose baseline is labelled `name` fits with efficiency 1 and GMSE 0 for it
    frame = simulate_runs({name: 1.0, "int4": 0.8}, specs={name: (name, None), "int4": ("int4", None)})
    runs = capscale.load_runs(frame, baseline=name)
    assert (runs.loc[runs["format"] == name, ["w_gmse", "a_gmse"]].to_numpy() == 0).all()
    law = DecoupledLaw(baseline=name).fit(runs)
    assert law.eff_[name] == 1.0 and 0.7 < law.eff_["int4"] < 0.9


def test_public_api_is_importable_from_capscale():
    for name in ("gmse", "parse", "register", "DecoupledLaw", "UnifiedLaw", "KumarLaw", "FrantarLaw", "train",
                 "TrainConfig", "Compression", "load_runs", "bootstrap", "validate", "build_report", "fit", "LawFit"):
        value = getattr(capscale, name)
        home = importlib.import_module(capscale._HOME[name], "capscale")
        assert value is getattr(home, name) and callable(value), name


def test_shipped_data_is_addressed_inside_the_package():
    assert data.path("study_runs.jsonl").is_file() and data.path("study.toml").is_file()
    chinchilla = data.path("reference", "chinchilla_epoch_240.csv")
    assert len(chinchilla.read_text().splitlines()) == 241
    assert "provenance" in data.path("reference", "README.md").read_text()


@pytest.mark.slow
def test_the_wheel_installs_only_capscale_with_its_data_and_templates(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("capscale-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"capscale", next(t for t in top if t.endswith(".dist-info"))}
    for shipped in ("capscale/data/study_runs.jsonl", "capscale/data/study.toml",
                    "capscale/data/reference/chinchilla_epoch_240.csv", "capscale/analysis/templates/report.html.j2",
                    "capscale/capacity/formats.py", "capscale/trainers/train.py", "capscale/__main__.py"):
        assert shipped in names, shipped
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert entry_points.split() == ["[console_scripts]", "capscale", "=", "capscale.cli:main"]  # the one command


def test_python_m_capscale_is_the_command(capscale_cli):
    out = capscale_cli("gmse", "bf16", "fp32", "none", "--json")
    assert out.returncode == 0, out.stderr
    assert [r["gmse"]["value"] for r in json.loads(out.stdout)["results"]] == [0.0, 0.0, 0.0]


def test_every_subcommand_explains_itself():
    """`--help` of each subcommand renders (a literal '%' in a help text once broke `train --help`)."""
    from capscale.cli import build_parser
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"train", "sweep", "fit", "report", "demo", "diagnose"} <= set(commands)
    for name, sub in commands.items():
        text = sub.format_help()
        assert "usage: capscale " + name in text, name
    from dataclasses import fields
    from capscale.commands_train import OPTION_GROUPS
    from capscale.trainers.config import TrainConfig
    grouped = [n for names in OPTION_GROUPS.values() for n in names]
    assert sorted(grouped) == sorted(f.name for f in fields(TrainConfig) if f.name != "compression")
    train_help = commands["train"].format_help()
    assert all(f"\n{title}:" in train_help for title in OPTION_GROUPS)


def test_shipped_files_resolve_by_name_from_any_directory(capscale_cli, tmp_path):
    listed = capscale_cli("data", "list", cwd=tmp_path)
    assert listed.returncode == 0 and "published/quest/runs_for_scaling.json" in listed.stdout
    found = capscale_cli("data", "path", "study.toml", cwd=tmp_path)
    assert found.returncode == 0 and Path(found.stdout.strip()) == data.path("study.toml")
    missing = capscale_cli("data", "path", "studdy.toml", cwd=tmp_path)
    assert missing.returncode == 2 and "did you mean study.toml" in missing.stderr
