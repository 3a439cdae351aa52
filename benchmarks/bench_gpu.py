"""The CUDA path on one GPU, in one run inside its time limit (benchmarks/gpu_check.sh gives it 9 minutes):

1. quantizer and rotation round trips on a 4096 x 4096 tensor, fp32 beside bf16 input, against a clone and int4;
2. at QuEST's 30M and 100M shapes (vocabulary 50,304, context 512, the published 262,144 tokens per step split into
   the planned micro-batches), bf16 autocast, dense / W4A4 / NVFP4, eager (and dense and NVFP4 compiled at 30M): the planned peak against
   torch.cuda.max_memory_allocated, and throughput and MFU of the steady state: compile and warm-up steps run first
   and are not timed; FLOPs are counted by torch.utils.flop_counter.FlopCounterMode on one step (forward and
   backward), not estimated.

Run: bash benchmarks/gpu_check.sh [--peak-tflops 989]   (989: an H100/H200's dense bf16 peak)
     python benchmarks/bench_gpu.py --device cpu --quick   (a CPU smoke run of the same code, tiny shapes)
"""
import argparse
import gc
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from capscale import capacity
from capscale.trainers.compress import compressed_decoder
from capscale.trainers.compression_config import Compression
from capscale.trainers.config import TrainConfig
from capscale.trainers.layers import rotate
from capscale.capacity.structure import hadamard_matrix
from capscale.trainers.train import _optimizer, _step, memory_plan

SHAPES = {"30M": dict(n_layer=6, n_head=5, n_embd=640, lr=1.2e-3), "100M": dict(n_layer=8, n_head=8, n_embd=1024, lr=6e-4)}
QUICK = {"tiny": dict(n_layer=2, n_head=2, n_embd=128, lr=1e-3)}
MODEL = dict(context=512, vocab_size=50304, tie_embeddings=False, init="quest", norm_eps=1e-5, mlp_multiple=256,
             decay="linear", schedule="onecycle")
COMPRESSIONS = {"dense": Compression(), "W4A4": Compression("int4", "int4"), "NVFP4": Compression("nvfp4", "nvfp4")}
ROUND_TRIPS = ["int4", "fp4_e2m1", "mxfp4", "nvfp4", "nvfp4(four_over_six=true)", "nvfp4(tile=16x16)",
               "rht(block=16)+nvfp4(rounding=stochastic)", "rht(block=128)+eden"]
COMPILED = {"30M": ("dense", "NVFP4"), "tiny": ("dense", "NVFP4")}  # cold compiles cost about a minute each


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def training_steps(name: str, shape: dict, label: str, comp: Compression, compiled: bool, device: str, batch: int,
                   micro_batch: int, warmup: int, timed: int, peak_tflops: float) -> None:
    # one micro-batch for every format and mode: equal work per launch, and free memory left by an earlier model
    # cannot shrink a later one's plan
    cfg = TrainConfig(comp, **MODEL, **shape, params=1, batch_size=batch, micro_batch_size=micro_batch, device=device,
                      compile=compiled)
    plan = memory_plan(cfg)
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


def _milliseconds(fn, x, device: str, repeats: int = 10) -> float:
    fn(x)  # first call: set-up
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    synchronize(device)
    return (time.perf_counter() - started) / repeats * 1e3


def round_trips(device: str, size: int) -> None:
    """Each round trip beside a clone (the out-of-place floor) and int4's, on the same tensor in the same run."""
    x32 = torch.randn(size, size, device=device)
    for dtype in (torch.float32, torch.bfloat16):
        x = x32.to(dtype)
        name = str(dtype).removeprefix("torch.")
        clone = _milliseconds(torch.clone, x, device)
        int4 = _milliseconds(capacity.parse("int4"), x, device)
        print(f"round trip {'clone':<42} {name:>8}: {clone:8.3f} ms", flush=True)
        for spec in ROUND_TRIPS:
            ms = _milliseconds(capacity.parse(spec), x, device)
            print(f"round trip {spec:<42} {name:>8}: {ms:8.3f} ms = {ms / clone:6.1f}x clone, {ms / int4:5.2f}x int4",
                  flush=True)
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
    parser.add_argument("--micro-batch", type=int, default=64, help="sequences per forward/backward pass, all runs")
    parser.add_argument("--no-round-trips", action="store_true", help="only the training steps")
    args = parser.parse_args()
    if not args.no_round_trips:
        round_trips(args.device, 512 if args.quick else 4096)
    shapes, batch = (QUICK, 4) if args.quick else (SHAPES, 512)
    warmup, timed = (1, 1) if args.quick else (3, 4)
    for name, shape in shapes.items():
        for label, comp in COMPRESSIONS.items():
            for compiled in (False, True) if label in COMPILED.get(name, ()) else (False,):
                training_steps(name, shape, label, comp, compiled, args.device, batch,
                               min(args.micro_batch, batch), warmup, timed, args.peak_tflops)
                gc.collect()  # the next model starts on an empty device
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
