"""The CUDA path on one GPU, in one run inside its time limit (benchmarks/gpu_check.sh gives it 9 minutes):

1. at QuEST's 30M and 100M shapes (vocabulary 50,304, context 512, the published 262,144 tokens per step split into
   the planned micro-batches), bf16 autocast, dense / W4A4 / NVFP4, eager (and compiled at 30M): the planned peak against
   torch.cuda.max_memory_allocated, and throughput and MFU of the steady state: compile and warm-up steps run first
   and are not timed; FLOPs are counted by torch.utils.flop_counter.FlopCounterMode on one step (forward and
   backward), not estimated;
2. quantizer and rotation round trips on a 4096 x 4096 tensor, fp32 beside bf16 input.

Run: bash benchmarks/gpu_check.sh [--peak-tflops 989]   (989: an H100/H200's dense bf16 peak)
     python benchmarks/bench_gpu.py --device cpu --quick   (a CPU smoke run of the same code, tiny shapes)
"""
import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from capscale import capacity
from capscale.trainers.compress import compressed_decoder
from capscale.trainers.compression import Compression
from capscale.trainers.config import TrainConfig
from capscale.trainers.layers import rotate
from capscale.capacity.structure import hadamard_matrix
from capscale.trainers.train import _optimizer, _step, plan_for

SHAPES = {"30M": dict(n_layer=6, n_head=5, n_embd=640, lr=1.2e-3), "100M": dict(n_layer=8, n_head=8, n_embd=1024, lr=6e-4)}
QUICK = {"tiny": dict(n_layer=2, n_head=2, n_embd=128, lr=1e-3)}
MODEL = dict(context=512, vocab_size=50304, tie_embeddings=False, init="quest", norm_eps=1e-5, mlp_multiple=256,
             decay="linear", schedule="onecycle")
COMPRESSIONS = {"dense": Compression(), "W4A4": Compression("int4", "int4"), "NVFP4": Compression("nvfp4", "nvfp4")}
ROUND_TRIPS = ["int4", "nvfp4", "nvfp4(four_over_six=true)", "mxfp4", "rht(block=16)+nvfp4(rounding=stochastic)"]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def training_steps(name: str, shape: dict, label: str, comp: Compression, compiled: bool, device: str, batch: int,
                   warmup: int, timed: int, peak_tflops: float) -> None:
    cfg = TrainConfig(comp, **MODEL, **shape, params=1, batch_size=batch, device=device, compile=compiled)
    plan = plan_for(cfg)
    model = compressed_decoder(cfg.model_config(cfg.vocab_size), comp).to(device)
    optimizer = _optimizer(model, shape["lr"], 0.1, "linear")
    torch._dynamo.reset()  # each model compiles from cold, as `capscale train --compile` does in its own process
    step_fn = torch.compile(model) if compiled else model
    window = torch.randint(0, cfg.vocab_size, (batch, cfg.context + 1), device=device)
    x, y = window[:, :-1], window[:, 1:]

    def step():
        _step(step_fn, None, x, y, plan.micro_batch_size, device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(warmup):  # compilation and first-touch allocations happen here, untimed
        step()
    synchronize(device)
    setup = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(timed):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - started) / timed
    with FlopCounterMode(display=False) as counter:  # one eager step's forward and backward, counted
        _step(model, None, x, y, plan.micro_batch_size, device)
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    tokens_per_s = batch * cfg.context / seconds
    achieved = flops / seconds / 1e12
    measured = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.startswith("cuda") else float("nan")
    print(f"{name:>5} {label:>6} {'compiled' if compiled else 'eager':>8}: {tokens_per_s:>12,.0f} tok/s, "
          f"{achieved:7.1f} TFLOP/s (FlopCounterMode), MFU {achieved / peak_tflops:6.1%}; micro-batch "
          f"{plan.micro_batch_size}, planned {plan.peak / 2 ** 30:.1f} GiB, measured {measured:.1f} GiB; "
          f"warm-up and compile {setup:.0f} s (untimed)", flush=True)


def round_trips(device: str, size: int) -> None:
    x32 = torch.randn(size, size, device=device)
    for dtype in (torch.float32, torch.bfloat16):
        x = x32.to(dtype)
        for spec in ROUND_TRIPS:
            fmt = capacity.parse(spec)
            fmt(x)  # first call: set-up
            synchronize(device)
            started = time.perf_counter()
            for _ in range(5):
                fmt(x)
            synchronize(device)
            print(f"round trip {spec:<42} {str(dtype).removeprefix('torch.'):>8}: "
                  f"{(time.perf_counter() - started) / 5 * 1e3:8.2f} ms", flush=True)
        hadamard = hadamard_matrix(128).to(device)
        started = time.perf_counter()
        for _ in range(5):
            rotate(x, hadamard)
        synchronize(device)
        print(f"rotation (128-wide block Hadamard)            {str(dtype).removeprefix('torch.'):>8}: "
              f"{(time.perf_counter() - started) / 5 * 1e3:8.2f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a small batch: a smoke run of this code")
    args = parser.parse_args()
    shapes, batch = (QUICK, 4) if args.quick else (SHAPES, 512)
    warmup, timed = (1, 1) if args.quick else (3, 4)
    for name, shape in shapes.items():
        for label, comp in COMPRESSIONS.items():
            for compiled in (False, True) if name in ("30M", "tiny") else (False,):  # cold compiles: ~1 min each
                training_steps(name, shape, label, comp, compiled, args.device, batch, warmup, timed,
                               args.peak_tflops)
    round_trips(args.device, 512 if args.quick else 4096)


if __name__ == "__main__":
    main()
