"""Training at the published scale: micro-batches that give the single pass's gradients, the memory plan against
what autograd saves, QuEST's model and schedule, FourEight and the fp4 trust radius as QuEST ran them, and
distributed training that cannot hang (reference section 5b; the QuEST transcriptions follow its public code,
src/models/quantization/base_linear.py)."""
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from capscale import capacity
from capscale.capacity.level_sets import quest_fp4_trust_as_run
from capscale.capacity.runtable import read_records
from capscale.trainers.compression_config import Compression
from capscale.trainers.config import TrainConfig
from capscale.trainers.layers import CompressedLinear, compress_with_mask, rotate
from capscale.trainers.memory import GIB, step_bytes
from capscale.trainers.compress import compressed_decoder
from capscale.trainers.model import Decoder, ModelConfig
from capscale.trainers.sweep import load_sweep, run_sweep
from capscale.trainers.train import _lr_at, _step, memory_plan, train, train_and_record

DATA = Path(__file__).resolve().parents[1] / "data"


def _grads_after(model, x, y, micro):
    model.zero_grad(set_to_none=True)
    loss = _step(model, None, x, y, micro, "cpu")
    return float(loss), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("w,a", [("int4", "int4"), ("4:8(vector=2)+int4", None), ("2:4", None)])
def test_accumulated_micro_batches_give_the_single_pass_gradients(w, a):
    """Per-row and per-token scales, and weight masks computed from the weights alone, make every micro-batch see
    the formats the whole batch sees: accumulation differs from one pass only by float rounding."""
    model = compressed_decoder(ModelConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=256, context=32), Compression(w, a))
    window = torch.randint(0, 256, (12, 33), generator=torch.Generator().manual_seed(0))
    x, y = window[:, :-1], window[:, 1:]
    loss_one, one = _grads_after(model, x, y, 12)
    for micro in (4, 5, 1):  # 5: an uneven last micro-batch is weighted by its size
        loss_acc, acc = _grads_after(model, x, y, micro)
        assert loss_acc == pytest.approx(loss_one, abs=1e-6)
        for g1, g2 in zip(one, acc):
            assert (g1 - g2).abs().max() <= 1e-6 * max(1.0, float(g1.abs().max()))


@pytest.mark.parametrize("w,a,tolerance", [("bf16", None, 1e-6), ("int4", "int4", 1e-3)])
def test_a_short_run_with_micro_batches_matches_one_pass(w, a, tolerance):
    """Over 20 steps: without formats the losses agree to float rounding (measured 1.2e-7); through W4A4 grids
    that rounding moves a few values across a grid boundary (measured 2.1e-4, a fiftieth of the seed scatter)."""
    cfg = TrainConfig(Compression(w, a), params=6000, tokens=40_000, batch_size=16)
    one = train(cfg, progress=False)
    accumulated = train(dataclasses.replace(cfg, micro_batch_size=5), progress=False)
    assert one["micro_batch_size"] == 16 and accumulated["micro_batch_size"] == 5
    assert accumulated["loss"] == pytest.approx(one["loss"], abs=tolerance)
    assert accumulated["key"] == one["key"]  # how a step is split does not change what the run is


def _saved_bytes(model, x, y, autocast):
    """Bytes of the distinct storages autograd saves for backward in one forward pass (weights and buffers apart)."""
    resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in resident:
            seen[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(x, y)
    return sum(seen.values())


@pytest.mark.parametrize("cfg", [ModelConfig(n_layer=2, n_head=4, n_embd=128, vocab_size=256, context=64),
                                 ModelConfig.quest(n_layer=2, n_head=2, n_embd=256, vocab_size=512, context=128)],
                         ids=["capscale", "quest"])
@pytest.mark.parametrize("w,a", [("bf16", None), ("int4", "int4"), ("4:8(vector=2)+int4", "int4"), ("2:4", "int4")])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_the_memory_plan_counts_what_autograd_saves(cfg, w, a, autocast):
    """The plan's per-token and per-pass terms against the storages torch saves for backward (bf16 autocast on
    CPU stands in for the CUDA plan): equal to the byte, less the weights' quantization work space."""
    comp = Compression(w, a)
    model = compressed_decoder(cfg, comp)
    window = torch.randint(0, cfg.vocab_size, (3, cfg.context + 1))
    terms = step_bytes(cfg, comp, autocast=autocast)
    work = max((16 * layer.weight.numel() for layer in model.modules()
                if isinstance(layer, CompressedLinear) and (comp.w_fmt is not None or layer.hadamard_block)), default=0)
    planned = terms["per_pass"] - work + terms["per_token"] * 3 * cfg.context
    assert planned == pytest.approx(_saved_bytes(model, window[:, :-1], window[:, 1:], autocast), rel=1e-4)
    n = sum(p.numel() for p in model.parameters())
    assert terms["resident"] == 16 * n + sum(b.numel() * 4 for b in model.buffers())  # weights, grads, AdamW


def test_the_gpu_study_plans_every_run_within_an_80_gb_device():
    sweep = load_sweep(DATA / "gpu_study.toml")
    assert len(sweep.configs) == 4 * 3 * 13
    for cfg in sweep.configs:
        plan = memory_plan(dataclasses.replace(cfg, memory=80.0))
        assert plan.fits and plan.peak < 80 * GIB and plan.micro_batch_size * plan.accumulation_steps == 512
        assert cfg.resolved_batch_size() * cfg.context == 262_144
    largest = memory_plan(dataclasses.replace(sweep.configs[-1], memory=80.0))
    assert largest.accumulation_steps > 1  # the published batch does not fit one pass at 200M


def test_a_run_that_cannot_fit_is_refused_before_it_starts(tmp_path):
    cfg = TrainConfig(Compression("int4", "int4"), params=6000, tokens=20_000, memory=0.001)
    runs = tmp_path / "runs.jsonl"
    with pytest.raises(capacity.InputError, match="does not fit"):
        train_and_record(cfg, runs, progress=False)
    assert read_records(runs) == []  # not recorded as failed, so no sweep retries it
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text('runs = "runs.jsonl"\nsizes = [6000]\ntokens_per_param = [3]\n'
                          'formats = [{w = "int4", a = "int4"}]\n[train]\nmemory = 0.001\n')
    assert run_sweep(load_sweep(sweep_file), progress=False) == 0 and read_records(runs) == []
    roomy = memory_plan(dataclasses.replace(cfg, memory=1.0))
    assert roomy.micro_batch_size == 16  # the whole batch in one pass where it fits
    tight = dataclasses.replace(cfg, memory=(roomy.resident + roomy.per_pass + 5 * roomy.per_sequence) / 0.9 / GIB)
    assert memory_plan(tight).micro_batch_size == 4  # the largest divisor of 16 that fits 5 sequences
    with pytest.raises(capacity.InputError, match="does not fit"):
        memory_plan(dataclasses.replace(tight, micro_batch_size=8))  # an explicit micro-batch is checked too


def quest_foureight(x: torch.Tensor, bits: int = 4):
    """QuEST's HalfHadamardFourEightTrustQuantizer on an already rotated weight, transcribed (float64)."""
    c_b = {4: 2.5139305786}[bits]
    n_levels = 2 ** bits
    trust = c_b / (n_levels - 1)
    std = torch.sqrt(torch.mean(x ** 2, dim=-1, keepdim=True)) + 1e-8
    scale = c_b * std
    step = 2 * scale / (n_levels - 1)
    xq = torch.round(torch.clamp(x, -scale, scale) / step + 1 / 2) * step - step / 2
    _, idx = x.reshape(-1, 4, 2).norm(p=2, dim=-1).topk(k=2, dim=-1, largest=False)
    xq = xq.reshape(-1, 4, 2)
    xq[torch.arange(xq.size(0)).repeat(2, 1).T, idx] = 0.0
    xq = xq.reshape(x.shape)
    return xq, torch.abs(xq - x) <= std * trust


def test_foureight_matches_quests_half_hadamard_quantizer():
    gen = torch.Generator().manual_seed(3)
    scales = torch.logspace(-1, 1, 16, dtype=torch.float64)[:, None]  # rows 100x apart
    weight = torch.randn(16, 256, generator=gen, dtype=torch.float64) * scales
    comp = Compression("4:8(vector=2)+int4", "int4")
    layer = CompressedLinear(256, 16, comp)
    assert layer.hadamard_block == 128 and comp.w_format == "4:8(vector=2)+int4(scale_from=row)"
    rotated = rotate(weight.float(), layer.hadamard)
    q, mask = compress_with_mask(rotated, comp.w_fmt, comp)
    ref_q, ref_mask = quest_foureight(rotated.double())
    rms = rotated.double().pow(2).mean(-1, keepdim=True).sqrt()
    assert ((q.double() - ref_q).abs() / rms).max() < 1e-6
    assert torch.equal(mask, ref_mask)
    pruned = ref_q == 0
    assert mask[pruned].any() and not mask[pruned].all()  # small pruned entries get gradient, large ones do not
    assert (rotated.abs()[pruned & mask] <= 2.5139305786 / 15 * rms.expand_as(rotated)[pruned & mask] + 1e-6).all()

    # The weight gradient: the mask in the rotated domain, rotated back (dL/dW = (mask * dL/dQ(W H)) H^T).
    layer.weight.data = weight.float()
    x = torch.randn(5, 256, generator=gen)
    grad_y = torch.randn(5, 16, generator=gen)
    layer(x).backward(grad_y)
    xq = comp.a_fmt(rotate(x, layer.hadamard))
    expected = rotate((grad_y.T @ xq) * mask, layer.hadamard.T)  # block-diagonal H^T
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-4, atol=1e-5)

    # capscale 0.2's scheme stays, by name: unrotated, scaled from the kept values, no gradient to pruned entries.
    old = Compression("4:8(vector=2)+int4", "int4", sparse_quantized="unrotated")
    assert old.rotation_block == 0 and old.w_format == "4:8(vector=2)+int4"
    q_old, mask_old = compress_with_mask(weight.float(), old.w_fmt, old)
    assert not mask_old[q_old == 0].any()


def quest_lloyd_levels(n_levels=16):
    """QuEST's GaussianSTEQuantizer._compute_gaussian_levels, transcribed: 20 Lloyd iterations by quadrature."""
    levels = np.linspace(-3, 3, n_levels)
    boundaries = np.zeros(n_levels + 1)
    for _ in range(20):
        boundaries[1:-1] = (levels[1:] + levels[:-1]) / 2
        boundaries[0], boundaries[-1] = -np.inf, np.inf
        new = []
        for i in range(n_levels):
            num = integrate.quad(lambda v: v * stats.norm.pdf(v), boundaries[i], boundaries[i + 1])[0]
            den = integrate.quad(stats.norm.pdf, boundaries[i], boundaries[i + 1])[0]
            new.append(num / den if den > 1e-10 else levels[i])
        levels = np.array(new)
    return levels


def test_fp4_trust_as_run_is_the_radius_quests_code_used():
    levels = quest_lloyd_levels()
    assert quest_fp4_trust_as_run() == pytest.approx((levels[-1] - levels[-2]) / 2, abs=1e-8)
    assert quest_fp4_trust_as_run() == pytest.approx(0.3186, abs=5e-5)
    assert levels[-1] == pytest.approx(2.970, abs=1e-3)  # short of the converged 2.733 (reference section 5b)
    v = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * torch.logspace(-1, 1, 64)[:, None]
    fmt = capacity.parse("fp4_e2m1")
    rms = v.pow(2).mean(-1, keepdim=True).sqrt()
    q, as_run = compress_with_mask(v, fmt, Compression("fp4_e2m1", fp4_trust="as-run"))
    _, intended = compress_with_mask(v, fmt, Compression("fp4_e2m1"))
    assert torch.equal(as_run, (q - v).abs() <= 0.3185766 * rms)
    assert torch.equal(intended, (q - v).abs() <= 0.48707976 * rms)
    assert as_run.float().mean() < intended.float().mean() and (as_run <= intended).all()
    assert Compression("fp4_e2m1", fp4_trust="as-run").key_settings() != Compression("fp4_e2m1").key_settings()


def test_quests_model_init_decay_and_width():
    cfg = ModelConfig.quest(n_layer=6, n_head=5, n_embd=640, vocab_size=1024, context=64)
    assert cfg.mlp_hidden == 1792 and ModelConfig.quest(n_layer=10, n_head=10, n_embd=1280).mlp_hidden == 3584
    torch.manual_seed(0)
    model = Decoder(cfg)
    assert model.head.weight is not model.embed.weight and model.blocks[0].attn_norm.eps == 1e-5
    residual = torch.cat([w.detach().flatten() for b in model.blocks for w in (b.attn.proj.weight, b.mlp.down.weight)])
    other = torch.cat([w.detach().flatten() for b in model.blocks for w in (b.attn.qkv.weight, b.mlp.gate_up.weight)])
    assert float(residual.std()) == pytest.approx(0.02 / math.sqrt(2 * 6), rel=0.01)
    assert float(other.std()) == pytest.approx(0.02, rel=0.01)
    assert float(model.embed.weight.detach().std()) == pytest.approx(0.02, rel=0.01)
    assert float(model.head.weight.detach().std()) == pytest.approx(0.02, rel=0.01)
    decayed, kept = model.decayed_parameters("linear")
    assert {id(p) for p in decayed} == {id(m.weight) for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)}
    assert any(p is model.embed.weight for p in kept) and any(p is model.head.weight for p in kept)
    default_decayed, _ = Decoder(ModelConfig()).decayed_parameters("matrices")
    assert len(default_decayed) == 1 + 4 * 2  # capscale's default: the tied embedding and every block matrix


def test_an_untied_quest_model_trains_and_its_record_says_so():
    cfg = TrainConfig(Compression("int4", "int4"), params=13_000, tokens=60_000, tie_embeddings=False,
                      init="quest", norm_eps=1e-5, mlp_multiple=64, decay="linear", schedule="onecycle", lr=3e-3)
    checkpoint = Path(tempfile.mkdtemp()) / "untied.pt"
    record = train(dataclasses.replace(cfg, checkpoint=str(checkpoint)), progress=False)
    # 0.02 init starts tiny models near the unigram plateau (capscale's fan-in default avoids it): 5.55 -> 4.51 here
    assert record["status"] == "ok" and record["loss"] < math.log(256) - 0.8
    state = torch.load(checkpoint, weights_only=True)["model"]
    assert "head.weight" in state and not torch.equal(state["head.weight"], state["embed.weight"])
    assert float(state["head.weight"].std()) != pytest.approx(0.02, rel=1e-3)  # the head moved from its init
    assert (record["tie_embeddings"], record["init"], record["decay"], record["schedule"]) == \
        (False, "quest", "linear", "onecycle")
    assert record["mlp_hidden"] % 64 == 0 and record["key"] != dataclasses.replace(cfg, init="fan_in").key()


def test_onecycle_is_torchs_schedule_as_quest_configures_it():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1e-3)
    total = 300
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=total, pct_start=0.1,
                                                    anneal_strategy="cos", cycle_momentum=False, div_factor=1e2,
                                                    final_div_factor=0.1)
    for step in range(total):
        assert _lr_at(step, total, 1e-3, 0.1, "onecycle") == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        scheduler.step()
    for short in (1, 2, 10):  # too short for a warm-up step: from the peak down to 10%, no division by zero
        rates = [_lr_at(step, short, 1e-3, 0.1, "onecycle") for step in range(short)]
        assert rates[0] == pytest.approx(1e-3) and all(1e-4 - 1e-12 <= r <= 1e-3 for r in rates)


NAN_ON_RANK_1 = """
import os, sys, torch
from capscale.trainers import model, train
from capscale.trainers.config import TrainConfig
from capscale.trainers.compression_config import Compression
forward = model.Decoder.forward
calls = {"n": 0}
def poisoned(self, idx, targets=None):
    loss = forward(self, idx, targets)
    calls["n"] += 1
    if os.environ["RANK"] == "1" and calls["n"] >= 3:  # this rank's third step goes non-finite
        loss = loss * float("nan")
    return loss
model.Decoder.forward = poisoned
cfg = TrainConfig(Compression("int4", "int4"), params=6000, tokens=400_000, batch_size=16)
train.train_and_record(cfg, sys.argv[1], progress=False)
print("rank", os.environ["RANK"], "finished after", calls["n"], "forward passes")
"""


def _free_port() -> str:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.slow
def test_a_nan_on_one_rank_ends_every_rank_with_a_diverged_record(tmp_path):
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(textwrap.dedent(NAN_ON_RANK_1))
    runs = tmp_path / "runs.jsonl"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          _free_port(), str(script), str(runs)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rank 0 finished after 3" in out.stdout and "rank 1 finished after 3" in out.stdout
    (record,) = read_records(runs)
    assert record["status"] == "diverged" and record["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("formats,tolerance", [(["--w-format", "bf16"], 1e-5),
                                               (["--w-format", "int4", "--a-format", "int4"], 2e-3),
                                               (["--w-format", "2:4+int4", "--a-format", "int8"], 2e-3)])
def test_torchrun_with_micro_batches_trains_the_same_recipe(tmp_path, formats, tolerance):
    """2 processes x micro-batches of 3 (uneven: 3 + 3 + 2 a rank) against 1 process in one pass. Per-row and
    per-token scales make each rank's share see the formats the whole batch sees; without formats only the order
    of float reductions differs, and through W4A4 grids that moves a few values across boundaries (measured
    7.7e-4 over 30 steps, the same with and without micro-batches, and at capscale 0.2)."""
    common = ["train", *formats, "--params", "6000", "--tokens", "60000", "--batch-size", "16", "--quiet"]
    single = subprocess.run([sys.executable, "-m", "capscale", *common], capture_output=True, text=True, timeout=300)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          _free_port(), "-m", "capscale", *common, "--micro-batch-size", "3"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0 and ddp.returncode == 0, ddp.stderr[-2000:]
    one = json.loads(single.stdout.strip().splitlines()[-1])
    two = json.loads([line for line in ddp.stdout.splitlines() if line.startswith("{")][-1])
    assert two["world_size"] == 2 and two["micro_batch_size"] == 3
    assert two["loss"] == pytest.approx(one["loss"], abs=tolerance)
