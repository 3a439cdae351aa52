"""Untrusted input: run tables, specs, queries, sweep files and checkpoints run no code; accidents (torn lines,
retries, concurrent sweeps, re-runs) never corrupt a table; bad input is one clear line and exit 2."""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from capscale import capacity
from capscale.analysis.runs import load_runs
from capscale.analysis.simulate import simulate_runs
from capscale.capacity.runtable import append_record, claim, read_lines, read_records

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


@pytest.mark.parametrize("cell", ["os:system(touch PWNED)", "builtins:print(PWNED)", "subprocess:run(touch PWNED)",
                                  "capscale.capacity.formats:Component"])
@pytest.mark.parametrize("command", ["fit", "validate", "compose"])
def test_a_table_cell_naming_code_is_refused_and_runs_nothing(tmp_path, capscale_cli, cell, command):
    path = _table(tmp_path, cell)
    out = capscale_cli(command, str(path), "--bootstrap", "0", cwd=tmp_path)
    if command == "fit":  # the decoupled law needs no spec: the label fits as a label, and nothing is imported
        assert out.returncode in (0, 2), out.stderr
    else:
        assert out.returncode == 2 and "plugin" in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.csv"]


def test_a_spec_resolves_module_classes_only_in_loaded_plugins(tmp_path, capscale_cli):
    plugin = tmp_path / "myformats.py"
    plugin.write_text("from capscale import capacity\n\nclass Halve(capacity.Component):\n"
                      "    name, defaults = 'halve', {'factor': 0.5}\n\n"
                      "    def apply(self, x, keep, inner):\n        return inner(x * self.params['factor'], keep)\n\n"
                      "def not_a_component():\n    open('PWNED', 'w').write('x')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    refused = capscale_cli("gmse", "myformats:Halve", "--samples", "4096", cwd=tmp_path, env=env)
    assert refused.returncode == 2 and "not a loaded plugin" in refused.stderr
    ok = capscale_cli("--plugin", "myformats", "gmse", "myformats:Halve(factor=0.9)", "--samples", "4096", "--json",
                      cwd=tmp_path, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)[0]["gmse"] == pytest.approx(0.01, rel=0.05)
    call = capscale_cli("--plugin", "myformats", "gmse", "myformats:not_a_component", cwd=tmp_path, env=env)
    assert call.returncode == 2 and "not a Component subclass" in call.stderr and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("query", ["@pd.io.common.os.system('touch PWNED')", "__import__('os').system('touch PWNED')",
                                   "params.__class__", "loss > 1 and exec('1')", "(params + 1) > 2", "lambda: 1"])
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


def test_a_torn_last_line_is_skipped_on_read_and_cut_before_the_next_append(tmp_path):
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
    (tmp_path / "middle.jsonl").write_text('{"a": 1}\n[1, 2, 3]\n{"b": 2}\n')
    with pytest.raises(capacity.InputError, match="line 2: expected a JSON object"):
        read_lines(tmp_path / "middle.jsonl")


def test_a_retried_failure_keeps_every_record_and_the_table_still_fits(tmp_path):
    frame = simulate_runs({"bf16": 1.0, "int4": 0.8}).assign(status="ok")
    failed = frame.iloc[[0]].assign(status="failed", loss=float("nan"))
    runs = load_runs(__import__("pandas").concat([frame, failed, failed]))
    assert len(runs) == len(frame)


def test_claims_are_exclusive_and_a_dead_claimant_is_taken_over(tmp_path):
    table = tmp_path / "runs.jsonl"
    first = claim(table, "abc")
    assert first is not None and claim(table, "abc") is None
    first.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "runs.jsonl.claims" / "abc.claim").write_text(
        json.dumps({"host": __import__("socket").gethostname(), "pid": int(dead.stdout), "time": 0}))
    taken = claim(table, "abc")
    assert taken is not None
    taken.release()


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
    args = ["train", "--w-format", "int4", "--params", "3000", "--tokens", "8000", "--batch-size", "4",
            "--context", "32", "--runs", str(tmp_path / "r.jsonl"), "--checkpoint", str(tmp_path / "ck.pt"), "--quiet"]
    first = capscale_cli(*args)
    assert first.returncode == 0, first.stderr
    again = capscale_cli(*args)
    assert again.returncode == 0 and "already finished" in again.stderr
    assert len(read_records(tmp_path / "r.jsonl")) == 1
