"""Trainers: model sizing, compressed layers and estimators, data, training runs, checkpoints, sweeps,
distributed training."""
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.linalg import hadamard

from capscale import capacity
from capscale.capacity.runtable import REQUIRED, read_records
from capscale.capacity.structure import fwht
from capscale.trainers.data import load_tokens
from capscale.trainers.compression import Compression
from capscale.trainers.layers import CompressedLinear, backward_mask, default_trust
from capscale.trainers.model import Decoder, config_for_params, count_non_embedding
from capscale.trainers.sweep import load_sweep, run_sweep
from capscale.trainers.train import TrainConfig, train


@pytest.mark.parametrize("target", [6_250, 20_000, 100_000, 1_000_000, 30_000_000])
def test_size_helper_builds_close_to_target_and_reports_exact_count(target):
    cfg = config_for_params(target)
    model = Decoder(cfg)
    assert model.non_embedding_params() == count_non_embedding(cfg.n_layer, cfg.n_embd)
    assert abs(math.log(model.non_embedding_params() / target)) < 0.25
    assert cfg.n_embd % cfg.n_head == 0 and (cfg.n_embd // cfg.n_head) % 2 == 0


@pytest.mark.parametrize("w,a", [("int4", None), ("2:4+int4", "int8"), ("hadamard+mxfp4", "nvfp4"),
                                 ("vq(dim=2,bits=2)", None)])
def test_layer_forward_uses_exactly_the_gmse_format(w, a):
    """The same Format object that capacity.gmse measures is what the forward pass applies."""
    layer = CompressedLinear(64, 32, Compression(w, a))
    torch.nn.init.normal_(layer.weight)
    x = torch.randn(8, 64)
    fmt_w = capacity.parse(w)
    expected_x = capacity.parse(a)(x) if a else x
    torch.testing.assert_close(layer(x), F.linear(expected_x, fmt_w(layer.weight)))
    gen = torch.Generator().manual_seed(0)
    samples = [torch.randn(capacity.MEASURE_SHAPE, generator=gen) for _ in range(2)]  # what gmse draws for seed 0
    ours = np.mean([float(((fmt_w(s) - s) ** 2).mean()) for s in samples])
    assert ours == pytest.approx(capacity.gmse(w, samples=2 * samples[0].numel(), seed=0).gmse, rel=1e-12)


def test_estimators_mask_the_gradient_as_documented():
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 40.0  # far outside the grid: clipped
    fmt = capacity.parse("int4(scale=rms)")
    q = fmt(x)
    assert backward_mask(x, q, fmt, Compression("int4", estimator="ste")) is None
    trust = backward_mask(x, q, fmt, Compression("int4", estimator="trust"))
    clipped = backward_mask(x, q, fmt, Compression("int4", estimator="clipped"))
    assert not trust[0, 0] and not clipped[0, 0] and trust.float().mean() > 0.99
    assert default_trust("int4(scale=rms)") == pytest.approx(0.5 * 2.514 / 7.5, rel=0.02)  # half a step: outer level 7.5 steps


def test_sparse_backward_masks_and_rbbm():
    from scipy import stats
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    fmt = capacity.parse("sparse(0.5)")
    q = fmt(x)
    keep = q != 0
    masked = backward_mask(x, q, fmt, Compression("sparse(0.5)", estimator="ste", backward_mask="masked"))
    assert torch.equal(masked, keep)
    same = backward_mask(x, q, fmt, Compression("sparse(0.5)", estimator="ste", backward_mask="rbbm", rbbm_p=0.0))
    assert torch.equal(same, keep)  # p = 0: the plain masked gradient
    rbbm = backward_mask(x, q, fmt, Compression("sparse(0.5)", estimator="ste", backward_mask="rbbm", rbbm_p=0.1))
    t_p = x.pow(2).mean().sqrt() * float(stats.norm.ppf(0.6))
    assert torch.equal(rbbm[~keep], (x.abs() < t_p)[~keep])  # smallest pruned weights get gradient, the band not
    dense = backward_mask(x, q, fmt, Compression("sparse(0.5)", estimator="ste", backward_mask="dense"))
    assert dense is None


def test_gradients_flow_through_compressed_layers():
    layer = CompressedLinear(32, 16, Compression("hadamard+int4", "int4"))
    torch.nn.init.normal_(layer.weight)
    layer(torch.randn(4, 32)).square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_fast_hadamard_matches_the_matrix_and_is_its_own_inverse():
    x = torch.randn(5, 256)
    h = torch.tensor(hadamard(64), dtype=torch.float32) / 8.0
    torch.testing.assert_close(fwht(x, 64), (x.reshape(-1, 64) @ h).reshape(5, 256), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fwht(fwht(x, 64), 64), x, rtol=1e-5, atol=1e-5)


def test_corpus_split_is_deterministic_and_custom_text_works(tmp_path):
    a, b = load_tokens(), load_tokens()
    assert len(a.train) > 3_000_000 and np.array_equal(a.val[:1000], b.val[:1000])
    text = tmp_path / "tiny.txt"
    text.write_text("hello capacity " * 4000)
    custom = load_tokens(text)
    assert bytes(custom.train[:5]) == b"hello"


def test_tiny_w4a4_run_appends_a_valid_record(tmp_path, capscale_cli):
    runs = tmp_path / "runs.jsonl"
    out = capscale_cli("train", "--w-format", "int4", "--a-format", "int4", "--params", "20000", "--tokens", "200000",
                 "--runs", str(runs), "--quiet", timeout=120)
    assert out.returncode == 0, out.stderr
    (record,) = read_records(runs)
    assert set(REQUIRED) <= set(record) and record["status"] == "ok"
    assert record["format"] == "int4/int4" and record["loss"] < math.log(256)
    assert record["w_gmse"] == pytest.approx(0.01154, rel=1e-3) and record["tokens"] >= 200_000


def test_training_is_deterministic_and_divergence_is_recorded():
    cfg = TrainConfig(Compression("int8"), params=6000, tokens=40_000)
    assert train(cfg, progress=False)["loss"] == train(cfg, progress=False)["loss"]
    assert train(TrainConfig(params=6000, tokens=40_000, lr=1e4, grad_clip=1e9), progress=False)["status"] == "diverged"


def test_interrupted_run_resumes_from_checkpoint_to_the_same_result(tmp_path, monkeypatch):
    import capscale.trainers.train as T
    cfg = TrainConfig(Compression("int4"), params=6000, tokens=60_000, checkpoint=str(tmp_path / "ck.pt"),
                      checkpoint_every=5)
    reference = train(dataclasses.replace(cfg, checkpoint=None), progress=False)
    calls = {"n": 0}
    original = T.random_batch

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(T, "random_batch", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    monkeypatch.setattr(T, "random_batch", original)
    resumed = train(cfg, progress=False)
    assert resumed["resumed_from_step"] == 10 and resumed["loss"] == pytest.approx(reference["loss"], abs=1e-6)


SWEEP = """runs = "runs.jsonl"
sizes = [4000, 8000]
tokens_per_param = [6]
formats = [{{w = "bf16"}}, {{w = "int4"}}, {{w = "int2"}}]
{extra}
"""


def test_sweep_is_killed_midway_and_resumed_without_lost_or_duplicated_runs(tmp_path):
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(SWEEP.format(extra=""))
    cmd = [sys.executable, "-m", "capscale", "sweep", str(sweep_file), "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    runs = tmp_path / "runs.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and len(read_records(runs)) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(read_records(runs))
    assert 2 <= killed_at < 6
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    records = read_records(runs)
    assert len(records) == 6 and len({r["key"] for r in records}) == 6
    assert load_sweep(sweep_file).pending() == []
    meta = json.loads((tmp_path / "runs.jsonl.meta.json").read_text())
    assert meta["runs_in_table"] == 6 and meta["sessions"][-1]["command"].startswith("capscale sweep")


def test_sweep_shards_and_dry_run(tmp_path, capscale_cli):
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(SWEEP.format(extra="[train]\ncontext = 64"))
    parts = [load_sweep(sweep_file, f"{i}/2").configs for i in range(2)]
    assert len(parts[0]) + len(parts[1]) == 6 and not {c.key() for c in parts[0]} & {c.key() for c in parts[1]}
    out = capscale_cli("sweep", str(sweep_file), "--dry-run")
    assert "6 runs in the grid" in out.stdout and "estimated time" in out.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(SWEEP.format(extra="[train]\ncontxt = 64"))
    out = capscale_cli("sweep", str(bad))
    assert out.returncode == 2 and "contxt" in out.stderr


def test_distributed_two_processes_match_single_process(tmp_path, capscale_cli):
    common = ["--w-format", "int4", "--params", "6000", "--tokens", "60000", "--batch-size", "16", "--quiet"]
    single = capscale_cli("train", *common, timeout=120)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", "29517", "-m", "capscale", "train", *common],
                         capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0 and ddp.returncode == 0, ddp.stderr[-2000:]
    one = json.loads(single.stdout.strip().splitlines()[-1])
    two = json.loads([l for l in ddp.stdout.splitlines() if l.startswith("{")][-1])
    assert two["world_size"] == 2 and two["loss"] == pytest.approx(one["loss"], abs=2e-3)


@pytest.mark.slow
def test_tiny_sweep_orders_formats_and_fits(tmp_path):
    from analysis.laws import DecoupledLaw
    from analysis.runs import load_runs
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text('runs = "runs.jsonl"\nsizes = [6250, 12500, 25000]\ntokens_per_param = [20, 40]\n'
                          'formats = [{w = "bf16"}, {w = "int8"}, {w = "int4"}, {w = "int2"}]\n')
    run_sweep(load_sweep(sweep_file), progress=False)
    runs = load_runs(tmp_path / "runs.jsonl")
    table = runs.pivot_table(index=["params", "tokens"], columns="format", values="loss")
    assert (table["bf16"] <= table["int8"] + 0.01).all() and (table["int8"] < table["int4"]).all()
    assert (table["int4"] < table["int2"]).all()
    fit = DecoupledLaw().fit(runs)
    assert fit.eff_["int2"] < fit.eff_["int4"] < 1.05
