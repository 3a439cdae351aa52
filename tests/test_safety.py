"""Untrusted input: run tables, specs, queries, sweep files and checkpoints run no code; accidents (torn lines,
retries, concurrent sweeps, re-runs) never corrupt a table; bad input is one clear line and exit 2."""
import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from capscale import capacity
from capscale.analysis.laws import DecoupledLaw
from capscale.analysis.runs import load_runs
from capscale.analysis.simulate import simulate_runs
from capscale.capacity.runtable import read_lines, read_records
from capscale.trainers.runlog import append_record, claim

SWEEP = """runs = "runs.jsonl"
sizes = [3000, 6000]
tokens_per_param = [2]
formats = [{w = "bf16"}, {w = "int4"}, {w = "int2"}]
[train]
batch_size = 4
context = 32
eval_tokens = 512
"""


def _table(tmp_path, cell: str):
    frame = simulate_runs({"bf16": 1.0, "int4": 0.8})
    frame.loc[frame["format"] == "int4", ["format", "w_format"]] = cell
    path = tmp_path / "runs.csv"
    frame.to_csv(path, index=False)
    return path


CELLS = ["os:system(touch PWNED)", "builtins:print(PWNED)", "subprocess:run(touch PWNED)",
         "capscale.capacity.formats:Component"]
DEFAULT_TIER = {("capscale.capacity.formats:Component", "validate")}  # the rest run in the slow tier


@pytest.mark.parametrize("cell,command", [pytest.param(c, m, marks=() if (c, m) in DEFAULT_TIER else pytest.mark.slow)
                                          for m in ("fit", "validate", "compose") for c in CELLS])
def test_a_table_cell_naming_code_is_refused_and_runs_nothing(tmp_path, capscale_cli, cell, command):
    path = _table(tmp_path, cell)
    out = capscale_cli(command, str(path), "--bootstrap", "0", cwd=tmp_path)
    if command == "validate":  # needs the format's GMSE: refused, saying why
        assert out.returncode == 2 and "plugin" in out.stderr and "Traceback" not in out.stderr
    else:  # the decoupled law and composability need no spec: the cell is only a label
        assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.csv"]


def test_a_spec_resolves_module_classes_only_in_loaded_plugins(tmp_path, capscale_cli, monkeypatch):
    plugin = tmp_path / "myformats.py"
    plugin.write_text("from capscale import capacity\n\nclass Halve(capacity.Component):\n"
                      "    name, defaults = 'halve', {'factor': 0.5}\n    keeps_bits = True\n\n"
                      "    def apply(self, x, keep, inner):\n        return inner(x * self.params['factor'], keep)\n\n"
                      "def not_a_component():\n    open('PWNED', 'w').write('x')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    refused = capscale_cli("gmse", "myformats:Halve", "--samples", "4096", cwd=tmp_path, env=env)
    assert refused.returncode == 2 and "not a loaded plugin" in refused.stderr
    ok = capscale_cli("--plugin", "myformats", "gmse", "myformats:Halve(factor=0.9)", "--samples", "4096", "--json",
                      cwd=tmp_path, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["results"][0]["gmse"]["value"] == pytest.approx(0.01, rel=0.05)
    from capscale.capacity import spec
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(spec, "_PLUGINS", dict(spec._PLUGINS))  # the plugin stays loaded only in this test
    monkeypatch.delitem(sys.modules, "myformats", raising=False)
    capacity.load_plugin("myformats")
    with pytest.raises(capacity.SpecError, match="not a Component subclass"):
        capacity.parse("myformats:not_a_component")
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()
    monkeypatch.delitem(sys.modules, "myformats")


@pytest.mark.parametrize("query", ["@pd.io.common.os.system('touch PWNED')",
                                   *(pytest.param(q, marks=pytest.mark.slow) for q in
                                     ("__import__('os').system('touch PWNED')", "params.__class__",
                                      "loss > 1 and exec('1')", "(params + 1) > 2", "lambda: 1"))])
def test_a_query_that_is_not_a_comparison_is_refused(tmp_path, capscale_cli, query):
    path = _table(tmp_path, "int4")
    out = capscale_cli("fit", str(path), "--query", query, cwd=tmp_path)
    assert out.returncode == 2 and "--query" in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.csv"]


def test_the_query_language_selects_as_documented():
    runs = simulate_runs({"bf16": 1.0, "int4": 0.8, "int2": 0.4})
    n = lambda q: len(load_runs(runs, query=q))  # noqa: E731
    assert n("params > 5e7") == (runs["params"] > 5e7).sum()
    assert n('format in ["bf16", "int4"] and not tokens < 2e9') == \
        (runs["format"].isin(["bf16", "int4"]) & ~(runs["tokens"] < 2e9)).sum()
    assert n("1e8 <= params < 4e8 or format == 'int2'") == \
        (((runs["params"] >= 1e8) & (runs["params"] < 4e8)) | (runs["format"] == "int2")).sum()


def test_a_pickle_checkpoint_carrying_code_fails_cleanly(tmp_path, capscale_cli):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))
    checkpoint = tmp_path / "evil.pt"
    checkpoint.write_bytes(pickle.dumps({"model": Payload()}))
    out = capscale_cli("diagnose", str(checkpoint))
    assert out.returncode == 2 and "Traceback" not in out.stderr and not (tmp_path / "PWNED").exists()
    with pytest.raises(Exception):
        torch.load(checkpoint, weights_only=True)
    assert not (tmp_path / "PWNED").exists()


def test_a_torn_last_line_is_skipped_on_read_and_moved_aside_by_the_next_append(tmp_path):
    path = tmp_path / "runs.jsonl"
    for i in range(2):
        append_record(path, {"format": "bf16", "params": 1000 + i, "tokens": 1e5, "loss": 3.0, "status": "ok"})
    with open(path, "a") as f:
        f.write('{"format": "int4", "par')  # a crash mid-append
    with pytest.warns(UserWarning, match="line 3 is incomplete"):
        assert len(read_records(path)) == 2
    append_record(path, {"format": "int4", "params": 1000, "tokens": 1e5, "loss": 3.1, "status": "ok"})
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)
    assert (tmp_path / "runs.jsonl.torn").read_text() == '{"format": "int4", "par\n'  # kept, not cut away
    (tmp_path / "middle.jsonl").write_text('{"a": 1}\n[1, 2, 3]\n{"b": 2}\n')
    with pytest.raises(capacity.InputError, match="line 2: expected a JSON object"):
        read_lines(tmp_path / "middle.jsonl")


def test_a_retried_failure_keeps_every_record_and_the_table_still_fits(tmp_path):
    frame = simulate_runs({"bf16": 1.0, "int4": 0.8}).assign(status="ok")
    failed = frame.iloc[[0]].assign(status="failed", loss=float("nan"))
    runs = load_runs(__import__("pandas").concat([frame, failed, failed]))
    assert len(runs) == len(frame) and len(runs.attrs["skipped"]) == 2
    assert DecoupledLaw().fit(runs).eff_["int4"] == pytest.approx(0.8, abs=0.05)


def test_claims_are_exclusive_and_a_dead_claimant_is_taken_over(tmp_path):
    table = tmp_path / "runs.jsonl"
    first = claim(table, "abc")
    assert first is not None and claim(table, "abc") is None
    first.release()
    assert not (tmp_path / "runs.jsonl.claims").exists()  # released: no folder left beside the table
    (tmp_path / "runs.jsonl.claims").mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "runs.jsonl.claims" / "abc.claim").write_text(
        json.dumps({"host": __import__("socket").gethostname(), "pid": int(dead.stdout), "time": 0}))
    taken = claim(table, "abc")
    assert taken is not None
    taken.release()


@pytest.mark.slow
def test_two_concurrent_sweeps_train_each_run_once(tmp_path):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(SWEEP)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "capscale", "sweep", str(sweep), "--threads", "1"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    records = read_records(tmp_path / "runs.jsonl")
    keys = [r["key"] for r in records if r["status"] == "ok"]
    assert len(keys) == 6 and len(set(keys)) == 6 and len(records) == 6


def test_rerunning_a_finished_train_says_so_and_appends_nothing(tmp_path, capscale_cli):
    from capscale.trainers.compression_config import Compression
    from capscale.trainers.train import TrainConfig, train_and_record
    runs = tmp_path / "r.jsonl"
    cfg = TrainConfig(Compression("int4"), params=3000, tokens=8000, batch_size=4, context=32)
    assert train_and_record(cfg, runs, progress=False)["status"] == "ok"
    assert train_and_record(cfg, runs, progress=False) is None  # finished: not trained again
    again = capscale_cli("train", "--w-format", "int4", "--params", "3000", "--tokens", "8000", "--batch-size", "4",
                         "--context", "32", "--output", str(runs), "--quiet")
    assert again.returncode == 0 and "already finished" in again.stderr
    assert len(read_records(runs)) == 1


# ---- fuzzing: any input gives a result or an InputError (exit 2), never another exception or a side effect ----

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SPEC_PIECES = st.sampled_from(["int", "4", "8", "(", ")", "+", ",", "=", ":", "group", "scale", "rms", "row", "tensor",
                               "sparse", "0.5", "2:4", "vector", "vq", "dim", "bits", "nf4", "hadamard", "block", "-1",
                               "nan", "inf", "1e308", "os", "system", "fp4_e2m1", "mxfp4", " ", "true", "x"])


@FUZZ
@given(st.one_of(st.text(max_size=60), st.lists(SPEC_PIECES, max_size=12).map("".join)))
def test_fuzz_any_text_as_a_spec(text):
    try:
        fmt = capacity.parse(text)
    except capacity.InputError:
        return
    try:
        assert fmt(torch.randn(4, 64)).shape == (4, 64)
    except capacity.InputError:  # a well-formed spec that does not fit this shape (group 128 on rows of 64)
        pass


@FUZZ
@given(st.binary(max_size=400), st.sampled_from([".jsonl", ".csv"]))
def test_fuzz_any_bytes_as_a_run_table(tmp_path, data, suffix):
    tmp_path = Path(tempfile.mkdtemp(dir=tmp_path))  # one folder per example: its only file is the table
    path = tmp_path / f"runs{suffix}"
    path.write_bytes(data)
    try:
        load_runs(path)
    except capacity.InputError:
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


VALUE = st.one_of(st.integers(-5, 10**7), st.floats(allow_nan=True), st.text(max_size=8), st.booleans(),
                  st.lists(st.one_of(st.integers(-3, 10**5), st.floats(), st.text(max_size=6)), max_size=3))


@FUZZ
@given(st.dictionaries(st.sampled_from(["sizes", "tokens_per_param", "seeds", "runs", "formats", "shapes", "train",
                                        "junk"]), VALUE, max_size=7),
       st.dictionaries(st.sampled_from(["lr", "batch_size", "context", "trust", "rbbm_p", "w_format", "rotate",
                                        "hadamard_block", "bogus"]), VALUE, max_size=3))
def test_fuzz_any_toml_as_a_sweep_file(tmp_path, top, train_table):
    from capscale.trainers.sweep import load_sweep
    tmp_path = Path(tempfile.mkdtemp(dir=tmp_path))

    def toml(v):
        if isinstance(v, float) and v != v:
            return "nan"
        if isinstance(v, float) and v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(toml(x) for x in v) + "]"
        return json.dumps(v)
    text = "".join(f"{k} = {toml(v)}\n" for k, v in top.items() if k != "train")
    text += 'formats = [{w = "int4"}]\n' if "formats" not in top else ""
    text += "[train]\n" + "".join(f"{k} = {toml(v)}\n" for k, v in train_table.items())
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    try:
        load_sweep(path)
    except capacity.InputError:
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.toml"]


BAD_COMMANDS = [
    ["gmse", "vq(bits=inf)"], ["gmse", "binary(cast=float64)"], ["gmse", "nf4(cast=x)"], ["gmse", "+".join(["int4"] * 400)],
    ["gmse", "int" + "9" * 5000], ["gmse", "int４"], ["gmse", "int4(group=32,group=64)"], ["gmse", "nf4(uniform=true)"],
    ["fit", "{table}", "--delta", "0"], ["fit", "{table}", "--delta", "nan"], ["fit", "{table}", "--bootstrap", "-5"],
    ["fit", "{table}", "--jobs", "-1"], ["fit", "{table}", "--fix-E", "100"], ["fit", "{dir}"], ["fit", "{empty}"],
    ["fit", "{garbage}"], ["predict", "int4", "--params", "-1", "--tokens", "1e6", "--runs", "{table}"],
    ["compose", "--capacity-grid", "{grid}", "--edge-row", "nonexistent"], ["train", "--lr", "nan"], ["train", "--lr", "-1"],
    ["train", "--lr", "0"], ["report", "{table}", "-o", "{table}"],
]


@pytest.mark.parametrize("argv", BAD_COMMANDS, ids=lambda a: " ".join(a)[:40])
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, capsys, argv):
    from capscale.cli import main
    table = tmp_path / "runs.csv"
    simulate_runs({"bf16": 1.0, "int4": 0.8}).to_csv(table, index=False)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "garbage.jsonl").write_bytes(bytes(range(256)))
    (tmp_path / "grid.csv").write_text("bits,a4,a16\n4,0.7,0.8\n16,0.9,1.0\n")
    names = {"table": table, "dir": tmp_path, "empty": tmp_path / "empty.jsonl", "garbage": tmp_path / "garbage.jsonl",
             "grid": tmp_path / "grid.csv"}
    argv = [a.format(**names) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own range errors
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err and "Traceback" not in "\n".join(err)
    assert "error" in err[-1]


def test_a_plugin_in_the_working_directory_loads_as_with_python_m(tmp_path):
    """The `capscale` console script has no working directory on its import path (unlike `python -m`): a
    --plugin beside the user still loads, and a missing one says where it was looked for."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text(
        "from capscale import capacity\n\nclass Halve(capacity.Component):\n"
        "    name, defaults = 'halve', {'factor': 0.5}\n    keeps_bits = True\n\n"
        "    def apply(self, x, keep, inner):\n        return inner(x * self.params['factor'], keep)\n")
    script = "import sys; from capscale.cli import main; sys.argv[0] = 'capscale'; sys.exit(main())"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args):  # -I -P: no working directory on sys.path, as a console script runs
        return subprocess.run([sys.executable, "-I", "-c", script, *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True)
    ok = run("--plugin", "mypkg", "gmse", "mypkg:Halve(factor=0.9)", "--samples", "4096", "--json")
    assert ok.returncode == 0, ok.stderr
    missing = run("--plugin", "capscale_no_such_plugin", "gmse", "int4")
    assert missing.returncode == 2 and str(tmp_path) in missing.stderr and "PYTHONPATH" in missing.stderr
