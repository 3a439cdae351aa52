"""The CUDA path: the same formats on the GPU as on the CPU, and bf16-autocast training over them. Skipped where no
GPU is visible (CI never has one); `benchmarks/gpu_check.sh` runs this file first on a lent GPU."""
import dataclasses
import math

import pytest
import torch

from capscale import capacity
from capscale.trainers.compression_config import Compression
from capscale.trainers.config import TrainConfig
from capscale.trainers.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DETERMINISTIC = ["int4", "int8", "fp8_e4m3", "fp4_e2m1", "mxfp4", "nvfp4", "nvfp4(four_over_six=true)",
                 "nvfp4(tile=16x16)", "nf4", "2:4", "hadamard+int4"]


@pytest.mark.parametrize("spec", DETERMINISTIC)
def test_a_format_rounds_the_same_values_on_the_gpu_as_on_the_cpu(spec):
    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    fmt = capacity.parse(spec)
    on_cpu, on_gpu = fmt(x), fmt(x.cuda()).cpu()
    # A scale from a sum (rms) may differ in its last bit with the order of the reduction: every value of that row
    # then differs by ~1e-7 relative. Anything larger is a value on another level, allowed only where a last-bit
    # difference moved a tie (a fraction far below 1e-3).
    moved = ((on_cpu - on_gpu).abs() > 1e-5 * on_cpu.abs() + 1e-30).float().mean().item()
    assert moved < 1e-3, f"{spec}: {moved:.3%} of the values land on another level on the GPU"


@pytest.mark.parametrize("spec", ["int4", "nvfp4", "rht(block=16)+nvfp4(rounding=stochastic)", "rht(block=128)+eden"])
def test_bf16_input_keeps_its_dtype_and_its_gmse_on_the_gpu(spec):
    x = torch.randn(1024, 1024, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    fmt = capacity.parse(spec)
    y = fmt(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.device.type == "cuda"
    mse_bf16 = ((y.float() - x) ** 2).mean().item()
    mse_fp32 = ((fmt(x) - x) ** 2).mean().item()
    assert mse_bf16 == pytest.approx(mse_fp32, rel=0.05)  # bf16's own rounding (2^-9 relative) is far below FP4's


@pytest.fixture(scope="module")
def cpu_losses():
    return {}


@pytest.mark.parametrize("spec", [dict(), dict(w_format="int4", a_format="int4"),
                                  dict(w_format="nvfp4", a_format="nvfp4"), dict(recipe="nvidia-nvfp4")],
                         ids=["dense", "int4/int4", "nvfp4/nvfp4", "nvidia-nvfp4"])
def test_bf16_autocast_training_on_the_gpu_follows_fp32_on_the_cpu(spec):
    comp = Compression(**spec)
    cfg = TrainConfig(comp, params=26_784, tokens=200_000, context=64)
    cpu = train(cfg, progress=False)
    gpu = train(dataclasses.replace(cfg, device="cuda"), progress=False)
    assert gpu["status"] == "ok" and math.isfinite(gpu["loss"])
    assert gpu["format"] == cpu["format"] and gpu["key"] == cpu["key"]  # the device is not part of the run
    # bf16 matmuls and another random stream (the rotation signs, stochastic rounding) move the final loss a little
    assert gpu["loss"] == pytest.approx(cpu["loss"], abs=0.05), (gpu["loss"], cpu["loss"])


@pytest.mark.xfail(reason="seen on an H200 with torch 2.11 (2026-12-04): compiled 3.068 against eager 2.469; the "
                          "CPU agrees under bf16 autocast; cause not found (docs/training.md)", strict=False)
def test_a_compiled_nvfp4_model_on_the_gpu_trains_as_the_eager_one():
    cfg = TrainConfig(Compression("nvfp4", "nvfp4"), params=26_784, tokens=100_000, context=64, device="cuda")
    eager = train(cfg, progress=False)
    compiled = train(dataclasses.replace(cfg, compile=True), progress=False)
    assert compiled["loss"] == pytest.approx(eager["loss"], abs=0.02)
