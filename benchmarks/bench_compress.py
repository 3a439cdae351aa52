"""Cost of a format inside a third-party model: a training step of a Hugging Face Llama (built from a config,
nothing downloaded) after `capscale.compress_`, against the same model's dense step in the same run.

Run: python benchmarks/bench_compress.py [--hidden 256] [--layers 4] [--steps 20] [--device cpu] [--compile]
The issue's target is W4A4 at most 1.3x the dense step. `--compile` compiles every model (dense too) with
torch.compile first: the format's elementwise steps then fuse into a few loops (compilation is not timed).
"""
import argparse
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile every model, the dense one too")
    args = p.parse_args()
    runs = {"dense": None, "int4 (weights)": "int4", "int4/int4 (W4A4)": "int4/int4", "2:4+int4": "2:4+int4",
            "nvfp4": "nvfp4"}
    base = None
    print(f"Llama hidden {args.hidden}, {args.layers} layers, batch {args.batch} x {args.context}, {args.device}, "
          f"{torch.get_num_threads()} threads{', compiled' if args.compile else ', eager'}")
    for name, label in runs.items():
        model = llama(args.hidden, args.layers)
        if label:
            capscale.compress_(model, label)
        if args.compile:
            model = torch.compile(model)
        t = seconds_per_step(model, args.steps, args.batch, args.context, args.device)
        base = base or t
        print(f"  {name:<18} {t * 1e3:8.1f} ms/step   x{t / base:.2f} of dense")


if __name__ == "__main__":
    main()
