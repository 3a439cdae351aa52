"""The memory of a training step, planned before anything runs, and the largest micro-batch that fits a budget.

Peak memory of one process, counted from the model's code for the precision train() uses (bf16 autocast on
CUDA, float32 on CPU):
- resident: fp32 weights and buffers, fp32 gradients, AdamW's two fp32 moments, and under torchrun DDP's
  gradient buckets (another fp32 copy of the gradients);
- when a step accumulates micro-batches, one more gradient-sized term: the kept gradients and each backward's new
  ones coexist with the activations (measured on CPU: without it the plan was 12-18% under the peak);
- per forward pass, whatever the micro-batch: the copies of each weight that the linear layers save for
  backward (bf16 under autocast; the compressed weight in float32) and the formats' gradient masks (1 byte an
  entry), plus the weight's quantization work space;
- per token of the micro-batch: the activations the forward saves for backward (norms, linear inputs, q/k/v and
  the attention output, SwiGLU, the activation formats' masks), and the loss's transient at its backward (the
  log-probabilities and two gradients of the logits, `vocab` wide).
The per-token and per-pass counts match what torch itself saves for backward to the byte on CPU
(tests/test_memory.py counts the saved tensors' storages); `benchmarks/bench_trainers.py --memory` and
`benchmarks/gpu_check.sh` compare the whole plan with a measured step. A plan fits when its peak is at most
`HEADROOM` of the budget: the rest is for the allocator's fragmentation and kernels' work space.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from capscale.capacity import InputError

from .compression_config import Compression
from .model import ModelConfig

GIB = 1024 ** 3
HEADROOM = 0.9
ASSUMED_GPU_GIB = 80.0  # a dry-run's budget for a CUDA plan made on a machine without the GPU


def _saves_mask(fmt, comp: Compression) -> bool:
    """Whether the estimator saves a gradient mask for this format (1 byte an entry)."""
    if fmt is None:
        return False
    sparse = comp._sparsifies(fmt)
    if comp.estimator == "ste":
        return sparse and not comp.quest_sparse_quantized(fmt)
    if comp.estimator == "clipped" or comp.trust_radius(fmt) is not None:
        return True
    return sparse or fmt.rounds_values()


def step_bytes(cfg: ModelConfig, comp: Compression, autocast: bool, world_size: int = 1) -> dict:
    """The plan's terms in bytes: `resident`, `per_pass` (once per forward) and `per_token` (saved for backward)
    `loss_per_token` (the loss's transient) and `accumulation` (added when a step accumulates), for one process."""
    a = 2 if autocast else 4                      # bytes of an activation entering a matmul
    d, h, heads, vocab = cfg.n_embd, cfg.mlp_hidden, cfg.n_head, cfg.vocab_size
    params = cfg.n_params
    hadamard = sum(4 * comp.block_for(i) ** 2 for i, _ in cfg.linear_shapes) * cfg.n_layer
    rotary = 4 * cfg.context * (d // heads)
    resident = 4 * params + hadamard + rotary + 4 * params + 8 * params + (4 * params if world_size > 1 else 0)

    weight_copy = 2 if autocast else 4            # the compressed (or bf16-cast) weight the matmul saves
    per_pass, work = 0, 0
    for i, o in cfg.linear_shapes:
        rotated_or_compressed = comp.w_fmt is not None or comp.block_for(i) > 0
        copy = weight_copy if autocast or rotated_or_compressed else 0
        per_pass += cfg.n_layer * i * o * (copy + _saves_mask(comp.w_fmt, comp))
        work = max(work, 16 * i * o if rotated_or_compressed else 0)  # a few fp32 temporaries of one weight
    per_pass += (2 * vocab * d if autocast else 0) + work          # the head's bf16 weight

    block = 16 * d + 8 + 4 * heads + a * (9 * d + 4 * h)           # norms, attention, SwiGLU, linear inputs
    if _saves_mask(comp.a_fmt, comp):
        block += 3 * d + h                                           # the activation formats' masks
    per_token = cfg.n_layer * block + 8 * d + 4 + a * d + 4 * vocab + 16   # final norm, head input, log-probs, ids
    loss_per_token = (8 + (2 if autocast else 0)) * vocab
    return {"resident": resident, "per_pass": per_pass, "per_token": per_token, "loss_per_token": loss_per_token,
            "accumulation": 4 * params}


@dataclass(frozen=True)
class MemoryPlan:
    resident: int            # weights, gradients, optimizer state (bytes)
    per_pass: int            # saved weight copies and masks of one forward pass
    per_sequence: int        # saved activations and the loss transient of one sequence
    accumulation: int        # added when a step has more than one micro-batch
    micro_batch_size: int
    sequences: int           # this process's sequences per step
    budget: int | None       # bytes
    budget_source: str

    @property
    def peak(self) -> int:
        accumulating = self.accumulation if self.accumulation_steps > 1 else 0
        return self.resident + accumulating + self.per_pass + self.micro_batch_size * self.per_sequence

    @property
    def accumulation_steps(self) -> int:
        return -(-self.sequences // self.micro_batch_size)

    @property
    def fits(self) -> bool:
        return self.budget is None or self.peak <= HEADROOM * self.budget

    def describe(self) -> str:
        budget = f" of {self.budget / GIB:.1f} GiB ({self.budget_source})" if self.budget else ""
        return (f"{self.peak / GIB:.2f} GiB{budget}: micro-batch {self.micro_batch_size} x "
                f"{self.accumulation_steps} = {self.sequences} sequences; resident {self.resident / GIB:.2f} GiB, "
                f"{self.per_sequence / GIB:.3f} GiB a sequence")


def device_budget(device: str) -> tuple[int | None, str]:
    """(free memory of the device in bytes, where that number came from); None where the device is not here."""
    import torch
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None, "no CUDA device here"
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free), "free on the device"
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        return available, "available RAM"
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "available RAM"


def plan_memory(model: ModelConfig, comp: Compression, *, device: str, batch_size: int, world_size: int = 1,
                micro_batch_size: int | None = None, memory_gib: float | None = None,
                assume_missing_gpu: bool = False) -> MemoryPlan:
    """The step's memory and its micro-batch: `micro_batch_size` if given, else the largest divisor of this
    process's share of the batch whose peak fits the budget (`memory_gib`, else the device's free memory).
    Raises InputError, in one line, when the given or the smallest micro-batch does not fit."""
    if memory_gib is not None:
        budget, source = int(memory_gib * GIB), "--device-memory"
    else:
        budget, source = device_budget(device)
        if budget is None and assume_missing_gpu:
            budget, source = int(ASSUMED_GPU_GIB * GIB), f"assumed: {source}"
    terms = step_bytes(model, comp, autocast=device.startswith("cuda"), world_size=world_size)
    per_sequence = model.context * (terms["per_token"] + terms["loss_per_token"])
    sequences = batch_size // world_size

    def at(micro: int) -> MemoryPlan:
        return MemoryPlan(terms["resident"], terms["per_pass"], per_sequence, terms["accumulation"], micro, sequences,
                          budget, source)
    if micro_batch_size is not None:
        plan = at(min(micro_batch_size, sequences))
    else:
        plan = next((at(m) for m in range(sequences, 0, -1) if sequences % m == 0 and at(m).fits), at(1))
    if not plan.fits:
        raise InputError(f"{comp.label} at {model.n_layer}x{model.n_embd} (context {model.context}) does not fit: "
                         f"{plan.describe()}; the plan keeps {1 - HEADROOM:.0%} free. Give a smaller "
                         "--micro-batch-size, more processes, or a larger --device-memory")
    return plan
