"""Training commands: `capscale train`, `capscale sweep` and `capscale diagnose` (each imports what it runs)."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
import time
from dataclasses import MISSING, fields
from pathlib import Path

import torch

from capscale.capacity import InputError
from capscale.capacity.provenance import invoked_command
from capscale.trainers.compression_config import Compression
from capscale.trainers.config import TrainConfig
from capscale.trainers.threads import MAX_THREADS

from .options import renamed, whole
from capscale.capacity.paths import strict_json

from .output import emit_json, print_table


# How `capscale train --help` groups the settings (every TrainConfig field in exactly one group; a test checks it).
OPTION_GROUPS = {
    "the model": ("params", "exact_params", "n_layer", "n_head", "n_embd", "tie_embeddings", "init", "norm_eps",
                  "mlp_multiple", "context", "vocab_size"),
    "data and budget": ("tokens", "data", "eval_tokens", "seed", "sampling", "data_seed", "step_rounding"),
    "optimiser and schedule": ("batch_size", "lr", "warmup", "schedule", "weight_decay", "decay", "grad_clip"),
    "where and how it runs (not in the run's key)": ("device", "memory", "micro_batch_size", "compile", "checkpoint",
                                                     "checkpoint_every"),
}


def _add_field_options(cls, group_of) -> None:
    """One option per field of a settings dataclass, from the field's metadata (its help, argparse keywords, and
    `flag` where the option's name is not the field's): the dataclass is the single source, the command line
    only presents it."""
    for f in fields(cls):
        if f.name == "compression":
            continue
        default = f.default if f.default is not MISSING else None
        meta = dict(f.metadata)
        meta["help"] = re.sub(r"%(?!\()", "%%", meta["help"])  # a literal "10%" is not a format
        if default not in (None, False) and "default" not in meta["help"]:
            meta["help"] += " (default: %(default)s)"
        flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
        group_of(f.name).add_argument(flag, dest=f.name, default=default, **meta)


def add_train_options(parser) -> None:
    """Every training and compression setting as an option (--params, --w-format, ...), in the help's groups."""
    formats = parser.add_argument_group("formats and the training recipe")
    _add_field_options(Compression, lambda name: formats)
    groups = {}
    for title, names in OPTION_GROUPS.items():
        group = parser.add_argument_group(title)
        groups.update(dict.fromkeys(names, group))
    _add_field_options(TrainConfig, groups.__getitem__)


def train_config_from(args) -> TrainConfig:
    settings = {f.name: getattr(args, f.name) for cls in (TrainConfig, Compression) for f in fields(cls)
                if f.name != "compression" and hasattr(args, f.name)}
    return TrainConfig.from_flat(**settings)


def _say_shape(cfg: TrainConfig) -> None:
    """--params picks the closest shape: say which, and how far it is from the request, before training."""
    if cfg.n_layer is not None or os.environ.get("RANK", "0") != "0":
        return
    model = cfg.model_config(cfg.vocab_size or 256)
    trained = model.non_embedding_params
    print(f"--params {cfg.params:,}: training N = {trained:,} non-embedding parameters ({trained / cfg.params - 1:+.1%}), "
          f"the closest shape: {model.n_layer} layers, width {model.n_embd}, {model.n_head} heads", file=sys.stderr)


def _train_command(args) -> None:
    from capscale.capacity.runtable import require_run_table
    from capscale.trainers.train import memory_plan, require_device, train_and_record, train_or_fail
    from capscale.trainers.threads import default_threads
    for name in ("g_format", "gw_format", "gx_format"):  # --bwd-format: all three backward operands, unless given
        if args.bwd_format and getattr(args, name) is None:
            setattr(args, name, args.bwd_format)
    cfg = train_config_from(args)
    if args.threads or not cfg.device.startswith("cuda"):
        torch.set_num_threads(args.threads or default_threads(cfg.params))
    if args.plan:
        _say_shape(cfg)
        print(memory_plan(cfg, int(os.environ.get("WORLD_SIZE", "1")), assume_missing_gpu=True).describe())
        return
    require_device(cfg.device)  # refusals first: the shape line below is said only for a run that starts
    if args.output:
        require_run_table(args.output)
    _say_shape(cfg)
    if args.output:
        record = train_and_record(cfg, args.output, progress=not args.quiet)
        if record is None:
            print(f"run {cfg.key()} ({cfg.compression.label}, N={cfg.params}, D={cfg.tokens}, seed {cfg.seed}) has "
                  f"already finished in {args.output}, or another process is training it: nothing to do",
                  file=sys.stderr)
            return
    else:
        record = train_or_fail(cfg, progress=not args.quiet)
    if int(record.get("world_size", 1)) > 1 and torch.distributed.get_rank() != 0:
        return
    print(json.dumps(strict_json(record), allow_nan=False))  # a diverged run's NaN loss as null: strict JSON
    if args.output:
        print(f"run appended to {args.output}", file=sys.stderr)
    if record["status"] != "ok":
        sys.exit(1)


def _recipes_command(args) -> None:
    from capscale.trainers.recipes import recipe_table
    rows = recipe_table()
    if args.json:
        emit_json("recipes", rows)
        return
    for r in rows:
        print(f"{r['recipe']}\n  source:   {r['source']}\n  what:     {r['what']}\n  settings: {r['settings']}\n"
              f"  differs:  {r['differs']}\n")


def add_recipes_command(sub) -> None:
    p = sub.add_parser("recipes", help="the named training recipes (train --recipe NAME, compress_(recipe=NAME))",
                       description="Published low-precision training recipes by name: their sources, formats and "
                                   "settings, and where capscale's version differs from the published kernels.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_recipes_command)


def add_train_command(sub) -> None:
    p = sub.add_parser("train", help="train one model over a format and append its run record",
                       description="Train a Llama-style model whose linear layers pass weights (--w-format) and "
                                   "input activations (--a-format) through capscale formats; print the run record "
                                   "and append it to --output (JSON lines). Every training setting is an option "
                                   "below (the same names, with underscores, are a sweep file's [train] keys). "
                                   "Multi-GPU: torchrun --nproc-per-node K -m capscale train ... --device cuda")
    add_train_options(p)
    p.add_argument("--bwd-format", metavar="SPEC", default=None,
                   help="backward pass: one format for dL/dY and both re-quantized operands (sets --g-format, "
                        "--gw-format and --gx-format where they are not given)")
    p.add_argument("-o", "--output", metavar="RUNS", help="run table (JSON lines) to append the record to")
    renamed(p, "--runs", "-o/--output (the run table train appends to)")
    renamed(p, "--memory", "--device-memory (GiB per process)")
    p.add_argument("--plan", action="store_true", help="print the memory plan of the step and exit")
    p.add_argument("--threads", type=whole(1, MAX_THREADS), default=None, help="CPU threads (default: the cores not busy "
                   "with other work, at most 2 below 300k parameters and 4 below 5M)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_train_command)


def _sweep_command(args) -> None:
    from capscale.trainers.sweep import describe_plan, load_sweep, log_session, run_sweep
    path, folder = Path(args.sweep), None
    if not path.exists() and "/" not in args.sweep:  # a sweep file shipped inside the package, by name
        from capscale import data
        shipped = data.path(args.sweep if args.sweep.endswith(".toml") else args.sweep + ".toml")
        if shipped.is_file():
            path, folder = shipped, Path.cwd()
            print(f"the shipped sweep file {shipped} (its run table goes into this directory)", file=sys.stderr)
    sweep = load_sweep(path, args.shard, args.output, folder)
    if args.dry_run:
        print(describe_plan(sweep, args.workers))
        return
    started = time.time()
    ran = run_sweep(sweep, workers=args.workers, threads=args.threads)
    log = log_session(sweep, invoked_command(), started, time.time(), ran)
    print(f"ran {ran} run(s); run table: {sweep.runs} (sessions logged in {log.name})")
    if left := sweep.pending():
        print(f"{len(left)} run(s) not finished: failed, refused, or claimed by another live process that has not "
              f"finished them (claims in {sweep.runs.name}.claims/); rerun the sweep to retry them", file=sys.stderr)
        sys.exit(1)


SWEEP_FILE = """
The sweep file (TOML):
  runs = "runs.jsonl"                  # the run table, beside the sweep file
  sizes = [10_000, 20_000, 40_000]     # target non-embedding parameters; or instead
  # shapes = [{n_layer = 2, n_head = 4, n_embd = 32, lr = 3e-3}]   (each with its own settings)
  tokens_per_param = [25, 60, 150]
  seeds = [0, 1]
  formats = [{w = "bf16"}, {w = "int4"}, {w = "int4", a = "int4"},
             {w = "int4", a = "int4", bwd = "int8(rounding=stochastic)"}]
             # w, a: forward formats; g, gw, gx (or bwd for all three): backward formats
  [train]                              # any `capscale train` setting, underscores for dashes
  context = 128

Example Slurm array: #SBATCH --array=0-7 ; capscale sweep study --shard $SLURM_ARRAY_TASK_ID/8
"""


def add_sweep_command(sub) -> None:
    p = sub.add_parser("sweep", help="run a grid of trainings from a TOML sweep file (resumable)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=textwrap.fill(
                           "Run every pending run of a sweep file (sizes x tokens-per-parameter x formats x seeds). "
                           "Finished runs are skipped by content key, interrupted ones resume from checkpoints; "
                           "concurrent sweeps on one table never train a run twice.", 100) + "\n" + SWEEP_FILE)
    p.add_argument("sweep", help="sweep TOML file, or the name of one shipped in the package (study, demo_small, "
                                 "cpu_study, cpu_backward_study, gpu_study: `capscale data list`), whose run table then goes into the "
                                 "working directory")
    p.add_argument("--workers", type=whole(1), default=1, help="parallel training processes on this machine")
    p.add_argument("--threads", type=whole(1, MAX_THREADS), default=None, help="torch threads per worker (default: as `train` chooses, "
                   "within the free cores shared by the workers)")
    p.add_argument("-o", "--output", metavar="RUNS", default=None, help="run table to write (default: the sweep file's "
                                                                          "`runs`, which must be inside its folder)")
    renamed(p, "--runs", "-o/--output (the run table the sweep writes)")
    p.add_argument("--shard", default=None, help="i/n: run only every n-th run starting at i")
    p.add_argument("--dry-run", action="store_true",
                   help="print each pending run's memory plan (peak, micro-batch), steps, FLOPs and estimated time; "
                        "run nothing")
    p.set_defaults(func=_sweep_command)


def _diagnose_command(args) -> None:
    if args.figure:  # refused before any work: the figure's path follows capscale's rule for what it writes
        from capscale.capacity.paths import figure_file
        figure_file(args.figure)
    import pandas as pd
    from capscale.trainers.diagnose import diagnose, is_capscale_checkpoint
    from capscale.trainers.weights import diagnose_activations, diagnose_weights, plot_ratios
    if is_capscale_checkpoint(args.checkpoint):  # a model capscale can run: activations too
        table = diagnose(args.checkpoint, args.format, eval_tokens=args.eval_tokens, data=args.data)
    else:
        if not args.format:
            raise InputError(f"{args.checkpoint}: name the format(s) to diagnose its weights with: --format SPEC")
        table = diagnose_weights(args.checkpoint, args.format, progress=not args.json)
        if args.calibration:
            table = pd.concat([table, diagnose_activations(args.checkpoint, args.format, args.calibration,
                                                           tokens=args.eval_tokens)], ignore_index=True)
    if args.figure:
        print(f"figure written to {plot_ratios(table, args.figure)}", file=sys.stderr)
    emit_json("diagnose", table.to_dict("records")) if args.json else print_table(table)


def add_diagnose_command(sub) -> None:
    p = sub.add_parser("diagnose", help="a format's error on a trained model's own weights (and activations)",
                       description="Is the Gaussian assumption behind rho(GMSE) right for a model's real tensors? "
                                   "For each linear weight of a checkpoint (a safetensors file, a Hugging Face "
                                   "folder of them, a torch state dict, or a capscale checkpoint): the relative MSE "
                                   "of each format per row, mean and worst, next to its Gaussian MSE at the same "
                                   "row length, with and without Hadamard rotation, and the share of outliers "
                                   "(|w| > 6 row RMS). Tensors are read one at a time. A capscale checkpoint also "
                                   "gives the layers' input activations, recorded on validation text. Ratios far "
                                   "above 1 show where the Gaussian assumption breaks.")
    p.add_argument("checkpoint", help="safetensors file, Hugging Face model folder, torch state dict, or a checkpoint "
                                      "written by `capscale train --checkpoint PATH`")
    p.add_argument("--format", action="append", metavar="SPEC",
                   help="format to diagnose; repeat for several (default for a capscale checkpoint: its run's weights')")
    p.add_argument("--figure", metavar="PNG", help="also plot relative MSE / GMSE per layer, grouped by layer type")
    p.add_argument("--calibration", metavar="TEXTFILE", help="a Hugging Face model folder: also run the model (its "
                   "own tokenizer, read locally; needs transformers) on this text and diagnose each linear's inputs")
    p.add_argument("--eval-tokens", type=whole(1, 1 << 20), default=4096,
                   help="tokens whose activations are recorded (at most 2^20)")
    p.add_argument("--data", default=None, help="capscale checkpoints: text or token shards to record activations on "
                                                "(default: the installed corpus; never the path a checkpoint names)")
    p.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    p.set_defaults(func=_diagnose_command)


ADDERS = (add_train_command, add_sweep_command, add_diagnose_command, add_recipes_command)
