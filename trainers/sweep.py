"""Sweeps: a grid of sizes x tokens-per-parameter x formats x seeds, written into one run table.

A sweep file is TOML:

    runs = "runs.jsonl"                 # the run table (JSON lines), inside the sweep file's folder
    sizes = [10_000, 20_000, 40_000]    # target non-embedding parameters, or instead explicit shapes:
    # shapes = [{n_layer = 6, n_head = 5, n_embd = 640, lr = 1.2e-3}]
    tokens_per_param = [50, 100]
    seeds = [0]
    formats = [{w = "bf16"}, {w = "int4"}, {w = "int4", a = "int4"}, {w = "int4", a = "int4", bwd = "int8"}]
    # backward-pass formats: g (dL/dY), gw (W for dL/dX), gx (X for dL/dW), or bwd = all three; per GEMM: dgrad,
    # wgrad; or a named recipe: recipe = "nvidia-nvfp4" (`capscale recipes`)
    [train]                             # any training setting (TrainConfig or Compression field), for every run
    context = 128

Runs are identified by a content key (TrainConfig.key): finished runs (ok or diverged) are skipped, a
run interrupted mid-way resumes from its checkpoint, and failed runs are tried again. Each run is claimed
before training, so concurrent sweeps on one table (sharded or not) never train a run twice; records are
appended under a file lock, one per attempt, so workers and crashes never lose or duplicate one.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from datetime import datetime, timezone
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from capscale.capacity import InputError, is_uncompressed, load_plugin
from capscale.capacity.paths import atomic_write, read_small_text
from capscale.capacity.provenance import package_version
from capscale.capacity.spec import loaded_plugins
from capscale.capacity.runtable import finished_keys, read_records, require_run_table

from .runlog import held_elsewhere, set_aside

from .data import CORPORA
from .config import TrainConfig
from .memory import GIB, device_budget
from .model import count_non_embedding, flops_per_token
from .threads import default_threads, free_cores
from .train import memory_plan, train_and_record

GPU_TFLOPS = 300.0  # assumed sustained bf16 model TFLOP/s of one GPU for --dry-run (an H100/H200 at ~35-40% MFU)


def estimated_seconds(cfg: TrainConfig, gpu_tflops: float = GPU_TFLOPS) -> float:
    """A --dry-run estimate. CPU: the reference 2-core machine's throughput (2 threads, fp32, context 128),
    tokens/s ~ 1.3e4 (N/1e6)^-0.8 capped at 1.2e5, compressed formats ~1.2x slower. CUDA: model FLOPs at
    `gpu_tflops`, compressed formats ~1.3x slower (their quantizers are elementwise, not matmuls)."""
    dense = cfg.compression.w_fmt is None and cfg.compression.a_fmt is None
    if cfg.device.startswith("cuda"):
        flops = flops_per_token(cfg.model_config(cfg.vocab_size or 256)) * cfg.tokens
        return flops / (gpu_tflops * 1e12) * (1.0 if dense else 1.3) + 30.0
    rate = min(1.2e5, 1.3e4 * (cfg.params / 1e6) ** -0.8)
    return cfg.tokens / rate * (1.0 if dense else 1.2) + 2.0


@dataclass
class Sweep:
    runs: Path
    configs: list[TrainConfig]

    def pending(self) -> list[TrainConfig]:
        done = finished_keys(self.runs)
        return [c for c in self.configs if c.key() not in done]

    def checkpoint_for(self, cfg: TrainConfig) -> str:
        return str(self.runs.parent / f"{self.runs.name}.checkpoints" / f"{cfg.key()}.pt")


def load_sweep(path: "str | Path", shard: str | None = None, runs: "str | Path | None" = None,
               folder: "str | Path | None" = None) -> Sweep:
    """The sweep's runs and their table: `runs` if given (the user's own choice of path), else the file's `runs`,
    which must stay inside `folder` (default: the sweep file's own; a shared sweep file cannot direct writes
    elsewhere). A sweep file shipped inside the package writes into the working directory instead."""
    path = Path(path)
    folder = Path(folder) if folder is not None else path.parent
    text = read_small_text(path, MAX_SWEEP_FILE_BYTES, "sweep file")
    try:
        spec = tomllib.loads(text)
    except RecursionError:
        raise InputError(f"{path}: nested too deeply to be a sweep file") from None
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise InputError(f"{path}: cannot read sweep file: {err}") from None
    for key in ("tokens_per_param", "formats"):
        if key not in spec:
            raise InputError(f"{path}: missing '{key}' (see `capscale sweep --help`)")
    if ("sizes" in spec) == ("shapes" in spec):
        raise InputError(f"{path}: give either 'sizes' (target parameters) or 'shapes' (n_layer, n_head, n_embd)")
    _check_lists(path, spec)
    planned = (len(spec.get("sizes", [])) + len(spec.get("shapes", []))) * len(spec["tokens_per_param"]) \
        * len(spec["formats"]) * len(spec.get("seeds", [0]))
    if planned > MAX_SWEEP_RUNS:
        raise InputError(f"{path}: its grid has {planned:,} runs; a sweep file holds at most {MAX_SWEEP_RUNS:,} (split "
                         "it, or shard it with --shard)")
    overrides = dict(spec.get("train", {}))
    data_path = overrides.get("data")
    if isinstance(data_path, str) and data_path not in CORPORA:
        # read beside the sweep file, as its run table is; the string stays as written where it already names that
        # file from here (so the runs' keys do not move), else it becomes the path from here
        beside = (folder / data_path).resolve()
        if not beside.is_relative_to(folder.resolve()):
            raise InputError(f"{path}: [train] data = {data_path!r} is outside the sweep file's folder {folder}; a "
                             f"sweep file trains on a named corpus ({', '.join(CORPORA)}) or on files beside it (give "
                             "other data on the command line: capscale train --data)")
        if Path(data_path).resolve() != beside:
            overrides["data"] = os.path.relpath(beside)
    models = [{"params": int(size)} for size in spec.get("sizes", [])]
    for shape in spec.get("shapes", []):  # an explicit shape, with its own settings (a published lr, say)
        multiple = {**overrides, **shape}.get("mlp_multiple", 0)
        models.append({**shape, "params": count_non_embedding(shape["n_layer"], shape["n_embd"], multiple)})
    configs = []
    for model in models:
        for tpp in spec["tokens_per_param"]:
            for fmt in spec["formats"]:
                if "w" not in fmt and "a" not in fmt and "recipe" not in fmt:
                    raise InputError(f"{path}: format entry {fmt} needs w = SPEC and/or a = SPEC, or recipe = NAME")
                backward = {f"{k}_format": fmt.get(k, fmt.get("bwd")) for k in ("g", "gw", "gx")}
                backward |= {f"{k}_format": fmt[k] for k in ("dgrad", "wgrad") if k in fmt}
                backward |= {"recipe": fmt["recipe"]} if "recipe" in fmt else {}
                for seed in spec.get("seeds", [0]):
                    try:
                        configs.append(TrainConfig.from_flat(**{**overrides, **model, "w_format": fmt.get("w"),
                                                                "a_format": fmt.get("a"), **backward,
                                                                "tokens": int(model["params"] * tpp),
                                                                "seed": int(seed)}))
                    except InputError as err:
                        raise InputError(f"{path}: {err}") from None
    if shard:
        try:
            index, count = (int(v) for v in shard.split("/"))
            assert 0 <= index < count
        except (ValueError, AssertionError):
            raise InputError(f"--shard must be i/n with 0 <= i < n, got {shard!r}") from None
        configs = configs[index::count]
    if runs is None:
        runs = folder / spec.get("runs", "runs.jsonl")
        if not runs.resolve().is_relative_to(folder.resolve()) or runs.is_symlink():
            where = "the sweep file's folder" if folder == path.parent else str(folder)
            raise InputError(f"{path}: runs = {spec.get('runs')!r} is outside {where}; a sweep file writes only "
                             "beside itself (give another place with --output)")
    runs = Path(runs)
    if runs.is_dir() or not runs.name:
        raise InputError(f"{path}: runs = {str(runs)!r} names a folder; expected a run table file (.jsonl)")
    for side, kind in ((Path(f"{runs}.checkpoints"), "folder"), (runs.with_name(runs.name + ".meta.json"), "file")):
        if side.is_symlink() or side.exists() and not (side.is_dir() if kind == "folder" else side.is_file()):
            raise InputError(f"{side}: the sweep's own {kind} is {'a symbolic link' if side.is_symlink() else 'not a ' + kind}"
                             "; capscale never writes through one (remove it)")
    require_run_table(runs)
    return Sweep(runs, configs)


MAX_SWEEP_RUNS = 100_000  # runs one sweep file may plan: checked before any config is built
MAX_SWEEP_FILE_BYTES = 1 << 20

FORMAT_KEYS = ("w", "a", "g", "gw", "gx", "bwd", "dgrad", "wgrad", "recipe")  # a format entry: forward specs,
# backward specs per operand (bwd: all three) or per GEMM (dgrad, wgrad), or a named recipe


def _check_lists(path: Path, spec: dict) -> None:
    """The sweep file's values have the types and ranges a grid needs, before any config is built."""
    def positive(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 1 <= v < 1e13
    expected = {"sizes": (positive, "target parameter counts >= 1"),
                "tokens_per_param": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e9,
                                     "positive numbers"),
                "seeds": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "whole numbers >= 0"),
                "formats": (lambda v: isinstance(v, dict) and set(v) <= set(FORMAT_KEYS) and v and
                            all(isinstance(s, str) for s in v.values()),
                            "tables {w = SPEC, a = SPEC} (backward pass: g, gw, gx = SPEC, or bwd = SPEC for all three, "
                            "or dgrad, wgrad = SPEC per GEMM; or recipe = NAME)"),
                "shapes": (lambda v: isinstance(v, dict) and all(isinstance(v.get(k), int) and v[k] >= 1
                                                                 for k in ("n_layer", "n_head", "n_embd")),
                           "tables with n_layer, n_head, n_embd >= 1")}
    for key, (ok, what) in expected.items():
        values = spec.get(key, [])
        if not isinstance(values, list) or not values and key in spec or not all(ok(v) for v in values):
            raise InputError(f"{path}: '{key}' must be a non-empty list of {what}, got {values!r}")
    if not isinstance(spec.get("train", {}), dict):
        raise InputError(f"{path}: [train] must be a table of training settings, got {spec['train']!r}")
    if not isinstance(spec.get("runs", "runs.jsonl"), str):
        raise InputError(f"{path}: runs must be a file name, got {spec['runs']!r}")


def _run_one(job) -> tuple[str, str]:
    """Train one run unless it finished or is claimed elsewhere: (its key, its status or 'skipped')."""
    cfg, runs, checkpoint, threads, plugins = job
    torch.set_num_threads(threads)
    for module in plugins:  # a spawned worker loads the plugins its parent's user asked for
        load_plugin(module)
    record = train_and_record(dataclasses.replace(cfg, checkpoint=checkpoint), runs, progress=False)
    if record is None:
        return cfg.key(), "skipped"
    Path(checkpoint).unlink(missing_ok=True)
    return cfg.key(), record["status"]


def refuse_unfit(configs: list[TrainConfig], workers: int = 1) -> tuple[list[TrainConfig], list[str]]:
    """(the runs whose memory plan fits, one line for each that does not): checked before anything trains, so
    a run that cannot fit is neither started nor recorded as failed (and retried) by every sweep."""
    fitting, refused = [], []
    share = device_budget("cpu")[0] / GIB / workers if workers > 1 else None  # CPU workers share the machine's memory
    for cfg in configs:
        if share is not None and cfg.memory is None and not cfg.device.startswith("cuda"):
            cfg = dataclasses.replace(cfg, memory=share)
        try:
            memory_plan(cfg)
            fitting.append(cfg)
        except InputError as err:
            refused.append(f"refused, N~{cfg.params:,} D={cfg.tokens:,} seed {cfg.seed}: {err}")
    return fitting, refused


def run_sweep(sweep: Sweep, workers: int = 1, threads: int | None = None, progress: bool = True,
              poll_s: float = 5.0) -> int:
    """Run the pending runs of a sweep, longest first so that parallel workers finish together; returns how many
    this process trained. Runs whose memory plan does not fit are refused, each with a line on stderr. Runs
    claimed by a concurrent sweep are skipped, then waited for: one whose owner dies (or whose claim turns out to
    belong to another process) is taken over, so a sweep never ends with a run stranded by a claim."""
    todo, refused = refuse_unfit(sorted(sweep.pending(), key=estimated_seconds, reverse=True), workers)
    for line in refused:
        print(line, file=sys.stderr)
    cores = max(1, free_cores() // workers)
    ran, waited = 0, False
    while todo:
        statuses = _train_all(sweep, todo, workers, threads, cores, progress)
        ran += sum(s != "skipped" for s in statuses.values())
        finished = finished_keys(sweep.runs)
        # every run skipped for another's claim stays: its owner may have died since (then it is taken over)
        todo = [c for c in todo if c.key() not in finished and statuses[c.key()] == "skipped"]
        while todo and all(held_elsewhere(sweep.runs, c.key()) for c in todo):
            if not waited:
                print(f"waiting for {len(todo)} run(s) claimed by another process", file=sys.stderr)
                waited = True
            time.sleep(poll_s)
            finished = finished_keys(sweep.runs)
            todo = [c for c in todo if c.key() not in finished]
    try:  # tidy: left only while it holds something (a claim's release removes an empty claims folder)
        os.rmdir(f"{sweep.runs}.checkpoints")
    except OSError:
        pass
    return ran


def _train_all(sweep: Sweep, todo: list[TrainConfig], workers: int, threads: int | None, cores: int,
               progress: bool) -> dict[str, str]:
    """Each run's status by key ('skipped': finished or claimed elsewhere). Threads per worker: `threads` if
    given, else what each run's model may take of its `cores`."""
    jobs = [(c, sweep.runs, sweep.checkpoint_for(c), threads or default_threads(c.params, cores), loaded_plugins())
            for c in todo]
    bar = tqdm(total=len(jobs), disable=not progress, desc=f"sweep -> {sweep.runs.name}", unit="run",
               file=sys.stderr)
    statuses = {}
    if workers <= 1:
        for job in jobs:
            bar.set_postfix_str(f"{job[0].compression.label} N={job[0].params}")
            key, status = _run_one(job)
            statuses[key] = status
            bar.update()
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            for key, status in pool.imap_unordered(_run_one, jobs):
                statuses[key] = status
                bar.update()
    bar.close()
    return statuses


def measured_throughput(records: list[dict]):
    """tokens/s as a power law in N, fitted to the table's own finished runs (this machine, these workers):
    a function of a config, or None with fewer than 2 sizes measured. Compressed formats are fitted apart
    from uncompressed ones where both were measured."""
    ok = [r for r in records if r.get("status") == "ok" and isinstance(r.get("tokens_per_s"), (int, float))
          and r["tokens_per_s"] > 0 and isinstance(r.get("params"), (int, float)) and r["params"] > 0]
    fits = {}
    for dense in (True, False):
        group = [r for r in ok if (is_uncompressed(r.get("w_format")) and is_uncompressed(r.get("a_format"))) == dense]
        if len({r["params"] for r in group}) >= 2:
            fits[dense] = np.polyfit(np.log([r["params"] for r in group]), np.log([r["tokens_per_s"] for r in group]), 1)
    if not fits:
        return None

    def rate(cfg: TrainConfig) -> float:
        dense = cfg.compression.w_fmt is None and cfg.compression.a_fmt is None
        slope, icpt = fits.get(dense, fits.get(not dense))
        return float(np.exp(icpt + slope * np.log(cfg.params)))
    return rate


def describe_plan(sweep: Sweep, workers: int = 1) -> str:
    """The dry run: per pending run, its memory plan (or why it does not fit), steps, FLOPs and time (from the
    throughput the table's finished runs measured, where it holds runs of 2 sizes)."""
    todo = sweep.pending()
    rate = measured_throughput(read_records(sweep.runs)) if sweep.runs.exists() else None
    gpu = any(c.device.startswith("cuda") for c in todo)

    def seconds_of(c: TrainConfig) -> float:
        return c.tokens / rate(c) + 2.0 if rate is not None and not c.device.startswith("cuda") else estimated_seconds(c)
    seconds = sum(seconds_of(c) for c in todo) / max(1, workers)
    basis = (f"model FLOPs at {GPU_TFLOPS:g} TFLOP/s per GPU, compressed formats 1.3x slower (an assumption, "
             "not a measurement: benchmarks/gpu_check.sh measures it)" if gpu else
             "the throughput this table's finished runs measured, a power law in N" if rate is not None else
             "the reference 2-core CPU's throughput (no runs of 2 sizes in the table to measure it from)")
    lines = [f"{len(sweep.configs)} runs in the grid, {len(sweep.configs) - len(todo)} done, {len(todo)} to run "
             f"-> {sweep.runs}", f"estimated time with {workers} worker(s): {seconds / 3600:.2f} h ({basis})",
             "memory: peak per process of the planned step (micro-batch x accumulation = sequences per step)"]
    for c in todo:
        try:
            memory = memory_plan(c, assume_missing_gpu=True).describe()
        except InputError as err:
            memory = f"DOES NOT FIT: {err}"
        model = c.model_config(c.vocab_size or 256)
        steps = c.steps()
        flops = flops_per_token(model) * steps * c.resolved_batch_size() * c.context
        lines.append(f"  {c.compression.label:>24}  N~{c.params:>11,}  D={c.tokens:>14,}  seed {c.seed}  "
                     f"{steps:>6,} steps  {flops:.2e} FLOPs  ~{seconds_of(c) / 3600:.2f} h  {memory}")
    return "\n".join(lines)


def log_session(sweep: Sweep, command: str, started: float, finished: float, ran: int) -> Path:
    """Append this sitting (command, versions, machine, wall time) to `<runs>.meta.json` beside the run table."""
    path = sweep.runs.with_name(sweep.runs.name + ".meta.json")
    meta = {"run_table": sweep.runs.name, "sessions": []}
    if path.exists():
        try:
            meta = json.loads(path.read_text())
            assert isinstance(meta, dict) and isinstance(meta.get("sessions"), list)
        except (OSError, ValueError, RecursionError, AssertionError):
            set_aside(path, "not a sweep log capscale can read")
            meta = {"run_table": sweep.runs.name, "sessions": []}
    iso = lambda t: datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")  # noqa: E731
    meta["sessions"].append({"command": command, "started": iso(started), "finished": iso(finished),
                             "wall_time_s": round(finished - started, 1), "runs_ran": ran,
                             "capscale_version": package_version(), "torch_version": torch.__version__,
                             "python": platform.python_version(), "machine": f"{platform.machine()}, "
                             f"{os.cpu_count()} cores, {platform.system()}"})
    meta["runs_in_table"] = len(read_records(sweep.runs))
    atomic_write(path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return path
