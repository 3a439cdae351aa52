"""The settings of one training run: one dataclass, the single source of `capscale train`'s options, a sweep
file's [train] keys and a run's content key.

Adding a setting means adding a field here with its help text (and using it where it acts); the command-line
option, the sweep key and the run record follow from the field. `RESULT_FIELDS` are the settings that decide
a run's result and so enter its key; the rest say where and how fast it runs (device, memory, micro-batches:
accumulated micro-batches give the same gradients as one pass, to float rounding).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import dataclass, field, fields

from capscale import capacity

from .compression_config import Compression
from .model import ModelConfig, config_for_params
from .recorded_before import RECORDED_BEFORE

DECAY_RULES = ("matrices", "linear")
EXACT_PARAMS_TOLERANCE = 0.05
SCHEDULES = ("cosine", "onecycle")
SAMPLINGS = ("random", "epochs")
STEP_ROUNDINGS = ("ceil", "quest")


def _option(help: str, **argparse_kwargs) -> dict:
    return {"help": help, **argparse_kwargs}


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("", "auto", "none") else int(text)


@dataclass
class TrainConfig:
    compression: Compression = field(default_factory=Compression)
    params: int = field(default=20_000, metadata=_option(
        "target non-embedding parameters (the model built and recorded is the closest shape; see `n_layer`)", type=int))
    exact_params: bool = field(default=False, metadata=_option(
        "refuse to train when no shape is within 5% of --params (default: train the closest shape and say so)",
        action="store_true"))
    n_layer: int | None = field(default=None, metadata=_option(
        "an explicit shape instead of --params: give all of --n-layer, --n-head, --n-embd", type=int))
    n_head: int | None = field(default=None, metadata=_option("attention heads of an explicit shape", type=int))
    n_embd: int | None = field(default=None, metadata=_option("width of an explicit shape", type=int))
    tokens: int = field(default=200_000, metadata=_option("training tokens (rounded up to whole steps)", type=int))
    seed: int = field(default=0, metadata=_option("seed of the init and of the batch order", type=int))
    context: int = field(default=128, metadata=_option("sequence length in tokens", type=int))
    batch_size: int | None = field(default=None, metadata=_option(
        "sequences per optimizer step, over all processes (default by model size: 16 below 1M parameters, 32 "
        "below 30M, else 64)", type=int))
    micro_batch_size: int | None = field(default=None, metadata=_option(
        "sequences per forward/backward pass on one process; the step accumulates gradients over "
        "micro-batches, so the recipe does not depend on device memory (default: the largest that fits --device-memory)",
        type=_optional_int))
    lr: float | None = field(default=None, metadata=_option(
        "peak learning rate (default: 3e-3 x (N / 1e6)^-0.2, at most 6e-3)", type=float))
    warmup: float = field(default=0.1, metadata=_option("warm-up, as a fraction of the steps", type=float))
    schedule: str = field(default="cosine", metadata=_option(
        "learning-rate schedule: `cosine`, linear warm-up from 0 then cosine to 10% of the peak; `onecycle`, QuEST's "
        "(torch's OneCycleLR, div_factor 100, final_div_factor 0.1): cosine warm-up from 1% of the peak, then cosine "
        "to 10%", choices=SCHEDULES))
    weight_decay: float = field(default=0.1, metadata=_option("AdamW weight decay", type=float))
    decay: str = field(default="matrices", metadata=_option(
        "which parameters are decayed: every matrix (embedding and head included) or only the linear weights "
        "inside the blocks (QuEST)", choices=DECAY_RULES))
    grad_clip: float = field(default=1.0, metadata=_option("gradient-norm clip", type=float))
    eval_tokens: int = field(default=65_536, metadata=_option(
        "validation tokens of the final evaluation; 0: the whole held-out split", type=int))
    sampling: str = field(default="random", metadata=_option(
        "training windows: `random` (starts drawn with replacement from the batch-order generator) or `epochs` "
        "(QuEST's: windows at multiples of the context, each once per epoch, shuffled per epoch by --data-seed)",
        choices=SAMPLINGS))
    data_seed: int | None = field(default=None, metadata=_option(
        "seed of the epochs' shuffles (QuEST: 1337, apart from the model seed; default: the run's seed)",
        type=_optional_int))
    step_rounding: str = field(default="ceil", metadata=_option(
        "steps from the token budget: `ceil` (whole steps covering it, warm-up a fraction of them) or `quest` "
        "(QuEST's train.sh: TOKENS // tokens-per-step steps, warm-up steps // 10 for warmup 0.1)",
        choices=STEP_ROUNDINGS))
    data: str | None = field(default=None, metadata=_option(
        "text file or folder, or uint16 token shards (.bin, or a folder with train.bin and val.bin; give "
        "--vocab-size) (default: the installed KJV corpus)"))
    vocab_size: int | None = field(default=None, metadata=_option(
        "vocabulary of token shards (text is read as bytes: 256)", type=int))
    tie_embeddings: bool = field(default=True, metadata=_option(
        "share the input embedding with the output head (QuEST: untied)", action=argparse.BooleanOptionalAction))
    init: str = field(default="fan_in", metadata=_option(
        "weight init: fan_in^-1/2 (capscale's small models) or QuEST's N(0, 0.02) with the residual output "
        "projections at 0.02 / sqrt(2 n_layer)", choices=ModelConfig.INITS))
    norm_eps: float = field(default=1e-6, metadata=_option("RMSNorm epsilon (QuEST: 1e-5)", type=float))
    mlp_multiple: int = field(default=0, metadata=_option(
        "SwiGLU hidden width: int(8 d / 3) rounded up to this multiple (QuEST: 256); 0: 8 d / 3 rounded up to "
        "the width's power-of-two factor (at most 128)", type=int))
    device: str = field(default="cpu", metadata=_option("cpu, cuda or cuda:K"))
    memory: float | None = field(default=None, metadata=_option(
        "memory budget per process in GiB for the micro-batch choice (default: the device's free memory; a sweep "
        "file's key: memory)", flag="--device-memory", metavar="GIB",
        type=float))
    compile: bool = field(default=False, metadata=_option("torch.compile the model", action="store_true"))
    checkpoint: str | None = field(default=None, metadata=_option(
        "checkpoint path: saved every --checkpoint-every steps, resumed from if present"))
    checkpoint_every: int = field(default=100, metadata=_option("steps between checkpoints", type=int))

    # The settings that decide a run's result (with the compression settings); the rest say where and how it runs.
    RESULT_FIELDS = ("params", "n_layer", "n_head", "n_embd", "tokens", "seed", "context", "batch_size", "lr",
                     "warmup", "schedule", "weight_decay", "grad_clip", "eval_tokens", "data", "vocab_size", "decay",
                     "tie_embeddings", "init", "norm_eps", "mlp_multiple", "sampling", "data_seed", "step_rounding")

    # Whole-number settings and their bounds: past these the work or memory would not be finite in practice.
    BOUNDS = {"params": (1, 10 ** 12), "tokens": (1, 10 ** 14), "context": (2, 1 << 16), "eval_tokens": (0, 1 << 30),
              "checkpoint_every": (1, 1 << 40), "seed": (0, 2 ** 63 - 1), "mlp_multiple": (0, 1 << 16),
              "data_seed": (0, 2 ** 63 - 1),
              "batch_size": (1, 1 << 20), "micro_batch_size": (1, 1 << 20), "n_layer": (1, 1024),
              "n_head": (1, 1 << 16), "n_embd": (1, 1 << 16), "vocab_size": (1, 65536)}
    REQUIRED_WHOLE = ("params", "tokens", "context", "eval_tokens", "checkpoint_every", "seed", "mlp_multiple")

    def __post_init__(self):
        """Every setting checked before any work: one clear error instead of a late traceback or a silent default."""
        def need(ok: bool, name: str, expected: str):
            if not ok:
                raise capacity.InputError(f"{name}: expected {expected}, got {getattr(self, name)!r}")
        whole = lambda v, least, most: isinstance(v, int) and not isinstance(v, bool) and least <= v <= most  # noqa: E731
        real = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        for name, (least, most) in self.BOUNDS.items():
            value = getattr(self, name)
            if value is not None or name in self.REQUIRED_WHOLE:
                need(whole(value, least, most), name, f"a whole number in {least}..{most:,}")
        need(self.lr is None or real(self.lr) and self.lr > 0, "lr", "a positive learning rate")
        need(real(self.warmup) and 0 <= self.warmup < 1, "warmup", "a fraction in [0, 1)")
        need(real(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(self.decay in DECAY_RULES, "decay", f"one of {', '.join(DECAY_RULES)}")
        need(self.schedule in SCHEDULES, "schedule", f"one of {', '.join(SCHEDULES)}")
        need(self.sampling in SAMPLINGS, "sampling", f"one of {', '.join(SAMPLINGS)}")
        need(self.step_rounding in STEP_ROUNDINGS, "step_rounding", f"one of {', '.join(STEP_ROUNDINGS)}")
        need(real(self.grad_clip) and self.grad_clip > 0, "grad_clip", "a positive number")
        need(real(self.norm_eps) and self.norm_eps > 0, "norm_eps", "a positive number")
        need(self.init in ModelConfig.INITS, "init", f"one of {', '.join(ModelConfig.INITS)}")
        need(isinstance(self.tie_embeddings, bool), "tie_embeddings", "true or false")
        need(self.memory is None or real(self.memory) and self.memory > 0, "memory", "a positive number of GiB")
        need(isinstance(self.compression, Compression), "compression", "a Compression")
        need(self.data is None or isinstance(self.data, str), "data", "a path")

    def model_config(self, vocab_size: int) -> ModelConfig:
        model = {"vocab_size": vocab_size, "context": self.context, "tie_embeddings": self.tie_embeddings,
                 "init": self.init, "norm_eps": self.norm_eps, "mlp_multiple": self.mlp_multiple}
        shape = (self.n_layer, self.n_head, self.n_embd)
        if any(v is not None for v in shape):
            if None in shape:
                raise capacity.InputError("an explicit shape needs all of n_layer, n_head and n_embd")
            return ModelConfig(*shape, **model)
        chosen = config_for_params(self.params, **model)
        if self.exact_params:
            trained = chosen.non_embedding_params
            if abs(trained / self.params - 1) > EXACT_PARAMS_TOLERANCE:
                raise capacity.InputError(
                    f"--exact-params: no shape has within {EXACT_PARAMS_TOLERANCE:.0%} of {self.params:,} non-embedding "
                    f"parameters; the closest is {chosen.n_layer} layers x width {chosen.n_embd} with {trained:,} "
                    f"({trained / self.params - 1:+.1%}); ask for that, or give --n-layer/--n-head/--n-embd")
        return chosen

    @classmethod
    def from_flat(cls, **values) -> "TrainConfig":
        """A config from one flat mapping of fields and compression settings (a sweep's [train] table, a CLI)."""
        known = {f.name for f in fields(cls)} - {"compression"}
        if unknown := set(values) - known - Compression.names():
            raise capacity.InputError(f"unknown training setting(s) {sorted(unknown)}; known: "
                                      f"{sorted(known | Compression.names())}")
        return cls(compression=Compression(**{k: v for k, v in values.items() if k in Compression.names()}),
                   **{k: v for k, v in values.items() if k in known})

    def key(self) -> str:
        """Content key of the run: what determines its result (not where or how fast it runs)."""
        run = {f: getattr(self, f) for f in self.RESULT_FIELDS
               if f not in RECORDED_BEFORE or getattr(self, f) != RECORDED_BEFORE[f]}
        payload = {**self.compression.key_settings(), **run}
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def resolved_batch_size(self) -> int:
        """Fixed per model size, never per token budget: in a scaling study more tokens must mean more steps
        (a batch that grows with D confounds the D term with the batch size)."""
        if self.batch_size:
            return self.batch_size
        return 16 if self.params < 1e6 else 32 if self.params < 3e7 else 64

    def steps(self) -> int:
        """Optimizer steps: the token budget in whole steps of the batch (rounded up; QuEST's rounding: down)."""
        per_step = self.resolved_batch_size() * self.context
        if self.step_rounding == "quest":
            return max(1, self.tokens // per_step)
        return math.ceil(self.tokens / per_step)

    def resolved_lr(self, n_params: int) -> float:
        return self.lr if self.lr else min(6e-3, 3e-3 * (n_params / 1e6) ** -0.2)
