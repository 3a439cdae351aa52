"""FP4 round trips at the speed of int4: each format's compress-decompress of a 4096x4096 fp32 tensor on 2 threads,
as a ratio to a `clone` (the out-of-place floor) and to capscale's per-row int4, with torchao's reference NVFP4 and
MXFP4 round trips beside them where torchao is installed. Median of 5 interleaved rounds. `--compiled` adds each
format through torch.compile (one fused loop; what `capscale train --compile` runs), its compile time untimed.

Run: python benchmarks/bench_fp4.py [--threads 2] [--size 4096] [--compiled]
"""
import argparse
import statistics
import time

import torch

from capscale import capacity

FORMATS = ["int4", "fp4_e2m1", "mxfp4", "nvfp4", "nvfp4(four_over_six=true)", "nvfp4(tile=16x16)",
           "nvfp4(rounding=stochastic,scale_mult=1.0625)", "rht(block=16)+nvfp4", "rht(block=128)+eden"]


def torchao_round_trips() -> dict:
    """torchao's emulated NVFP4 (with its per-tensor scale) / MXFP4 quantize-dequantize, where installed (else none);
    both equal capscale's values (tests/test_fp4.py)."""
    try:
        from torchao.prototype.mx_formats import nvfp4_tensor
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
    except ImportError:
        return {}

    def nvfp4(x):
        scale = nvfp4_tensor.per_tensor_amax_to_scale(x.abs().amax())
        return nvfp4_tensor.NVFP4Tensor.to_nvfp4(x, per_tensor_scale=scale).dequantize(torch.float32)
    return {"torchao nvfp4": nvfp4,
            "torchao mxfp4": lambda x: MXTensor.to_mx(x, torch.float4_e2m1fn_x2, 32).dequantize(torch.float32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compiled", action="store_true", help="also each format through torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    jobs = {"clone": torch.clone, **{f: capacity.parse(f) for f in FORMATS}, **torchao_round_trips()}
    if args.compiled:  # every Format shares Format.__call__'s frame: one compile each, past dynamo's default limit of 8
        torch._dynamo.config.recompile_limit = 64
        jobs.update({f"{f} (compiled)": torch.compile(capacity.parse(f), dynamic=False) for f in FORMATS})
    times = {name: [] for name in jobs}
    for name, fn in jobs.items():  # warm-up: first-call allocations and codebook set-up
        fn(x)
    for _ in range(args.rounds):
        for name, fn in jobs.items():
            start = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.size}x{args.size} fp32 round trip, {args.threads} threads, median of {args.rounds}")
    print(f"{'format':<46}{'ms':>9}{'x clone':>9}{'x int4':>8}")
    for name, t in median.items():
        print(f"{name:<46}{1000 * t:9.1f}{t / median['clone']:9.2f}{t / median['int4']:8.2f}")


if __name__ == "__main__":
    main()
