"""Trainer speed, ratios against baselines measured in the same run:
1. dense training throughput of `trainers.train` vs a minimal plain-PyTorch loop over the same architecture;
2. step time of W4A4 (Hadamard + int4, trust estimator) vs dense;
3. capscale's Hadamard transform (fast two-factor form from block 256, a dense product below) vs a dense
   block-matrix multiply, by block size.

Run: python benchmarks/bench_trainers.py [target_params]   (default 400k non-embedding parameters)
"""
import sys
import time

import torch
from scipy.linalg import hadamard

from capscale.capacity.structure import fwht
from capscale.trainers.data import load_tokens, random_batch
from capscale.trainers.model import Decoder, config_for_params
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
    params = int(sys.argv[1]) if len(sys.argv) > 1 else 400_000
    dense = train(TrainConfig(params=params, tokens=TOKENS, batch_size=32), progress=False)
    plain = plain_loop_tokens_per_s(params, 32, dense["lr"])
    print(f"N = {dense['params']:,}: capscale dense {dense['tokens_per_s']:,.0f} tok/s, plain PyTorch loop "
          f"{plain:,.0f} tok/s: ratio {dense['tokens_per_s'] / plain:.2f} (target >= 0.80)")
    spec = "hadamard+int4(scale=rms)"
    w4a4 = train(TrainConfig(w_format=spec, a_format=spec, params=params, tokens=TOKENS, batch_size=32), progress=False)
    print(f"W4A4 {spec} + trust: {w4a4['tokens_per_s']:,.0f} tok/s: step time {dense['tokens_per_s'] / w4a4['tokens_per_s']:.2f}x "
          f"dense (target <= 1.5x)")
    w4a4_opt = train(TrainConfig(w_format="int4", a_format="int4", params=params, tokens=TOKENS, batch_size=32), progress=False)
    print(f"W4A4 int4 (searched MSE-optimal scale) + trust: step time {dense['tokens_per_s'] / w4a4_opt['tokens_per_s']:.2f}x dense")
    x = torch.randn(4096, 1024)
    for block in (32, 128, 256, 512, 1024, 4096):
        h = torch.tensor(hadamard(block), dtype=torch.float32) / block ** 0.5
        t_fast = min(_time(lambda: fwht(x, block)) for _ in range(5))
        t_mat = min(_time(lambda: (x.reshape(-1, block) @ h).reshape(x.shape)) for _ in range(5))
        print(f"Hadamard block {block:>4} on 4096x1024: capscale fwht {t_fast * 1e3:6.1f} ms, dense block matmul "
              f"{t_mat * 1e3:6.1f} ms: ratio {t_mat / t_fast:.2f}")


def _time(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
