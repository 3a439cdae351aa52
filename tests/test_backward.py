"""Formats in the backward pass: quantized gradient products in the layer, their run records, and the law with a
data efficiency per backward configuration (effD) beside the parameter efficiency per forward pair (effN)."""
import dataclasses
import json
import warnings

import pytest
import torch

import capscale
from capscale.analysis.runs import load_runs
from capscale.analysis.simulate import simulate_runs
from capscale.capacity.runtable import RunTableError, run_label, split_run_label
from capscale.trainers.compression_config import Compression
from capscale.trainers.config import TrainConfig
from capscale.trainers.layers import CompressedLinear, _backward_product
from capscale.trainers.train import train

SR8 = "int8(scale=absmax,rounding=stochastic)"


def _grads(layer, x0):
    x = x0.clone().requires_grad_(True)
    layer.weight.grad = None
    layer(x).pow(2).sum().backward()
    return x.grad.clone(), layer.weight.grad.clone()


def test_without_backward_formats_the_gradients_are_exactly_todays():
    comp = Compression("int4", "int4", g_format="bf16")  # an uncompressed name means none
    assert comp.bwd_fmts is None and comp.label == "int4/int4"
    a, b = torch.randn(32, 64), torch.randn(16, 64)
    assert torch.equal(_backward_product(a, b, None, None, 0), a @ b.t())
    torch.manual_seed(0)
    layer = CompressedLinear(64, 32, Compression("int4", "int4"))
    x0 = torch.randn(2, 8, 64)
    today = _grads(layer, x0)
    layer.comp = comp
    assert all(torch.equal(t, u) for t, u in zip(today, _grads(layer, x0)))
    # and the backward path itself, with exact (identity) operand formats, gives the same gradients
    layer.comp = dataclasses.replace(comp, g_format="fp32")
    assert layer.comp.bwd_fmts is None  # fp32 is uncompressed too: the formats path is never entered for it
    fmts = (capscale.capacity.parse("fp32"),) * 4  # dL/dY and W in dgrad, dL/dY and X in wgrad
    object.__setattr__(layer.comp, "bwd_fmts", fmts)
    assert all(torch.allclose(t, u, atol=1e-5) for t, u in zip(today, _grads(layer, x0)))


@pytest.mark.parametrize("recipe", ["nvidia-nvfp4", "quartet2"])
def test_backward_formats_run_under_bf16_autocast_and_return_each_inputs_dtype(recipe):
    """On CUDA training runs under bf16 autocast: dL/dY arrives in bf16 beside a float32 weight (a mixed product
    once failed there); CPU autocast takes the same path."""
    layer = CompressedLinear(128, 128, Compression(recipe=recipe))  # every contraction a multiple of 128
    x = torch.randn(128, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().pow(2).sum().backward()
    assert x.grad.dtype == x.dtype and layer.weight.grad.dtype == layer.weight.dtype
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()


def test_stochastic_backward_formats_give_unbiased_gradients_and_nearest_ones_do_not():
    torch.manual_seed(0)
    base = Compression("int4", "int4")
    layer = CompressedLinear(64, 32, base)
    x0 = torch.randn(4, 16, 64)
    exact = _grads(layer, x0)
    for spec, unbiased in ((SR8, True), ("int4(scale=absmax,rounding=stochastic)", True), ("int4(scale=absmax)", False)):
        layer.comp = dataclasses.replace(base, g_format=spec, gw_format=spec, gx_format=spec, bwd_hadamard_block=16)
        one = _grads(layer, x0)
        mean = [sum(t) / 200 for t in zip(*(_grads(layer, x0) for _ in range(200)))]
        for e, o, m in zip(exact, one, mean):
            single, averaged = float((o - e).norm() / e.norm()), float((m - e).norm() / e.norm())
            assert single > 1e-4  # the format acts
            if unbiased:
                assert averaged < 2.5 * single / 200 ** 0.5  # errors average out like independent noise
            else:
                assert averaged > 0.7 * single  # a biased format's error stays


def test_backward_rotation_cancels_in_the_product():
    a, b = torch.randn(32, 64), torch.randn(16, 64)
    fmt = capscale.capacity.parse("int8")
    for block in (0, 16, 64):
        assert torch.allclose(_backward_product(a, b, fmt, None, block), a @ b.t(), rtol=0.05, atol=0.2)
    identity = capscale.capacity.parse("fp32")  # an uncompressed name with a format object: rotation alone
    assert torch.allclose(_backward_product(a, b, identity, identity, 16), a @ b.t(), atol=1e-4)


def test_run_record_names_every_format_and_a_w4a4_int8_backward_run_trains():
    comp = Compression("int4", "int4", g_format="int8", gw_format="int8", gx_format="int8")
    assert comp.label == "int4/int4 | bwd int8" and split_run_label(comp.label) == ("int4/int4", "int8")
    assert run_label("int4", None, "int8", None, SR8) == f"int4 | bwd g=int8,gx={SR8}"
    cfg = TrainConfig(comp, params=6000, tokens=40_000)
    record = train(cfg, progress=False)
    exact = train(TrainConfig(Compression("int4", "int4"), params=6000, tokens=40_000), progress=False)
    assert record["status"] == "ok" and record["loss"] < 5.0  # well below ln 256 = 5.55, the untrained loss
    assert record["loss"] == pytest.approx(exact["loss"], rel=0.05)
    assert record["forward"] == "int4/int4" and record["backward"] == "int8"
    assert {record[k] for k in ("g_format", "gw_format", "gx_format")} == {"int8"}
    assert cfg.key() != TrainConfig(Compression("int4", "int4"), params=6000, tokens=40_000).key()
    plain = TrainConfig(Compression("int4", "int4"), params=6000, tokens=40_000)
    assert "g_format" not in plain.compression.key_settings()  # runs recorded before keep their keys


TRUE_N = {"bf16": 1.0, "int4": 0.8, "int4/int4": 0.55}
TRUE_D = {"none": 1.0, "int8": 0.85, "mxfp4": 0.5}
SPECS = {"int4": ("int4", None), "int4/int4": ("int4", "int4")}


@pytest.fixture(scope="module")
def crossed():
    runs = load_runs(simulate_runs(TRUE_N, specs=SPECS, eff_d=TRUE_D, noise=0.004, seed=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return capscale.fit(runs, bootstrap=60, progress=False, n_jobs=1)


def test_the_law_recovers_effn_and_effd_within_their_intervals(crossed):
    law, ci = crossed.law, crossed.conf_int()
    assert set(law.eff_) == set(TRUE_N) and set(law.eff_d_) == set(TRUE_D)  # effN per forward pair only
    for label, truth in TRUE_N.items():
        if label != "bf16":
            assert ci.loc[f"eff[{label}]", "lo"] <= truth <= ci.loc[f"eff[{label}]", "hi"]
    for label, truth in TRUE_D.items():
        if label != "none":
            assert ci.loc[f"effD[{label}]", "lo"] <= truth <= ci.loc[f"effD[{label}]", "hi"]
    predicted = crossed.predict(crossed.runs)
    assert abs(predicted / crossed.runs["loss"] - 1).max() < 0.02


def test_a_backward_format_is_not_blamed_on_the_parameters(crossed):
    """Fitted as separate formats (the decoupled law on full labels, ignoring the backward split), int4 with a
    poor gradient format looks like a worse forward format; the effN-effD law gives it back its own effN."""
    runs = crossed.runs.drop(columns=["forward", "backward"]).assign(format=lambda d: d["format"].str.replace(" | bwd ", "~"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        blamed = capscale.fit(runs, bootstrap=0, progress=False).eff["int4~mxfp4"]
    assert blamed < 0.75 * TRUE_N["int4"]
    assert crossed.eff["int4"] == pytest.approx(TRUE_N["int4"], rel=0.05)


def test_effd_needs_several_token_budgets():
    runs = load_runs(simulate_runs(TRUE_N, specs=SPECS, eff_d=TRUE_D, noise=0.004))
    one = runs[~((runs["backward"] == "mxfp4") & (runs["tokens"] / runs["params"] != 50))]
    with pytest.raises(RunTableError, match="one token budget"):
        capscale.fit(one, bootstrap=0, progress=False)


@pytest.mark.slow  # a report / two command-line runs: the slow tier
def test_fit_command_prints_effn_and_effd(capscale_cli, tmp_path):
    path = tmp_path / "crossed.csv"
    simulate_runs(TRUE_N, specs=SPECS, eff_d=TRUE_D, noise=0.004).to_csv(path, index=False)
    out = capscale_cli("fit", str(path), "--bootstrap", "20", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)["results"]
    assert result["eff_d"]["mxfp4"]["value"] == pytest.approx(0.5, rel=0.1)
    assert result["eff_d"]["mxfp4"]["ci"][0] < result["eff_d"]["mxfp4"]["value"] < result["eff_d"]["mxfp4"]["ci"][1]
    text = capscale_cli("fit", str(path), "--bootstrap", "20").stdout
    assert "effD[int8]" in text and "effN" in text


@pytest.mark.slow  # a report / two command-line runs: the slow tier
def test_report_has_the_effn_effd_plane_and_the_effd_table(crossed, tmp_path):
    report = crossed.report(tmp_path / "r", progress=False)
    results = report.results
    assert results["verdicts"][0]["topic"] == "What do the backward formats cost?"
    rows = {r["backward"]: r for r in results["backward"]["table"]}
    assert rows["mxfp4"]["effD"] == pytest.approx(TRUE_D["mxfp4"], rel=0.1)
    assert rows["mxfp4"]["bias_sq"] == pytest.approx(rows["mxfp4"]["gmse"], rel=1e-6)  # nearest: all bias
    assert (tmp_path / "r" / "efficiency_plane.png").is_file()
    assert "3b. Data efficiency of the backward formats" in (tmp_path / "r" / "report.md").read_text()


def test_per_gemm_formats_act_on_their_gemm_and_agree_with_per_operand_ones():
    """--dgrad-format sets both operands of dL/dX, --wgrad-format both of dL/dW; per-operand formats override."""
    torch.manual_seed(0)
    layer = CompressedLinear(64, 32, Compression("int4", "int4"))
    x0 = torch.randn(2, 8, 64)
    exact = _grads(layer, x0)
    layer.comp = Compression("int4", "int4", g_format="int8", gw_format="int8", gx_format="int8")
    per_operand = _grads(layer, x0)
    layer.comp = Compression("int4", "int4", dgrad_format="int8", wgrad_format="int8")
    per_gemm = _grads(layer, x0)
    assert all(torch.equal(a, b) for a, b in zip(per_operand, per_gemm))
    assert layer.comp.label == "int4/int4 | bwd int8"  # the same label as g = gw = gx = int8
    layer.comp = Compression("int4", "int4", wgrad_format="int2")  # only the weight gradient's GEMM
    grad_x, grad_w = _grads(layer, x0)
    assert torch.equal(grad_x, exact[0]) and not torch.allclose(grad_w, exact[1])
    comp = Compression("int4", "int4", dgrad_format="int8", gw_format="int2")
    assert comp.backward_operands() == ("int8", "int2", None, None)
    assert comp.label == "int4/int4 | bwd gw=int2,dgrad=int8"
    assert Compression("int4", "int4").key_settings() == {k: v for k, v in comp.key_settings().items()
                                                          if k not in ("dgrad_format", "gw_format")}


def test_named_recipes_fill_what_is_not_given_and_the_record_names_every_format(tmp_path):
    nvidia = Compression(recipe="nvidia-nvfp4")
    assert nvidia.w_format == "nvfp4(tile=16x16)" and nvidia.gx_format.startswith("rht(block=16)+")
    assert Compression(recipe="nvidia-nvfp4", a_format="int4").a_format == "int4"  # given beside it: kept
    quest = Compression(recipe="quest")
    assert quest.key_settings() == Compression("int4", "int4", sparse_quantized="quest", fp4_trust="as-run").key_settings()
    with pytest.raises(capscale.capacity.InputError, match="unknown recipe 'nvdia'.*nvidia-nvfp4"):
        Compression(recipe="nvdia")
    record = train(TrainConfig(Compression(recipe="nvidia-nvfp4"), n_layer=2, n_head=4, n_embd=32, tokens=8192),
                   progress=False)
    assert record["status"] == "ok" and record["recipe"] == "nvidia-nvfp4"
    for name in ("w_format", "a_format", "gw_format", "gx_format", "dgrad_format", "wgrad_format"):
        assert record[name] and record[name] in record["format"], name
    with pytest.raises(capscale.capacity.InputError, match=r"keeps the last ceil\(0.16 x 1\) = 1 of 1 blocks"):
        train(TrainConfig(Compression(recipe="nvidia-nvfp4"), n_layer=1, n_head=4, n_embd=32, tokens=8192),
              progress=False)


def test_compress_takes_a_recipe_and_lists_the_layers_it_keeps_dense():
    from capscale.trainers.compress import compress_
    model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(32, 32),
                                                                         torch.nn.Linear(32, 32)) for _ in range(6)]))
    compress_(model, recipe="nvidia-nvfp4")
    summary = model.capscale_summary
    assert len(summary) == 10 and len(summary.skipped) == 2  # ceil(0.16 x 6) = 1 block of 2 linears
    assert all(name.startswith("0.5.") and "keep_dense" in why for name, why in summary.skipped.items())
    assert "left uncompressed" in str(summary)
