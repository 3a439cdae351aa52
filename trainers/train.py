"""Train one model over a format and return its run record (the run-table schema plus metadata).

AdamW (0.9, 0.95, eps 1e-8, weight decay 0.1), warm-up then cosine to 10% (`schedule`: capscale's linear
warm-up, or QuEST's OneCycle), gradient clip 1.0, bf16 autocast on CUDA and fp32 on CPU. Each step's batch (`batch_size` sequences over all processes) is split
into micro-batches whose gradients accumulate, so the recipe is independent of device memory; the micro-batch
is planned before anything runs (`memory.plan_memory`). A NaN/inf loss stops the run as `diverged`. With a
checkpoint path the run saves its state every `checkpoint_every` steps and resumes from it after an
interruption. Under `torchrun` (WORLD_SIZE > 1) every rank draws the same global batch and trains on its
share through DistributedDataParallel (gloo on CPU, nccl on CUDA): the same run as a single process. The
ranks reduce each step's loss together, so they agree on a non-finite one and stop together.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pickle
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from capscale import capacity
from capscale.capacity.paths import atomic_write
from capscale.capacity.provenance import package_version
from capscale.capacity.runtable import finished_keys, require_run_table

from .runlog import append_record, claim, set_aside

from .config import TrainConfig
from .data import BYTE_VOCAB, epoch_batch, load_tokens, random_batch, validation_batches
from .memory import MemoryPlan, plan_memory
from .compress import compressed_decoder

__all__ = ["TrainConfig", "train", "train_or_fail", "train_and_record", "memory_plan"]


def _lr_at(step: int, total: int, peak: float, warmup: float, schedule: str = "cosine", whole: bool = False) -> float:
    """The learning rate of a step: a pure function of the step, so a resumed run needs no scheduler state.
    `whole`: the warm-up is a whole number of steps, int(warmup x total) (QuEST's ITERATIONS // 10)."""
    if schedule == "onecycle":  # torch's OneCycleLR as QuEST configures it (cosine both ways, 1% -> 100% -> 10%)
        rise_end, fall_end = (int(warmup * total) if whole else warmup * total) - 1, total - 1
        if rise_end > 0 and step <= rise_end:
            start, end, pct = peak / 100, peak, step / rise_end
        else:  # runs too short for a warm-up step start at the peak
            rise_end = max(rise_end, 0.0)
            start, end, pct = peak, peak / 10, (step - rise_end) / max(fall_end - rise_end, 1.0)
        return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)
    warm = max(1, int(warmup * total))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model, lr, weight_decay, rule):
    decay, no_decay = model.decayed_parameters(rule)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8)


def memory_plan(cfg: TrainConfig, world_size: int = 1, assume_missing_gpu: bool = False) -> MemoryPlan:
    """The memory plan of a run (raises InputError when it cannot fit), from its settings alone."""
    model = cfg.model_config(cfg.vocab_size or BYTE_VOCAB)
    return plan_memory(model, cfg.compression, device=cfg.device, batch_size=cfg.resolved_batch_size(),
                       world_size=world_size, micro_batch_size=cfg.micro_batch_size, memory_gib=cfg.memory,
                       assume_missing_gpu=assume_missing_gpu)


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


def _step(forward, ddp, x, y, micro: int, device: str) -> torch.Tensor:
    """Forward and backward over one process's share of the batch in micro-batches (gradients all-reduced on the
    last one only, under DDP); the mean loss over every process's tokens, reduced across the ranks so that a NaN
    on any rank is a NaN on all."""
    chunks = list(zip(x.split(micro), y.split(micro)))
    total = torch.zeros((), device=x.device)
    for i, (xs, ys) in enumerate(chunks):
        sync = ddp.no_sync() if ddp is not None and i < len(chunks) - 1 else contextlib.nullcontext()
        with sync, _autocast(device):
            loss = forward(xs, ys) * (xs.shape[0] / x.shape[0])  # the chunk's share of the process's mean
        loss.backward()
        total += loss.detach().float()
    if ddp is not None:
        dist.all_reduce(total)
        total /= dist.get_world_size()
    return total


def require_device(device: str) -> None:
    """Refuse, before any work (and so before any record), a device this machine does not have."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise capacity.InputError(f"--device {device}: no CUDA device on this machine (train on --device cpu, "
                                      "or plan the run with --plan / sweep --dry-run)")
        index = device.partition(":")[2] or os.environ.get("LOCAL_RANK", "0")
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise capacity.InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device != "cpu":
        raise capacity.InputError(f"--device {device!r}: expected cpu, cuda or cuda:K")


TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _warn_compiled_nvfp4_on_cuda(cfg: TrainConfig) -> None:
    """What capscale's one GPU check saw, said where it applies (tests/test_cuda.py)."""
    if cfg.compile and cfg.device.startswith("cuda") and "fp4" in cfg.compression.to_record()["format"]:
        warnings.warn("compiled FP4 training on CUDA is unverified: in capscale's one GPU check (an H200, torch 2.11, "
                      "tests/test_cuda.py) a compiled nvfp4/nvfp4 run ended at loss 3.07 where the eager run ended at "
                      "2.47 (on the CPU they agree); compare with an eager run before trusting it", stacklevel=2)


def launch_world() -> tuple[int, int]:
    """(processes, this one's rank) of the launch: WORLD_SIZE > 1 only under torchrun, which sets its companions; a
    stray WORLD_SIZE is refused in one line rather than failing the run inside the process group."""
    try:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        raise capacity.InputError("WORLD_SIZE and RANK must be whole numbers (torchrun sets them)") from None
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if world > 1 and missing:
        raise capacity.InputError(f"WORLD_SIZE={world} is set but {', '.join(missing)} are not: this is not a torchrun "
                                  "launch; unset WORLD_SIZE, or launch with torchrun --nproc-per-node N")
    if world < 1 or not 0 <= rank < world:
        raise capacity.InputError(f"WORLD_SIZE={world}, RANK={rank}: expected 0 <= RANK < WORLD_SIZE")
    return world, rank


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Train one model; return its run record. Raises on bad input (a run that cannot fit included); the caller
    records crashes."""
    world, rank = launch_world()
    device = cfg.device
    require_device(device)
    _warn_compiled_nvfp4_on_cuda(cfg)
    batch = cfg.resolved_batch_size()
    if batch % world:
        raise capacity.InputError(f"batch size {batch} is not divisible by the {world} processes")
    plan = memory_plan(cfg, world)  # before any work: a run that cannot fit is refused here
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    data = load_tokens(cfg.data, cfg.vocab_size)
    steps = cfg.steps()
    model, optimizer, gen = _fresh(cfg, data.vocab_size, device)
    start_step, ckpt = 0, Path(cfg.checkpoint) if cfg.checkpoint else None
    saved = checkpoint_state(ckpt) if ckpt else None
    if saved is not None:
        start_step = _resume(saved, ckpt, cfg, steps, model, optimizer, gen)
        if start_step is None:  # refused and moved aside: start again from scratch, untouched by it
            model, optimizer, gen = _fresh(cfg, data.vocab_size, device)
            start_step = 0
    n_params = model.cfg.non_embedding_params
    lr = cfg.resolved_lr(n_params)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    step_fn = torch.compile(net) if cfg.compile else net

    status, train_loss, started = "ok", float("nan"), time.perf_counter()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(range(start_step, steps), disable=not progress or rank != 0, leave=False,
               desc=f"{cfg.compression.label} N={n_params} D={steps * batch * cfg.context}")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, cfg.warmup, cfg.schedule, cfg.step_rounding == "quest")
        if cfg.sampling == "epochs":
            x, y = epoch_batch(data.train, batch, cfg.context, step, cfg.seed if cfg.data_seed is None else cfg.data_seed)
        else:
            x, y = random_batch(data.train, batch, cfg.context, gen)
        x, y = x[rank::world].to(device), y[rank::world].to(device)
        loss = _step(step_fn, net if world > 1 else None, x, y, plan.micro_batch_size, device)
        if not torch.isfinite(loss):  # the same verdict on every rank: the loss was reduced across them
            status = "diverged"
            break
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = float(loss)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{train_loss:.3f}")
        if ckpt and rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps):
            save_checkpoint(ckpt, cfg, model, optimizer, gen, step + 1)
    wall = time.perf_counter() - started
    measured_peak = torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None  # training only
    val_loss = evaluate(model, data, cfg, device) if status == "ok" else float("nan")
    if status == "ok" and not math.isfinite(val_loss):
        status = "diverged"
    trained = (steps - start_step) * batch * cfg.context
    mcfg = model.cfg
    requested = {"requested_params": cfg.params} if cfg.n_layer is None else {}
    return run_record(cfg, status, params=n_params, **requested, tokens=steps * batch * cfg.context, loss=val_loss,
                      train_loss=train_loss, n_layer=mcfg.n_layer, n_head=mcfg.n_head, n_embd=mcfg.n_embd,
                      mlp_hidden=mcfg.mlp_hidden, hadamard_blocks=model.hadamard_blocks(), context=cfg.context,
                      batch_size=batch, micro_batch_size=plan.micro_batch_size, lr=lr, steps=steps,
                      wall_time_s=round(wall, 3), tokens_per_s=round(trained / max(wall, 1e-9), 1),
                      planned_peak_gib=round(plan.peak / 2 ** 30, 3),
                      measured_peak_gib=None if measured_peak is None else round(measured_peak / 2 ** 30, 3),
                      resumed_from_step=start_step, device=str(device), world_size=world,
                      threads=torch.get_num_threads() if not str(device).startswith("cuda") else None,
                      torch_version=torch.__version__, data=data.name, data_bytes=data.n_bytes,
                      data_sha256=data.sha256, data_passes=round(data.passes(steps * batch * cfg.context), 3))


def _fresh(cfg: TrainConfig, vocab_size: int, device: str):
    """The run's model, optimizer and batch-order generator at step 0, from its seed."""
    torch.manual_seed(cfg.seed)
    model = compressed_decoder(cfg.model_config(vocab_size), cfg.compression).to(device)
    lr = cfg.resolved_lr(model.cfg.non_embedding_params)
    return model, _optimizer(model, lr, cfg.weight_decay, cfg.decay), torch.Generator().manual_seed(cfg.seed)


def checkpoint_state(path: Path) -> dict | None:
    """The state at a checkpoint path capscale may write: None where there is none yet, else a checkpoint `capscale
    train` wrote (this run's, or another's, which `_resume` moves aside), read once; never a folder, a symlink, a
    device, or a user's file (left untouched, refused)."""
    if path.is_symlink():
        raise capacity.InputError(f"--checkpoint {path}: is a symbolic link; capscale never writes through one")
    if not path.exists():
        return None
    if not path.is_file():
        raise capacity.InputError(f"--checkpoint {path}: exists and is not a regular file (a folder, a device?)")
    try:
        return load_state(path)
    except capacity.InputError:
        raise capacity.InputError(f"--checkpoint {path}: exists and is not a capscale checkpoint; it is left untouched "
                                  "(name another path, or remove it)") from None


def _resume(state: dict, ckpt: Path, cfg: TrainConfig, steps: int, model, optimizer, gen) -> int | None:
    """The step to resume from, after loading the checkpoint's state into the run; None (the checkpoint moved
    aside with a warning) when it is not this run's: of another run's settings, a step outside the run, or tensors
    that do not fit its model."""
    try:
        key = state.get("key")
        if key != cfg.key():
            raise capacity.InputError(f"it is of another run (key {str(key)[:16]!r}, this run's is {cfg.key()})")
        step = state["step"]
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= steps:
            raise capacity.InputError(f"its step {step!r} is not one of this run's 0..{steps}")
        expected = {k: v.shape for k, v in model.state_dict().items()}
        if not isinstance(state["model"], dict) or {k: getattr(v, "shape", None) for k, v in state["model"].items()} != expected:
            raise capacity.InputError("its tensors are not this run's model")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"].cpu())
        return step
    except (capacity.InputError, KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        set_aside(ckpt, f"not a checkpoint of this run ({err}); training from scratch")
        return None


def train_or_fail(cfg: TrainConfig, progress: bool = True) -> dict:
    """Train, and record a crash as a result too: the run's `failed` record, with the error and the config to
    retry it (a later sweep does). Bad input, a run that cannot fit, and interruptions raise instead."""
    try:
        return train(cfg, progress=progress)
    except (KeyboardInterrupt, capacity.InputError):
        raise
    except Exception as err:
        return failed_record(cfg, err)


def train_and_record(cfg: TrainConfig, runs: "str | Path", progress: bool = True) -> dict | None:
    """Train a run and append its record to the table `runs`; None, without training, if the run already finished
    there or another live process has claimed it. A crash is recorded as failed (a later sweep retries it); bad
    input raises. Under torchrun every rank trains and rank 0 writes."""
    key, distributed = cfg.key(), launch_world()[0] > 1
    require_device(cfg.device)
    require_run_table(runs)
    if key in finished_keys(runs):
        return None
    held = None if distributed else claim(runs, key)
    if held is None and not distributed:
        return None
    try:
        if key in finished_keys(runs):  # finished by another process while this one was claiming it
            return None
        record = train_or_fail(cfg, progress=progress)
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
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, AttributeError, ImportError) as err:
        # torch's own message would suggest weights_only=False, which runs the file's code: never shown
        raise capacity.InputError(f"{path}: not a loadable capscale checkpoint ({type(err).__name__}: a damaged "
                                  "file, or one holding more than tensors and plain values)") from None
    if not isinstance(state, dict) or not {"model", "step", "settings", "model_config"} <= set(state):
        raise capacity.InputError(f"{path}: not a capscale checkpoint (written by an older version, or not by "
                                  "`capscale train --checkpoint`)")
    return state


def save_checkpoint(path: Path, cfg: TrainConfig, model, optimizer, gen, step: int) -> None:
    """Tensors and plain values only (loadable with weights_only=True): the state to resume from, and the run's
    settings and shape to rebuild the model from (`capscale diagnose`)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": gen.get_state(),
             "step": step, "key": cfg.key(), "settings": flat_settings(cfg),
             "model_config": dataclasses.asdict(model.cfg)}
    atomic_write(path, lambda f: torch.save(state, f))


def flat_settings(cfg: TrainConfig) -> dict:
    """The config as one flat mapping of plain values, the inverse of TrainConfig.from_flat."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "compression"}
    return {**config, **cfg.compression.settings()}


def run_record(cfg: TrainConfig, status: str, **measured) -> dict:
    """The one writer of a run's record: schema columns, the compression settings, what was measured."""
    model = {f: getattr(cfg, f) for f in ("tie_embeddings", "init", "norm_eps", "mlp_multiple", "decay", "schedule")}
    return {**cfg.compression.to_record(), "params": cfg.params, "tokens": cfg.tokens, "loss": float("nan"),
            "status": status, "seed": cfg.seed, **model, **measured, "capscale_version": package_version(),
            "key": cfg.key()}


def failed_record(cfg: TrainConfig, error: BaseException) -> dict:
    """The record of a run that crashed: status=failed, the error, and the config to retry it."""
    return run_record(cfg, "failed", error=f"{type(error).__name__}: {error}", config=flat_settings(cfg))
