"""Trainer speed, ratios against baselines measured in the same run:
1. dense training throughput of `capscale.train` vs a minimal plain-PyTorch loop over the same architecture;
2. step time of W4A4 with the default recipe (per-row int4, Hadamard in the rotated domain, trust estimator)
   vs dense (target <= 1.3x on CPU), and of the former recipe (one MSE-optimal scale per tensor, no rotation);
3. capscale's Hadamard transform (fast two-factor form from block 256, a dense product below) vs a dense
   block-matrix multiply, by block size;
4. `--memory`: the memory plan of a step (trainers/memory.py) against a measured CPU step (peak RSS of one
   forward, backward and AdamW step) at QuEST's 30M and 100M shapes, vocabulary 50,304, context 512;
5. `--device cuda` (what benchmarks/gpu_check.sh runs): at the 30M and 100M shapes, bf16 and W4A4, eager and
   --compile, a few steps of the published batch (262,144 tokens, micro-batches as planned): the planned peak
   against torch.cuda.max_memory_allocated, tokens/s and model FLOPs utilisation (PaLM's convention).

Run: python benchmarks/bench_trainers.py [target_params] [--memory] [--device cuda] [--peak-tflops 989]
(default 400k non-embedding parameters on CPU)
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import torch
from scipy.linalg import hadamard

from capscale.capacity.structure import fwht
from capscale.trainers.compression_config import Compression
from capscale.trainers.data import load_tokens, random_batch
from capscale.trainers.config import TrainConfig
from capscale.trainers.memory import GIB
from capscale.trainers.compress import compressed_decoder
from capscale.trainers.model import Decoder, config_for_params, flops_per_token
from capscale.trainers.train import _optimizer, _step, memory_plan, train

QUEST_SHAPES = {"30M": dict(n_layer=6, n_head=5, n_embd=640, lr=1.2e-3),
                "100M": dict(n_layer=8, n_head=8, n_embd=1024, lr=6e-4)}
QUEST_MODEL = dict(context=512, vocab_size=50304, tie_embeddings=False, init="quest", norm_eps=1e-5, mlp_multiple=256,
                   decay="linear", schedule="onecycle")

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
    parser.add_argument("--memory", action="store_true", help="the memory plan against a measured CPU step")
    parser.add_argument("--memory-one", nargs=4, metavar=("SHAPE", "W", "A", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_one:
        name, w, a, batch = args.memory_one
        return memory_one(name, w, a, int(batch))
    if args.memory:
        return memory_on_cpu()
    if args.device.startswith("cuda"):
        return cuda(args.device, args.peak_tflops)
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


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def memory_on_cpu() -> None:
    """Two float32 steps (forward, backward, AdamW) at QuEST's shapes, in one pass and accumulating two micro-batches,
    each in a fresh process (freed memory that the C allocator keeps would hide the next one's peak)."""
    for name in QUEST_SHAPES:
        for w, a in (("bf16", "none"), ("int4", "int4")):
            for batch in ("2", "4"):
                subprocess.run([sys.executable, __file__, "--memory-one", name, w, a, batch], check=True)


def memory_one(name: str, w: str, a: str, batch: int) -> None:
    """The planned peak against the growth of this process's peak RSS from before the model was built (Linux:
    /proc/self/clear_refs resets the peak); the second step is the steady state, AdamW's moments allocated."""
    cfg = TrainConfig(Compression(w, None if a == "none" else a), **QUEST_MODEL, **QUEST_SHAPES[name], params=1,
                      batch_size=batch, micro_batch_size=2)
    plan = memory_plan(cfg)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss("VmRSS")
    model = compressed_decoder(cfg.model_config(cfg.vocab_size), cfg.compression)
    optimizer = _optimizer(model, 1e-4, 0.1, "linear")
    window = torch.randint(0, cfg.vocab_size, (batch, cfg.context + 1))
    started = time.perf_counter()
    for _ in range(2):
        _step(model, None, window[:, :-1], window[:, 1:], 2, "cpu")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - started) / 2
    measured = _rss("VmHWM") - before
    print(f"{name} {cfg.compression.label:>10} fp32, micro-batch 2 x {plan.accumulation_steps} of 512 tokens: planned "
          f"{plan.peak / GIB:.2f} GiB, measured {measured / GIB:.2f} GiB: plan / measured {plan.peak / measured:.2f} "
          f"(target 0.8-1.2); {seconds:.1f} s a step", flush=True)


def cuda(device: str, peak_tflops: float) -> None:
    """One line per check: planned vs measured peak memory, tokens/s and MFU, in bf16 autocast on one GPU."""
    folder = Path(tempfile.mkdtemp())
    np.random.default_rng(0).integers(0, 50304, 40_000_000, dtype=np.uint16).tofile(folder / "train.bin")
    np.random.default_rng(1).integers(0, 50304, 2_000_000, dtype=np.uint16).tofile(folder / "val.bin")
    for name, shape in QUEST_SHAPES.items():
        for comp in (Compression(), Compression("int4", "int4")):
            for compiled in (False, True):
                cfg = TrainConfig(comp, **QUEST_MODEL, **shape, params=1, batch_size=512, tokens=4 * 262_144,
                                  eval_tokens=65_536, data=str(folder), device=device, compile=compiled)
                record = train(cfg, progress=False)
                achieved = flops_per_token(cfg.model_config(cfg.vocab_size)) * record["tokens_per_s"] / 1e12
                ratio = record["planned_peak_gib"] / max(record["measured_peak_gib"], 1e-9)
                print(f"{name} {comp.label:>10} {'compiled' if compiled else 'eager':>8}: {record['status']}, "
                      f"micro-batch {record['micro_batch_size']}, planned {record['planned_peak_gib']:.1f} GiB, "
                      f"measured {record['measured_peak_gib']:.1f} GiB (plan / measured {ratio:.2f}), "
                      f"{record['tokens_per_s']:,.0f} tok/s, {achieved:.0f} TFLOP/s, MFU {achieved / peak_tflops:.1%}")


def _time(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
