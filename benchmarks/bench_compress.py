"""Cost of a format inside a third-party model: a training step of a Hugging Face Llama (built from a config,
nothing downloaded) after `capscale.compress_`, against the same model's dense step in the same run.

Run: python benchmarks/bench_compress.py [--hidden 256] [--layers 4] [--steps 20] [--device cpu] [--compile]
The issue's target is W4A4 at most 1.3x the dense step. Every model is timed in a fresh process, under glibc's
default allocator settings and with large blocks kept for reuse (REUSE_MEMORY). `--compile` compiles every model (dense too) with
torch.compile first: the format's elementwise steps then fuse into a few loops (compilation is not timed).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import transformers

import capscale


def llama(hidden: int, layers: int):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64 or 64, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64), max_position_embeddings=256))


def seconds_per_step(model, steps: int, batch: int, context: int, device: str) -> float:
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (batch, context), device=device)
    for i in range(steps + 3):  # three warm-up steps
        if i == 3:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


# glibc's default returns large freed blocks to the system, so every big temporary is fresh memory whose page
# faults cost more here than the arithmetic on it; these settings keep blocks under 32 MB for reuse (what
# jemalloc or tcmalloc, the allocators PyTorch's CPU tuning guide recommends, do by design).
REUSE_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}


def time_one(args, label: str | None) -> float:
    """Seconds per step of one model, timed in a fresh process: in one process each model inherits the
    allocator state of those before it (W4A4 timed third read 2.0x, timed second 1.4x)."""
    if args.child:
        model = llama(args.hidden, args.layers)
        if label:
            capscale.compress_(model, label)
        if args.compile:
            model = torch.compile(model)
        return seconds_per_step(model, args.steps, args.batch, args.context, args.device)
    command = [sys.executable, __file__, "--child", "--label", label or "", *sys.argv[1:]]
    env = {**os.environ, **(REUSE_MEMORY if args.reuse_memory else {})}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.split()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile every model, the dense one too")
    p.add_argument("--only", nargs="+", metavar="LABEL", help="time these compressions only (besides dense)")
    p.add_argument("--repeats", type=int, default=3, help="processes per model, interleaved; the median is shown")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--label", default="", help=argparse.SUPPRESS)
    p.add_argument("--reuse_memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(time_one(args, args.label or None))
        return
    runs = {"dense": None, "int4 (weights)": "int4", "int4/int4 (W4A4)": "int4/int4", "2:4+int4": "2:4+int4",
            "nvfp4": "nvfp4"}
    if args.only:
        runs = {"dense": None, **{label: label for label in args.only}}
    print(f"Llama hidden {args.hidden}, {args.layers} layers, batch {args.batch} x {args.context}, {args.device}, "
          f"{torch.get_num_threads()} threads{', compiled' if args.compile else ', eager'}; each model in its own process")
    for reuse in (False, True):
        args.reuse_memory = reuse
        print("glibc malloc, large blocks kept for reuse (" + " ".join(f"{k}={v}" for k, v in REUSE_MEMORY.items())
              + ")" if reuse else "glibc malloc, default settings")
        times = {name: [] for name in runs}
        for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine hits every model
            for name, label in runs.items():
                times[name].append(time_one(args, label))
        base = statistics.median(times["dense"])
        for name, values in times.items():
            t = statistics.median(values)
            print(f"  {name:<18} {t * 1e3:8.1f} ms/step   x{t / base:.2f} of dense   (median of {len(values)}: "
                  + ", ".join(f"{v * 1e3:.0f}" for v in values) + ")")


if __name__ == "__main__":
    main()
