"""Train one model over a format and return its run record (the run-table schema plus metadata).

AdamW (0.9, 0.95, weight decay 0.1 on matrices), linear warm-up then cosine to 10%, gradient clip 1.0,
bf16 autocast on CUDA and fp32 on CPU. A NaN/inf loss stops the run as `diverged`. With a checkpoint
path the run saves its state every `checkpoint_every` steps and resumes from it after an interruption.
Under `torchrun` (WORLD_SIZE > 1) every rank draws the same global batch and trains on its slice
through DistributedDataParallel (gloo on CPU, nccl on CUDA): the same run as a single process.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import time
from dataclasses import dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from capscale import capacity
from capscale.capacity.paths import atomic_write
from capscale.capacity.runtable import append_record, claim, finished_keys

from .data import load_tokens, random_batch, validation_batches
from .compression import Compression
from .model import Decoder, ModelConfig, config_for_params


@dataclass
class TrainConfig:
    compression: Compression = field(default_factory=Compression)
    params: int = 20_000            # target non-embedding parameters (the exact count is recorded)
    n_layer: int | None = None      # an explicit shape (all three), e.g. a published one; default: the size helper
    n_head: int | None = None
    n_embd: int | None = None
    tokens: int = 200_000           # training tokens (rounded up to whole steps)
    seed: int = 0
    context: int = 128
    batch_size: int | None = None   # default by model size: 16 sequences below 1M parameters, 32 below 30M, else 64
    lr: float | None = None         # default: 3e-3 * (N / 1e6)^-0.2, at most 6e-3
    warmup: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_tokens: int = 65_536
    data: str | None = None         # text file or folder, or uint16 token shards (.bin); default: the KJV corpus
    vocab_size: int | None = None   # required for token shards; bytes have 256
    device: str = "cpu"
    compile: bool = False
    checkpoint: str | None = None
    checkpoint_every: int = 100

    def __post_init__(self):
        """Every setting checked before any work: one clear error instead of a late traceback or a silent default."""
        def need(ok: bool, name: str, expected: str):
            if not ok:
                raise capacity.InputError(f"{name}: expected {expected}, got {getattr(self, name)!r}")
        whole = lambda v, least: isinstance(v, int) and not isinstance(v, bool) and v >= least  # noqa: E731
        real = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        for name, least in (("params", 1), ("tokens", 1), ("context", 2), ("eval_tokens", 1), ("checkpoint_every", 1)):
            need(whole(getattr(self, name), least), name, f"a whole number >= {least}")
        need(whole(self.seed, 0), "seed", "a whole number >= 0")
        for name in ("batch_size", "n_layer", "n_head", "n_embd", "vocab_size"):
            need(getattr(self, name) is None or whole(getattr(self, name), 1), name, "a whole number >= 1")
        need(self.lr is None or real(self.lr) and self.lr > 0, "lr", "a positive learning rate")
        need(real(self.warmup) and 0 <= self.warmup < 1, "warmup", "a fraction in [0, 1)")
        need(real(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(real(self.grad_clip) and self.grad_clip > 0, "grad_clip", "a positive number")
        need(isinstance(self.compression, Compression), "compression", "a Compression")
        need(self.data is None or isinstance(self.data, str), "data", "a path")

    RUN_FIELDS = ("params", "n_layer", "n_head", "n_embd", "tokens", "seed", "context", "batch_size", "lr", "warmup",
                  "weight_decay", "grad_clip", "eval_tokens", "data", "vocab_size")  # with the compression settings:
    # what determines a run's result

    def model_config(self, vocab_size: int) -> ModelConfig:
        shape = (self.n_layer, self.n_head, self.n_embd)
        if any(v is not None for v in shape):
            if None in shape:
                raise capacity.InputError("an explicit shape needs all of n_layer, n_head and n_embd")
            return ModelConfig(*shape, vocab_size=vocab_size, context=self.context)
        return config_for_params(self.params, self.context, vocab_size)

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
        payload = {**self.compression.settings(), **{f: getattr(self, f) for f in self.RUN_FIELDS}}
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def resolved_batch_size(self) -> int:
        """Fixed per model size, never per token budget: in a scaling study more tokens must mean more steps
        (a batch that grows with D confounds the D term with the batch size)."""
        if self.batch_size:
            return self.batch_size
        return 16 if self.params < 1e6 else 32 if self.params < 3e7 else 64

    def resolved_lr(self, n_params: int) -> float:
        return self.lr if self.lr else min(6e-3, 3e-3 * (n_params / 1e6) ** -0.2)


def package_version() -> str:
    try:
        return version("capscale")
    except PackageNotFoundError:
        return "unknown"


def _lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    warm = max(1, int(warmup * total))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model, lr, weight_decay):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


@torch.inference_mode()
def evaluate(model, data, cfg: TrainConfig, device) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, y in validation_batches(data.val, cfg.context, cfg.eval_tokens, 32):
        with _autocast(device):
            loss = model(x.to(device), y.to(device))
        total, count = total + float(loss) * x.shape[0], count + x.shape[0]
    model.train()
    return total / count


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Train one model; return its run record. Raises on bad input; the caller records crashes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = cfg.device
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    data = load_tokens(cfg.data, cfg.vocab_size)
    model = Decoder(cfg.model_config(data.vocab_size), cfg.compression).to(device)
    n_params = model.non_embedding_params()
    batch, lr = cfg.resolved_batch_size(), cfg.resolved_lr(n_params)
    if batch % world:
        raise capacity.InputError(f"batch size {batch} is not divisible by the {world} processes")
    steps = math.ceil(cfg.tokens / (batch * cfg.context))
    optimizer = _optimizer(model, lr, cfg.weight_decay)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    step_fn = torch.compile(net) if cfg.compile else net
    gen = torch.Generator().manual_seed(cfg.seed)

    start_step, ckpt = 0, Path(cfg.checkpoint) if cfg.checkpoint else None
    if ckpt and ckpt.exists():
        state = load_state(ckpt, device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"].cpu())
        start_step = state["step"]

    status, train_loss, started = "ok", float("nan"), time.perf_counter()
    bar = tqdm(range(start_step, steps), disable=not progress or rank != 0, leave=False,
               desc=f"{cfg.compression.label} N={n_params} D={steps * batch * cfg.context}")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, cfg.warmup)
        x, y = random_batch(data.train, batch, cfg.context, gen)
        x, y = x[rank::world].to(device), y[rank::world].to(device)
        with _autocast(device):
            loss = step_fn(x, y)
        if not torch.isfinite(loss):
            status = "diverged"
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = float(loss.detach())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{train_loss:.3f}")
        if ckpt and rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps):
            save_checkpoint(ckpt, cfg, model, optimizer, gen, step + 1)
    wall = time.perf_counter() - started
    val_loss = evaluate(model, data, cfg, device) if status == "ok" else float("nan")
    if status == "ok" and not math.isfinite(val_loss):
        status = "diverged"
    trained = (steps - start_step) * batch * cfg.context
    mcfg = model.cfg
    return run_record(cfg, status, params=n_params, tokens=steps * batch * cfg.context, loss=val_loss,
                      train_loss=train_loss, n_layer=mcfg.n_layer, n_head=mcfg.n_head, n_embd=mcfg.n_embd,
                      mlp_hidden=mcfg.mlp_hidden, hadamard_blocks=model.hadamard_blocks(), context=cfg.context,
                      batch_size=batch, lr=lr, steps=steps, wall_time_s=round(wall, 3),
                      tokens_per_s=round(trained / max(wall, 1e-9), 1), resumed_from_step=start_step,
                      device=str(device), world_size=world, torch_version=torch.__version__,
                      data=Path(data.source).name)


def train_and_record(cfg: TrainConfig, runs: "str | Path", progress: bool = True) -> dict | None:
    """Train a run and append its record to the table `runs`; None, without training, if the run already finished
    there or another live process has claimed it. A crash is recorded as failed (a later sweep retries it); bad
    input raises. Under torchrun every rank trains and rank 0 writes."""
    key, distributed = cfg.key(), int(os.environ.get("WORLD_SIZE", "1")) > 1
    if key in finished_keys(runs):
        return None
    held = None if distributed else claim(runs, key)
    if held is None and not distributed:
        return None
    try:
        if key in finished_keys(runs):  # finished by another process while this one was claiming it
            return None
        try:
            record = train(cfg, progress=progress)
        except (KeyboardInterrupt, capacity.InputError):
            raise
        except Exception as err:  # a crash is a result too: recorded as failed, retried on the next sweep
            record = failed_record(cfg, err)
        if not distributed or dist.get_rank() == 0:
            append_record(runs, record)
        return record
    finally:
        if held is not None:
            held.release()


def load_state(path: "str | Path", device: str = "cpu") -> dict:
    """A checkpoint's contents: tensors and plain values only (weights_only), so a file carrying code fails here."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise capacity.InputError(f"{path}: not a loadable capscale checkpoint ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not {"model", "step", "settings", "model_config"} <= set(state):
        raise capacity.InputError(f"{path}: not a capscale checkpoint (written by an older version, or not by "
                                  "`capscale train --checkpoint`)")
    return state


def save_checkpoint(path: Path, cfg: TrainConfig, model, optimizer, gen, step: int) -> None:
    """Tensors and plain values only (loadable with weights_only=True): the state to resume from, and the run's
    settings and shape to rebuild the model from (`capscale diagnose`)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": gen.get_state(),
             "step": step, "settings": flat_settings(cfg), "model_config": dataclasses.asdict(model.cfg)}
    atomic_write(path, lambda f: torch.save(state, f))


def flat_settings(cfg: TrainConfig) -> dict:
    """The config as one flat mapping of plain values, the inverse of TrainConfig.from_flat."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "compression"}
    return {**config, **cfg.compression.settings()}


def run_record(cfg: TrainConfig, status: str, **measured) -> dict:
    """The one writer of a run's record: schema columns, the compression settings, what was measured."""
    return {**cfg.compression.to_record(), "params": cfg.params, "tokens": cfg.tokens, "loss": float("nan"),
            "status": status, "seed": cfg.seed, **measured, "capscale_version": package_version(), "key": cfg.key()}


def failed_record(cfg: TrainConfig, error: BaseException) -> dict:
    """The record of a run that crashed: status=failed, the error, and the config to retry it."""
    return run_record(cfg, "failed", error=f"{type(error).__name__}: {error}", config=flat_settings(cfg))
