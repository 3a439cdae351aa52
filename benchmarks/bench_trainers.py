"""Trainer speed, ratios against baselines measured in the same run:
1. dense training throughput of `capscale.train` vs a minimal plain-PyTorch loop over the same architecture;
2. step time of W4A4 with the default recipe (per-row int4, Hadamard in the rotated domain, trust estimator)
   vs dense (target <= 1.3x on CPU), and of the former recipe (one MSE-optimal scale per tensor, no rotation);
3. on CUDA: tokens/s and model FLOPs utilisation (PaLM's convention) of dense and W4A4 in bf16 autocast;
4. capscale's Hadamard transform (fast two-factor form from block 256, a dense product below) vs a dense
   block-matrix multiply, by block size.

Run: python benchmarks/bench_trainers.py [target_params] [--device cuda] [--peak-tflops 989]
(default 400k non-embedding parameters on CPU; 30M on CUDA)
"""
import argparse
import time

import torch
from scipy.linalg import hadamard

from capscale.capacity.structure import fwht
from capscale.trainers.compression import Compression
from capscale.trainers.data import load_tokens, random_batch
from capscale.trainers.model import Decoder, config_for_params, flops_per_token
from capscale.trainers.train import TrainConfig, train

torch.set_num_threads(2)
TOKENS = 400_000


def plain_loop_tokens_per_s(params: int, batch: int, lr: float) -> float:
    """The reference: nn.Linear decoder of the same shape, bare AdamW loop, no wrappers or bookkeeping."""
    model = Decoder(config_for_params(params))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    data, gen = load_tokens(), torch.Generator().manual_seed(0)
    steps = TOKENS // (batch * 128)
    start = time.perf_counter()
    for _ in range(steps):
        x, y = random_batch(data.train, batch, 128, gen)
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch * 128 / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params", type=int, nargs="?", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200: 989)")
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        return cuda(args.params or 30_000_000, args.device, args.peak_tflops)
    params = args.params or 400_000
    dense = train(TrainConfig(params=params, tokens=TOKENS, batch_size=32), progress=False)
    plain = plain_loop_tokens_per_s(params, 32, dense["lr"])
    print(f"N = {dense['params']:,}: capscale dense {dense['tokens_per_s']:,.0f} tok/s, plain PyTorch loop "
          f"{plain:,.0f} tok/s: ratio {dense['tokens_per_s'] / plain:.2f} (target >= 0.80)")
    w4a4 = train(TrainConfig(Compression("int4", "int4"), params=params, tokens=TOKENS, batch_size=32), progress=False)
    print(f"W4A4 default recipe (per-row int4, Hadamard blocks {w4a4['hadamard_blocks']}, trust): "
          f"{w4a4['tokens_per_s']:,.0f} tok/s: step time {dense['tokens_per_s'] / w4a4['tokens_per_s']:.2f}x dense "
          "(target <= 1.3x)")
    old = "int4(group=tensor,scale=opt)"
    former = train(TrainConfig(Compression(old, old, rotate=False), params=params, tokens=TOKENS, batch_size=32),
                   progress=False)
    print(f"W4A4 former recipe ({old}, no rotation): step time "
          f"{dense['tokens_per_s'] / former['tokens_per_s']:.2f}x dense")
    x = torch.randn(4096, 1024)
    for block in (32, 128, 256, 512, 1024, 4096):
        h = torch.tensor(hadamard(block), dtype=torch.float32) / block ** 0.5
        t_fast = min(_time(lambda: fwht(x, block)) for _ in range(5))
        t_mat = min(_time(lambda: (x.reshape(-1, block) @ h).reshape(x.shape)) for _ in range(5))
        print(f"Hadamard block {block:>4} on 4096x1024: capscale fwht {t_fast * 1e3:6.1f} ms, dense block matmul "
              f"{t_mat * 1e3:6.1f} ms: ratio {t_mat / t_fast:.2f}")


def cuda(params: int, device: str, peak_tflops: float) -> None:
    """Tokens/s and MFU of dense and W4A4 training in bf16 autocast, context 512, on one GPU."""
    tokens = 64 * 512 * 60
    for comp in (Compression(), Compression("int4", "int4")):
        cfg = TrainConfig(comp, params=params, tokens=tokens, batch_size=64, context=512, device=device)
        record = train(cfg, progress=False)
        achieved = flops_per_token(cfg.model_config(256)) * record["tokens_per_s"] / 1e12
        print(f"{device} {comp.label:>10} N = {record['params']:,}: {record['tokens_per_s']:,.0f} tok/s, "
              f"{achieved:.1f} model TFLOP/s, MFU {achieved / peak_tflops:.1%} of {peak_tflops:g}")


def _time(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
