"""Safe to point at anyone's files (issue 17's reproducers): nothing capscale did not write is replaced, nothing a
file names is read, no input hangs or eats memory, no number is printed that a check would refuse. Each case
ends in exit 2 with one line (or a correct, flagged result) and leaves every file it was given byte-identical."""
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from capscale import capacity
from capscale.capacity import InputError
from capscale.analysis.fitfile import load_fit
from capscale.analysis.lawfit import fit
from capscale.analysis.report import markdown_text
from capscale.analysis.runs import load_runs
from capscale.analysis.simulate import simulate_runs
from capscale.capacity.paths import REPORT_MARKER, write_files
from capscale.capacity.runtable import read_records
from capscale.trainers.runlog import append_record, claim, process_start


def snapshot(root: Path) -> dict:
    """Every file under root (symlinks as their target path) and its content's hash."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(root))] = "-> " + os.readlink(path)
        elif path.is_file():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    """`capscale ARGV` in this process: (exit code, stderr lines that are not warnings)."""
    from capscale.cli import main
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's range errors
        code = exit_.code
    shown = [line.split("\r")[-1] for line in capsys.readouterr().err.split("\n")]  # what a terminal shows
    err = [line for line in shown  # argparse's usage lines aside
           if line.strip() and not line.startswith((" ", "usage:")) and "Warning" not in line]
    return code, err


def refused(capsys, *argv) -> str:
    code, err = run_cli(capsys, *argv)
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], (code, err)
    return err[0]


@pytest.fixture
def table(tmp_path) -> Path:
    path = tmp_path / "runs.csv"
    simulate_runs({"bf16": 1.0, "int4": 0.8, "int2": 0.4}, noise=0.003, seed=1).to_csv(path, index=False)
    return path


TINY = ["--params", "3000", "--tokens", "4000", "--batch-size", "4", "--context", "32", "--eval-tokens", "256",
        "--quiet"]


# -- never destroy or replace what capscale did not write ---------------------------------------------------------
@pytest.mark.parametrize("name,text", [("notes.txt", "my notes, no newline"), ("notes.jsonl", "my notes"),
                                       ("other.jsonl", '{"a": 1}\n'), ("table.csv", "format,params,tokens,loss\n")])
def test_train_refuses_a_runs_file_that_is_not_a_run_table(tmp_path, capsys, name, text):
    path = tmp_path / name
    path.write_text(text)
    before = snapshot(tmp_path)
    message = refused(capsys, "train", *TINY, "--output", path)
    assert snapshot(tmp_path) == before, message


def test_a_sweep_file_cannot_write_outside_its_folder(tmp_path, capsys):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "token.txt").write_text("secret")
    (tmp_path / "sweeps").mkdir()
    sweep = tmp_path / "sweeps" / "s.toml"
    sweep.write_text('runs = "../elsewhere/token.txt"\nsizes = [3000, 6000]\ntokens_per_param = [1, 2]\n'
                     'formats = [{w = "int4"}]\n')
    before = snapshot(tmp_path)
    assert "outside the sweep file's folder" in refused(capsys, "sweep", sweep)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["report", "demo"])
def test_report_and_demo_refuse_a_folder_holding_other_files(tmp_path, capsys, table, command):
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("report.html", "report.md", "results.json"):
        (out / name).write_text("the user's own")
    before = snapshot(tmp_path)
    argv = ["report", table] if command == "report" else ["demo"]
    assert "--overwrite" in refused(capsys, *argv, "-o", out, "--bootstrap", "0")
    assert "not a folder" in refused(capsys, *argv, "-o", out / "report.html", "--bootstrap", "0")
    assert "empty path" in refused(capsys, *argv, "-o", "", "--bootstrap", "0")
    assert snapshot(tmp_path) == before


def test_a_folder_that_refuses_writes_is_one_line_and_leaves_no_temporary_files(tmp_path, capsys, table,
                                                                              monkeypatch):
    """A read-only folder (simulated: root writes anywhere) refuses the renames into it: report and train say
    where, in one line, and nothing half-written is left behind."""
    out = tmp_path / "out"
    real_replace = os.replace

    def read_only(src, dst, *args, **kwargs):
        if Path(dst).parent in (out, tmp_path / "ro"):
            raise PermissionError(13, "Permission denied", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", read_only)
    assert "Permission denied" in refused(capsys, "report", table, "-o", out, "--bootstrap", "0", "--overwrite")
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    (tmp_path / "ro").mkdir()
    real_mkdir = os.mkdir

    def no_create(path, *args, **kwargs):  # the run's claim is the first thing it writes beside the table
        if Path(path).parent == tmp_path / "ro":
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", no_create)
    code, err = run_cli(capsys, "train", *TINY, "--output", tmp_path / "ro" / "runs.jsonl")
    assert code == 2 and err[-1].endswith("ro/runs.jsonl.claims: Permission denied")  # after the shape it chose
    assert list((tmp_path / "ro").iterdir()) == []


def test_report_files_are_written_whole_or_not_at_all_and_symlinks_are_replaced_not_followed(tmp_path):
    target = tmp_path / "elsewhere.json"
    target.write_text("the user's own")
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / REPORT_MARKER).write_text("")
    (folder / "results.json").symlink_to(target)
    (folder / "report.md").write_text("previous report")
    write_files(folder, {"results.json": b"{}", "report.md": b"new report"})
    assert target.read_text() == "the user's own" and not (folder / "results.json").is_symlink()
    assert (folder / "report.md").read_text() == "new report"
    (folder / "block").mkdir()  # a file that cannot be written: nothing is replaced
    with pytest.raises(OSError):
        write_files(folder, {"report.md": b"newer", "block": b"x"})
    assert (folder / "report.md").read_text() == "new report" and sorted(p.name for p in folder.iterdir()) == sorted(
        [REPORT_MARKER, "results.json", "report.md", "block"])


def test_fit_output_never_replaces_a_file_capscale_did_not_write(tmp_path, capsys, table):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    before = snapshot(tmp_path)
    assert "--overwrite" in refused(capsys, "fit", table, "--bootstrap", "0", "-o", notes)
    assert "is a folder" in refused(capsys, "fit", table, "--bootstrap", "0", "-o", tmp_path)
    assert snapshot(tmp_path) == before
    saved = tmp_path / "fit.json"
    assert run_cli(capsys, "fit", table, "--bootstrap", "0", "-o", saved)[0] == 0
    assert run_cli(capsys, "fit", table, "--bootstrap", "0", "-o", saved)[0] == 0  # its own file: replaced
    assert run_cli(capsys, "fit", table, "--bootstrap", "0", "-o", notes, "--overwrite")[0] == 0


# -- checkpoints are data, not instructions -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from capscale.trainers.compression_config import Compression
    from capscale.trainers.train import TrainConfig, train
    path = tmp_path_factory.mktemp("ck") / "int4.pt"
    train(TrainConfig(Compression("int4"), params=3000, tokens=4000, batch_size=4, context=32, eval_tokens=256,
                      checkpoint=str(path)), progress=False)
    return path


def _edited(checkpoint: Path, folder: Path, edit) -> Path:
    state = torch.load(checkpoint, weights_only=True)
    edit(state)
    path = folder / "edited.pt"
    torch.save(state, path)
    return path


def test_diagnose_never_reads_the_data_a_checkpoint_names(tmp_path, capsys, checkpoint, monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_text("the user's private text " * 100)
    secret.chmod(0o600)
    monkeypatch.setenv("CAPSCALE_CACHE", str(tmp_path / "cache"))
    path = _edited(checkpoint, tmp_path, lambda s: s["settings"].update(data=str(secret)))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some other text to record activations on. " * 200)
    code, err = run_cli(capsys, "diagnose", path, "--eval-tokens", "256", "--data", corpus)
    assert code == 0, err
    cached = [p.read_bytes() for p in (tmp_path / "cache").rglob("tokens-*")]
    assert cached and not any(b"private" in c for c in cached)
    assert all(p.stat().st_mode & 0o077 == 0 for p in (tmp_path / "cache").rglob("tokens-*"))


@pytest.mark.parametrize("edit,expected", [
    (lambda s: s["model_config"].update(n_embd=1 << 15, n_layer=1000), "model_config is not the model"),
    (lambda s: (s["settings"].update(params=10 ** 12), s["model_config"].update(n_layer=1)), "not"),
    (lambda s: s["settings"].update(context=1 << 30), "context"),
    (lambda s: s["settings"].update(w_format="5000000:10000000"), "N <= M <= 1024"),
    (lambda s: s["settings"].update(evil=1), "unknown training setting"),
    (lambda s: s.update(model_config=[1, 2]), "tables"),
    (lambda s: s["model_config"].update(vocab_size=True), "vocab_size"),  # found by the fuzz test below
])
def test_diagnose_checks_a_checkpoints_settings_like_the_command_line(tmp_path, capsys, checkpoint, edit, expected):
    path = _edited(checkpoint, tmp_path, edit)
    before, started = snapshot(tmp_path), time.perf_counter()
    assert expected in refused(capsys, "diagnose", path)
    assert time.perf_counter() - started < 10 and snapshot(tmp_path) == before


@pytest.mark.parametrize("edit", [lambda s: s.update(step=-1000), lambda s: s.update(step=10 ** 9),
                                  lambda s: s.update(step=2.5), lambda s: s.update(key="0123456789abcdef")],
                         ids=["negative step", "step past the run", "fractional step", "another run's key"])
def test_a_foreign_resume_checkpoint_is_moved_aside_and_the_run_trains_from_scratch(tmp_path, checkpoint, edit):
    from capscale.trainers.compression_config import Compression
    from capscale.trainers.train import TrainConfig, train
    path = _edited(checkpoint, tmp_path, edit)
    cfg = TrainConfig(Compression("int4"), params=3000, tokens=4000, batch_size=4, context=32, eval_tokens=256)
    fresh = train(cfg, progress=False)
    with pytest.warns(UserWarning, match="not a checkpoint of this run"):
        resumed = train(__import__("dataclasses").replace(cfg, checkpoint=str(path)), progress=False)
    assert resumed["status"] == "ok" and resumed["resumed_from_step"] == 0 and resumed["loss"] == fresh["loss"]
    assert list(tmp_path.glob("edited.pt.damaged-*"))


def test_an_int4_checkpoint_does_not_resume_an_int2_run(tmp_path, checkpoint):
    from capscale.trainers.compression_config import Compression
    from capscale.trainers.train import TrainConfig, train
    path = tmp_path / "ck.pt"
    path.write_bytes(checkpoint.read_bytes())
    cfg = TrainConfig(Compression("int2"), params=3000, tokens=4000, batch_size=4, context=32, eval_tokens=256)
    with pytest.warns(UserWarning, match="another run"):
        record = train(__import__("dataclasses").replace(cfg, checkpoint=str(path)), progress=False)
    assert record["resumed_from_step"] == 0 and record["loss"] == train(cfg, progress=False)["loss"]


def test_a_corrupt_checkpoint_never_suggests_unsafe_loading(tmp_path, capsys):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"PK\x03\x04 not a checkpoint")
    message = refused(capsys, "diagnose", path)
    assert "weights_only" not in message and "not a loadable capscale checkpoint" in message


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["settings", "model_config", "step", "key", "model", "optimizer", "generator", "extra"]),
       value=st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=20),
                       st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=8), st.integers(),
                                                                            max_size=3)),
       inner=st.sampled_from([None, "params", "context", "n_layer", "w_format", "vocab_size", "n_embd"]))
def test_fuzz_edited_checkpoints_load_or_are_refused_in_one_line(tmp_path, checkpoint, key, value, inner):
    from capscale.trainers.diagnose import load_checkpoint

    def edit(state):
        target = state.get(key) if inner and isinstance(state.get(key), dict) else None
        if target is not None:
            target[inner] = value
        else:
            state[key] = value
    folder = Path(__import__("tempfile").mkdtemp(dir=tmp_path))
    path = _edited(checkpoint, folder, edit)
    before = snapshot(folder)
    try:
        load_checkpoint(path)
    except capacity.InputError as err:
        assert "\n" not in str(err) and "weights_only" not in str(err)
    assert snapshot(folder) == before


# -- every input bounded before work starts -----------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["gmse", "5000000:10000000"], ["gmse", "vq(dim=3)"], ["gmse", "vq(dim=2,bits=6)"], ["gmse", "vq(dim=12,bits=1)"],
    ["gmse", "int4", "--row-length", str(1 << 40)], ["gmse", "int4", "--samples", str(1 << 40)],
    ["train", "--context", str(1 << 40)], ["fit", "{table}", "--bootstrap", str(10 ** 9)],
    ["fit", "{table}", "--jobs", "100000"], ["diagnose", "{table}", "--eval-tokens", str(1 << 40)],
], ids=lambda a: " ".join(a)[:40])
def test_extreme_inputs_are_refused_at_once(tmp_path, capsys, table, argv):
    started = time.perf_counter()
    refused(capsys, *[a.format(table=table) for a in argv])
    assert time.perf_counter() - started < 10


def test_a_huge_group_in_a_table_cell_does_not_hang_the_fit(tmp_path, capsys, table):
    frame = load_runs(table).reset_index(drop=True)[["format", "params", "tokens", "loss"]]
    frame.loc[frame["format"] == "int2", "format"] = "5000000:10000000"
    path = tmp_path / "huge.csv"
    frame.to_csv(path, index=False)
    started = time.perf_counter()
    assert run_cli(capsys, "fit", path, "--bootstrap", "0")[0] == 0  # a label the decoupled law needs no spec for
    assert time.perf_counter() - started < 10


# -- no number a check would refuse -------------------------------------------------------------------------------
def test_exact_gmse_of_a_rounded_scale_is_refused_and_compare_uses_monte_carlo(capsys):
    assert "Monte Carlo" in refused(capsys, "gmse", "int4(scale_format=e8m0)", "--exact")
    row = capacity.compare(["int4(scale_format=e8m0)"], samples=1 << 18).iloc[0]
    assert row["method"] == "monte-carlo" and row["gmse"] == pytest.approx(0.02085, rel=0.01)
    assert capacity.spec_gmse("int4(scale_format=e8m0)") == pytest.approx(0.02085, rel=0.01)


@pytest.mark.parametrize("change,expected", [
    (lambda f: f.assign(loss=3.0), "same loss"),
    (lambda f: f.head(4), "cannot identify"),
    (lambda f: f.assign(tokens=1e6), "one token budget"),
    (lambda f: f.assign(w_gmse=np.where(f["format"] == "int4", -0.1, np.nan)), "column 'w_gmse'"),
    (lambda f: f.assign(w_bits=np.where(f["format"] == "int4", 0, np.nan)), "column 'w_bits'"),
])
def test_degenerate_tables_are_refused(tmp_path, capsys, table, change, expected):
    import pandas as pd
    path = tmp_path / "changed.csv"
    change(pd.read_csv(table)).to_csv(path, index=False)
    assert expected in refused(capsys, "fit", path, "--bootstrap", "0")


def test_a_jsonl_line_of_nested_brackets_is_one_line(tmp_path, capsys):
    path = tmp_path / "deep.jsonl"
    path.write_text("[" * 100_000 + "\n")
    assert "nested too deeply" in refused(capsys, "fit", path)


@pytest.mark.parametrize("text,expected", [("w,int4,int8\n", "at least 2 rows"),
                                           ("w,int4,int4\nint4,0.5,0.6\nint8,0.7,0.8\n", "appears twice"),
                                           ("w,int4,int8\nint4,0.5,0.6\nint4,0.7,0.8\n", "appears twice")])
def test_a_malformed_capacity_grid_is_one_line(tmp_path, capsys, text, expected):
    grid = tmp_path / "grid.csv"
    grid.write_text(text)
    assert expected in refused(capsys, "compose", "--capacity-grid", grid)


# -- saved fits are verified ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fit")
    table = folder / "runs.csv"
    simulate_runs({"bf16": 1.0, "int4": 0.8, "int2": 0.4}, noise=0.003, seed=1).to_csv(table, index=False)
    path = folder / "fit.json"
    fit(load_runs(table), bootstrap=20, n_jobs=1, progress=False).save(path)
    return table, path


def _resign(content: dict) -> dict:
    from capscale.analysis.fitfile import _checksum
    content["checksum"] = _checksum(content)
    return content


def test_an_edited_saved_fit_is_refused_even_with_a_fresh_checksum(tmp_path, capsys, saved):
    table, path = saved
    content = json.loads(path.read_text())
    content["law"]["eff"]["int4"] = 0.999
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(content))
    assert "checksum" in refused(capsys, "validate", table, "--fit", edited)
    edited.write_text(json.dumps(_resign(content)))
    assert "not the values its constants give" in refused(capsys, "validate", table, "--fit", edited)


def test_a_saved_fit_refuses_options_it_cannot_honour_and_applies_the_level(capsys, saved):
    table, path = saved
    assert "--delta" in refused(capsys, "validate", table, "--fit", path, "--delta", "0.01")
    assert "--baseline" in refused(capsys, "validate", table, "--fit", path, "--baseline", "int4")
    runs = load_runs(table)
    from capscale.analysis.lawfit import LawFit
    wide, narrow = (LawFit.load(path, runs, level=lv).conf_int().loc["eff[int4]"] for lv in (0.95, 0.8))
    assert narrow["hi"] - narrow["lo"] < wide["hi"] - wide["lo"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from([(), ("law",), ("law", "params"), ("law", "eff"), ("law", "settings"), ("bootstrap",),
                              ("bootstrap", "samples")]),
       key=st.sampled_from(["A", "alpha", "int4", "eff[int4]", "delta", "baseline", "fix_E", "theta", "formats",
                            "n_failed", "level", "seed", "evil", "law", "bootstrap", "fingerprint", "capscale_fit"]),
       value=st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=12),
                       st.lists(st.floats(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)),
       resign=st.booleans(), drop=st.booleans())
def test_fuzz_saved_fit_files_load_or_are_refused_in_one_line(tmp_path, saved, where, key, value, resign, drop):
    table, path = saved
    content = json.loads(path.read_text())
    target = content
    for step in where:
        target = target[step] if isinstance(target, dict) and isinstance(target.get(step), dict) else target
    if drop:
        target.pop(key, None)
    else:
        target[key] = value
    folder = Path(__import__("tempfile").mkdtemp(dir=tmp_path))
    edited = folder / "fit.json"
    edited.write_text(json.dumps(_resign(content) if resign else content))
    before = snapshot(folder)
    try:
        law, _, _ = load_fit(edited, load_runs(table))
        assert law.eff_["bf16"] == 1.0
    except capacity.InputError as err:
        assert "\n" not in str(err)
    assert snapshot(folder) == before


# -- claims cannot strand a run -------------------------------------------------------------------------------------
def test_a_claim_whose_pid_now_belongs_to_another_process_is_taken_over(tmp_path):
    table = tmp_path / "runs.jsonl"
    folder = tmp_path / "runs.jsonl.claims"
    folder.mkdir()
    (folder / "abc.claim").write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": 1,
                                                  "start": "another boot:0", "time": time.time()}))
    taken = claim(table, "abc")
    assert taken is not None
    taken.release()


def test_damaged_claims_and_sweep_logs_are_moved_aside_not_tracebacks(tmp_path):
    table = tmp_path / "runs.jsonl"
    (tmp_path / "runs.jsonl.claims").write_text("a file where the claims folder goes")
    with pytest.warns(UserWarning, match="moved aside"):
        held = claim(table, "abc")
    assert held is not None
    held.release()
    (tmp_path / "runs.jsonl.claims" / "abc.claim").mkdir(parents=True)  # the release removed the empty folder
    old = time.time() - 3600
    os.utime(tmp_path / "runs.jsonl.claims" / "abc.claim", (old, old))
    with pytest.warns(UserWarning, match="folder"):
        held = claim(table, "abc")
    assert held is not None
    held.release()
    from capscale.trainers.sweep import Sweep, log_session
    (tmp_path / "runs.jsonl.meta.json").write_text("[[[garbage")
    with pytest.warns(UserWarning, match="moved aside"):
        log = log_session(Sweep(table, []), "capscale sweep", 0.0, 1.0, 0)
    assert json.loads(log.read_text())["sessions"][0]["runs_ran"] == 0


def test_a_sweep_waits_for_a_run_held_by_a_live_process_then_takes_it_over(tmp_path):
    from capscale.trainers.sweep import load_sweep, run_sweep
    sweep_file = tmp_path / "s.toml"
    sweep_file.write_text('sizes = [3000, 6000]\ntokens_per_param = [1]\nformats = [{w = "int4"}]\n'
                          '[train]\nbatch_size = 4\ncontext = 32\neval_tokens = 256\n')
    sweep = load_sweep(sweep_file)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(4)"])
    try:
        folder = tmp_path / "runs.jsonl.claims"
        folder.mkdir()
        key = sweep.configs[0].key()
        (folder / f"{key}.claim").write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": holder.pid,
                                                         "start": process_start(holder.pid), "time": time.time()}))
        assert run_sweep(sweep, progress=False, poll_s=0.5) == 2  # both trained here, the held one after its owner died
    finally:
        holder.kill()
    assert sorted(r["key"] for r in read_records(sweep.runs)) == sorted(c.key() for c in sweep.configs)


def test_a_claim_whose_owner_dies_while_the_sweep_trains_another_run_is_taken_over(tmp_path, monkeypatch):
    """The race of issue 35 (4 of 18 kill trials): the owner alive when its run was skipped, dead by the end of the
    pass. The survivor must take the run over, not end with it pending."""
    from capscale.trainers import sweep as sweep_module
    sweep_file = tmp_path / "s.toml"
    sweep_file.write_text('sizes = [3000, 6000]\ntokens_per_param = [1]\nformats = [{w = "int4"}]\n'
                          '[train]\nbatch_size = 4\ncontext = 32\neval_tokens = 256\n')
    sweep = sweep_module.load_sweep(sweep_file)
    held = max(sweep.configs, key=lambda c: c.params).key()  # the longest run: tried first, skipped
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    folder = tmp_path / "runs.jsonl.claims"
    folder.mkdir()
    (folder / f"{held}.claim").write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": holder.pid,
                                                      "start": process_start(holder.pid), "time": time.time()}))
    real = sweep_module.train_and_record

    def then_kill_the_owner(cfg, runs, progress):
        record = real(cfg, runs, progress=progress)
        if record is not None:  # the other run trained: its owner dies now, before the pass ends
            holder.kill()
            holder.wait()
        return record

    monkeypatch.setattr(sweep_module, "train_and_record", then_kill_the_owner)
    try:
        assert sweep_module.run_sweep(sweep, progress=False, poll_s=0.5) == 2
    finally:
        holder.kill()
    assert sorted(r["key"] for r in read_records(sweep.runs)) == sorted(c.key() for c in sweep.configs)


@pytest.mark.parametrize("step", ["folder made", "owner record written", "claim linked", "owner record removed"])
def test_an_owner_killed_at_any_step_of_claiming_leaves_a_claim_the_survivor_takes(tmp_path, step):
    """What a claimer killed after each step leaves behind (a reaped, dead pid): never a claim that blocks."""
    import socket
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = json.dumps({"host": socket.gethostname(), "pid": dead.pid, "start": "gone", "time": time.time()})
    folder = tmp_path / "runs.jsonl.claims"
    folder.mkdir()
    owner = folder / f".k.{socket.gethostname()}.{dead.pid}.tmp"
    if step != "folder made":
        owner.write_text(record)
    if step in ("claim linked", "owner record removed"):
        os.link(owner, folder / "k.claim")
    if step == "owner record removed":
        owner.unlink()
    held = claim(tmp_path / "runs.jsonl", "k")
    assert held is not None and json.loads((folder / "k.claim").read_text())["pid"] == os.getpid()
    held.release()


def test_a_torn_run_table_keeps_its_tail_beside_it(tmp_path):
    path = tmp_path / "runs.jsonl"
    append_record(path, {"format": "bf16", "params": 1, "tokens": 1, "loss": 3.0, "status": "ok"})
    with open(path, "a") as f:
        f.write('{"format": "int4", "params": 1')
    append_record(path, {"format": "int4", "params": 2, "tokens": 1, "loss": 3.0, "status": "ok"})
    assert len(read_records(path)) == 2 and (tmp_path / "runs.jsonl.torn").read_text().startswith('{"format": "int4"')


# -- report.md escapes labels as the HTML does ----------------------------------------------------------------------
def test_markdown_escapes_labels_like_the_html():
    text = markdown_text("<img src=x onerror=alert(1)> | [link](http://x)")
    assert "<img" not in text and "&lt;img" in text and "\\|" in text and "\\[link\\]" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "tpu"])
def test_a_device_this_machine_lacks_is_one_line_and_no_record(tmp_path, capsys, device):
    assert "--device" in refused(capsys, "train", "--device", device, *TINY, "--output", tmp_path / "runs.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_tables_refuse_sides_that_disagree_with_the_label_and_duplicate_json_keys(tmp_path):
    """A `forward` column that contradicts the label would decide silently which efficiency a run counts for."""
    from capscale.analysis.simulate import simulate_runs
    table = simulate_runs({"bf16": 1.0, "int4": 0.8}, noise=0.003)
    table["forward"] = table["format"].astype(object)
    table.loc[20, "forward"] = "bf16"
    with pytest.raises(InputError, match="row 21, column 'forward': 'bf16' disagrees with the label 'int4'"):
        load_runs(table, name="t")
    table["forward"] = table["format"].astype(object)
    table.loc[20, "forward"] = 4
    with pytest.raises(InputError, match="row 21, column 'forward': expected a format label"):
        load_runs(table, name="t")
    path = tmp_path / "dup.jsonl"
    path.write_text('{"format": "bf16", "params": 1e6, "tokens": 1e7, "loss": 3, "loss": 2}\n')
    with pytest.raises(InputError, match=r"line 1: duplicate key\(s\) \['loss'\]"):
        load_runs(path)


def test_compress_refuses_what_it_cannot_honour_and_shares_one_layer_under_every_name():
    import torch.nn as nn
    from capscale.trainers.compress import compress_

    class LoRA(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    hooked = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    hooked[0].register_forward_hook(lambda module, args, out: out)
    for model, why in ((nn.Sequential(LoRA(32, 32)), "with its own forward"), (hooked, "has hooks"),
                       (nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(32, 32))), "parametrizations"),
                       (nn.Linear(32, 32), "single linear layer"), (nn.Sequential(nn.LazyLinear(8)), "lazy")):
        with pytest.raises(InputError, match=why):
            compress_(model, "int4")
    shared = nn.Linear(32, 32)
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared))
    compress_(model, "int4")
    assert model[0][0] is model[1][0] and len(model.capscale_summary) == 1
    with pytest.raises(InputError, match="already compressed"):
        compress_(model, "int2")
    compress_(model, "int2", replace=True)
    assert model.capscale_summary[0].w_format == "int2"


def test_no_code_or_settings_from_the_working_directory(tmp_path, capscale_cli):
    """A *.dist-info with a capscale.formats entry point in the working directory is not an installed package; a
    matplotlibrc there does not set the report's dpi; after --plugin, the working directory leaves sys.path."""
    info = tmp_path / "evil-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[capscale.formats]\nevil = evilmod:register\n")
    (tmp_path / "evilmod.py").write_text("open('PWNED', 'w').write('x')\ndef register():\n    pass\n")
    out = capscale_cli("gmse", "no_such_format", cwd=tmp_path)
    assert out.returncode == 2 and not (tmp_path / "PWNED").exists()
    (tmp_path / "torch.py").write_text("open('PWNED', 'w').write('x')\n")  # `python -m` put the folder on sys.path
    out = capscale_cli("formats", cwd=tmp_path)
    assert out.returncode == 0 and not (tmp_path / "PWNED").exists(), out.stderr[-500:]
    (tmp_path / "torch.py").unlink()
    from capscale.capacity import spec
    before = list(sys.path)
    (tmp_path / "myplugin.py").write_text("X = 1\n")
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        spec.load_plugin("myplugin")
    finally:
        os.chdir(cwd)
    assert sys.path == before and "myplugin" in spec.loaded_plugins()
    (tmp_path / "matplotlibrc").write_text("figure.dpi: 30000\nsavefig.dpi: 30000\n")
    probe = ("import matplotlib; from capscale.analysis import plots; print(matplotlib.rcParams['figure.dpi'])")
    shown = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert shown.returncode == 0 and float(shown.stdout.strip()) < 1000, shown.stderr[-500:]


def test_malformed_sweep_files_and_stray_settings_are_refused_in_one_line(tmp_path, monkeypatch):
    from capscale.trainers.sweep import load_sweep
    (tmp_path / "utf16.toml").write_bytes('runs = "r.jsonl"\n'.encode("utf-16"))
    (tmp_path / "deep.toml").write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    os.mkfifo(tmp_path / "fifo.toml")
    (tmp_path / "zero.toml").symlink_to("/dev/zero")
    for name, why in (("utf16.toml", "not UTF-8"), ("deep.toml", "nested too deeply"),
                      ("fifo.toml", "not a regular file"), ("zero.toml", "not a regular file")):
        with pytest.raises(InputError, match=why):
            load_sweep(tmp_path / name)
    grid = "[" + ",".join(str(1000 + i) for i in range(1000)) + "]"
    (tmp_path / "huge.toml").write_text(f'sizes = {grid}\ntokens_per_param = {grid}\nformats = [{{w = "bf16"}}]\n')
    with pytest.raises(InputError, match="1,000,000 runs; a sweep file holds at most 100,000"):
        load_sweep(tmp_path / "huge.toml")
    from capscale.trainers.train import launch_world
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(InputError, match="not a torchrun launch"):
        launch_world()
    monkeypatch.delenv("WORLD_SIZE")
    from capscale.capacity.paths import cache_dir
    monkeypatch.setenv("CAPSCALE_CACHE", str(tmp_path / "utf16.toml"))
    with pytest.raises(InputError, match="CAPSCALE_CACHE .* not a folder"):
        cache_dir()


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_thread_count_no_machine_has_is_refused_before_torch_sees_it(tmp_path, capsys, command):
    """torch.set_num_threads(100000) is a segmentation fault, not an error."""
    target = [] if command == "train" else [tmp_path / "none.toml"]
    assert "in 1..1,024, got 100000" in refused(capsys, command, *target, "--threads", "100000")


def _safetensors(path: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("make,expected", [
    (lambda d: _safetensors(d / "w.safetensors", {"layer.weight": torch.zeros(0, 64)}), "no entries to measure"),
    (lambda d: _safetensors(d / "w.safetensors", {"layer.weight": torch.zeros(1, (1 << 20) + 1)}),
     "rows of 1,048,577 entries"),
    (lambda d: (os.mkfifo(d / "w.safetensors"), d)[1], "not a regular file"),
    (lambda d: (_safetensors(d / "model.safetensors", {"layer.weight": torch.randn(8, 64)}),
                (d / "config.json").write_text("[" * 100_000 + "]" * 100_000), d)[2], "not a readable config.json"),
    (lambda d: (_safetensors(d / "model.safetensors", {"layer.weight": torch.randn(8, 64)}),
                (d / "config.json").write_text(" " * (2 << 20) + "{}"), d)[2], "a config.json is at most"),
])
def test_diagnose_refuses_empty_over_wide_and_irregular_inputs_in_one_line(tmp_path, capsys, make, expected):
    """Each refused from the file's header or its type, before a tensor is read: no traceback, no hang."""
    target = make(tmp_path)
    before = snapshot(tmp_path)
    assert expected in refused(capsys, "diagnose", target, "--format", "int4")
    assert snapshot(tmp_path) == before


def test_diagnose_compresses_a_wide_weight_a_bounded_block_at_a_time(tmp_path, monkeypatch):
    """Memory stays a small multiple of one tensor: no block handed to a format holds more than BLOCK_ENTRIES
    entries (whole rows), however the rows are shaped."""
    from capscale.trainers import weights
    monkeypatch.setattr(weights, "BLOCK_ENTRIES", 4096)
    seen = []
    original = weights._row_blocks
    monkeypatch.setattr(weights, "_row_blocks", lambda w: (seen.append(b.numel()) or b for b in original(w)))
    path = _safetensors(tmp_path / "w.safetensors", {"a.weight": torch.randn(300, 512), "b.weight": torch.randn(2, 8192)})
    table = weights.diagnose_weights(path, ["int4"], samples=1 << 12, progress=False)
    assert set(table["layer"]) == {"a.weight", "b.weight"} and max(seen) == 8192 and seen.count(8192) >= 2
    assert all(n <= 4096 for n in seen if n != 8192)  # a row wider than a block is one block of its own
