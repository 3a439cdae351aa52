"""Is the Gaussian assumption right for the real tensors of any model? Each linear weight of a checkpoint on disk
(a safetensors file, a Hugging Face folder of them, or a torch state dict) against a format's GMSE.

Tensors are read one at a time (safetensors and torch files memory-mapped) and compressed a block of rows at a
time, so a checkpoint never needs its size in memory. Per linear weight (a 2-D `*.weight`, embeddings and the
output head aside, as the recipe leaves them uncompressed) and format: the relative MSE per row, mean and worst,
against the format's GMSE at that row length, with and without a Hadamard rotation of up to 128 along the row,
and the outlier share (|w| > 6 x the row's RMS).
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import torch

from capscale import capacity
from capscale.capacity.paths import read_small_text, regular_file, save_figure
from capscale.capacity.structure import fwht

BLOCK_ENTRIES = 1 << 22   # entries compressed at once (whole rows, at least one): bounds the memory of the copies
MAX_CONFIG_BYTES = 1 << 20
# not a block's linear: an embedding or a norm anywhere in the path, or an output head as the whole path's last part
# (BERT's `attention.output.dense` and `output.dense` are linears: `output` only counts as the final part)
NOT_LINEAR = re.compile(r"(^|\.)(embed\w*|wte|wpe|norm\w*|ln_\w+)(\.|$)|(^|\.)(lm_head|head|output)$")
CONV1D_NAMES = re.compile(r"(^|\.)(c_attn|c_fc|c_proj)$")  # GPT-2's Conv1D layers, stored (in, out)
OUTLIER_RMS = 6.0
TRANSPOSED_MODELS = ("gpt2",)  # Hugging Face model types whose linear weights are stored (in, out) (Conv1D)


def _model_type(config: Path) -> "str | None":
    """A Hugging Face config's model_type, read only from a small, flat enough, regular file."""
    if not config.exists():
        return None
    text = read_small_text(config, MAX_CONFIG_BYTES, "config.json")
    try:
        model_type = json.loads(text).get("model_type")
    except (ValueError, AttributeError, RecursionError):
        raise capacity.InputError(f"{config}: not a readable config.json (a JSON object)") from None
    return model_type if isinstance(model_type, str) else None


def _files(path: Path) -> tuple[list[Path], bool]:
    """The tensor files of a checkpoint and whether its weights are stored (in, out)."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
        if not files:
            raise capacity.InputError(f"{path}: no .safetensors or pytorch_model*.bin files in this folder")
        return [regular_file(f, "tensor file") for f in files], _model_type(path / "config.json") in TRANSPOSED_MODELS
    return [regular_file(path, "checkpoint file or folder")], False


def _tensors(files: list[Path]) -> Iterator[tuple[str, tuple, Callable[[], torch.Tensor]]]:
    """(name, shape, load) one tensor at a time: a safetensors tensor is read only when loaded, so one that is
    refused by its shape never is; only plain tensors are ever unpickled (weights_only)."""
    from safetensors import SafetensorError, safe_open

    def read(file: Path, name: str) -> torch.Tensor:
        with safe_open(str(file), framework="pt") as f:  # opened per tensor: the map, and the pages it touched, go
            return f.get_tensor(name)

    for file in files:
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt") as f:
                    shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
                for name, shape in shapes.items():
                    yield name, shape, functools.partial(read, file, name)
            except (SafetensorError, OSError) as err:
                raise capacity.InputError(f"{file}: not a readable safetensors file ({err})") from None
            continue
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001  torch raises many types; its advice (weights_only=False) is never shown
            raise capacity.InputError(f"{file}: not a loadable state dict ({type(err).__name__})") from None
        state = state.get("model", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise capacity.InputError(f"{file}: not a state dict (a mapping of names to tensors)")
        for name, tensor in state.items():
            if isinstance(tensor, torch.Tensor):
                yield str(name), tuple(tensor.shape), (lambda tensor=tensor: tensor)


def is_linear_weight(name: str, shape: "tuple | torch.Size") -> bool:
    return len(shape) == 2 and name.endswith("weight") and not NOT_LINEAR.search(name.removesuffix(".weight"))


@functools.lru_cache(maxsize=None)
def gaussian_gmse(spec: str, width: int, samples: int) -> float:
    """A format's GMSE at a row length, what a tensor's error is compared with: once per spec and width."""
    return capacity.gmse(spec, samples=samples, row_length=width).gmse


def _row_blocks(weight: torch.Tensor) -> Iterator[torch.Tensor]:
    """Whole rows of `weight` in fp32, about BLOCK_ENTRIES entries at a time."""
    step = max(1, BLOCK_ENTRIES // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], step):
        yield weight[start:start + step].float()


def _outlier_share(weight: torch.Tensor) -> float:
    """The share of entries beyond OUTLIER_RMS times their row's RMS, a block of rows at a time."""
    count = 0
    for rows in _row_blocks(weight):
        count += int((rows.abs() > OUTLIER_RMS * rows.pow(2).mean(-1, keepdim=True).sqrt()).sum())
    return count / weight.numel()


def row_relative_mse(fmt: capacity.Format, weight: torch.Tensor, block: int = 0) -> torch.Tensor:
    """Relative MSE of each row of `weight` (rotated by a `block` Hadamard first when block > 0), a block of rows
    at a time."""
    out = []
    for rows in _row_blocks(weight):
        rows = fwht(rows, block) if block else rows
        out.append(((fmt(rows) - rows) ** 2).sum(-1) / (rows ** 2).sum(-1).clamp_min(1e-30))
    return torch.cat(out)


def diagnose_weights(path: "str | Path", specs: list[str], samples: int = 1 << 18, max_block: int = 128,
                     progress: bool = True) -> pd.DataFrame:
    """One row per (linear weight, format, rotation): its shape, relative MSE (mean over rows and worst row),
    the format's GMSE at the same row length, their ratio, and the weight's outlier share."""
    from tqdm.auto import tqdm
    files, transposed = _files(Path(path))
    formats = {spec: capacity.parse(spec) for spec in specs}
    rows = []
    for name, shape, load in tqdm(_tensors(files), desc="weights", unit=" tensors", disable=not progress, leave=False):
        if not is_linear_weight(name, shape):
            continue
        # (in, out) storage: a GPT-2 config says so; without one (a lone file) GPT-2's Conv1D names do
        conv1d = transposed or CONV1D_NAMES.search(name.removesuffix(".weight")) is not None
        width = shape[0] if conv1d else shape[1]
        if 0 in shape:
            raise capacity.InputError(f"{path}: tensor {name} has shape {shape}: no entries to measure")
        if width > capacity.MAX_ROW_LENGTH:  # refused from the file's header, before the tensor is read
            raise capacity.InputError(f"{path}: tensor {name} has rows of {width:,} entries; GMSE is measured on "
                                      f"rows of at most {capacity.MAX_ROW_LENGTH:,}")
        weight = load().t() if conv1d else load()
        outliers = _outlier_share(weight)
        block = min(max_block, width & -width)
        for spec, fmt in formats.items():
            for rotation in (0, block):
                try:
                    err = row_relative_mse(fmt, weight, rotation)
                except capacity.InputError as problem:  # e.g. a row length the format's groups do not divide
                    rows.append({"layer": name, "shape": tuple(weight.shape), "format": spec, "rotation": rotation,
                                 "note": str(problem)})
                    continue
                g = gaussian_gmse(spec, width, samples)
                rows.append({"layer": name, "shape": tuple(weight.shape), "format": spec, "rotation": rotation,
                             "rel_mse": float(err.mean()), "worst_row": float(err.max()), "gaussian_gmse": g,
                             "ratio": float(err.mean()) / g if g else float("nan"), "outlier_share": outliers})
    if not rows:
        raise capacity.InputError(f"{path}: no linear weights (2-D *.weight tensors outside embeddings and heads)")
    return pd.DataFrame(rows)


def layer_kind(name: str) -> str:
    """A layer's type from its name, the layer index dropped: `model.layers.3.mlp.down_proj.weight` -> `mlp.down_proj`."""
    parts = [p for p in name.removesuffix(".weight").split(".") if not p.isdigit()]
    return ".".join(parts[-2:])


def plot_ratios(table: pd.DataFrame, path: "str | Path") -> Path:
    """Relative MSE over GMSE per layer, grouped by layer type, one panel per rotation: a figure file."""
    import matplotlib
    matplotlib.use("Agg")
    import seaborn as sns
    data = table.dropna(subset=["ratio"]).assign(kind=lambda d: d["layer"].map(layer_kind),
                                                 rotated=lambda d: d["rotation"].map(lambda b: "Hadamard-rotated" if b else "unrotated"))
    grid = sns.catplot(data=data, x="kind", y="ratio", hue="format", col="rotated", kind="strip", height=4,
                       aspect=1.4, dodge=True)
    grid.set_axis_labels("layer type", "relative MSE / Gaussian MSE")
    for ax in grid.axes.flat:
        ax.axhline(1.0, color="grey", lw=1, ls="--")
        ax.tick_params(axis="x", rotation=30)
    return save_figure(grid.figure, path, dpi=110)


@torch.inference_mode()
def diagnose_activations(folder: "str | Path", specs: list[str], calibration: "str | Path", tokens: int = 4096,
                         context: int = 256, samples: int = 1 << 18, max_block: int = 128) -> pd.DataFrame:
    """The same table for each linear layer's input activations (per token), recorded while a Hugging Face model
    folder (its weights and tokenizer, read locally, never downloaded) runs on the text in `calibration`."""
    try:
        import transformers
    except ImportError:
        raise capacity.InputError("--calibration runs the Hugging Face model: pip install transformers") from None
    folder, calibration = Path(folder), Path(calibration)
    if not calibration.is_file():
        raise capacity.InputError(f"--calibration {calibration}: not a text file")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise capacity.InputError(f"{folder}: not a Hugging Face model folder with its tokenizer "
                                  f"({str(err).splitlines()[0][:200]})") from None
    ids = tokenizer(calibration.read_text(errors="replace"), return_tensors="pt")["input_ids"][0][:tokens]
    if len(ids) < 2:
        raise capacity.InputError(f"--calibration {calibration}: too little text")
    recorded: dict[str, list] = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: recorded.setdefault(name, []).append(
                 args[0].detach().reshape(-1, args[0].shape[-1])))
             for name, module in model.named_modules()
             if getattr(module, "weight", None) is not None and is_linear_weight(f"{name}.weight", module.weight.shape)]
    model.eval()
    for start in range(0, len(ids), context):
        model(input_ids=ids[start:start + context][None])
    for hook in hooks:
        hook.remove()
    formats = {spec: capacity.parse(spec) for spec in specs}
    rows = []
    for name, chunks in recorded.items():
        acts = torch.cat(chunks)
        width = acts.shape[1]
        block = min(max_block, width & -width)
        outliers = _outlier_share(acts)
        for spec, fmt in formats.items():
            g = gaussian_gmse(spec, width, samples)
            for rotation in (0, block):
                err = row_relative_mse(fmt, acts, rotation)
                rows.append({"layer": f"{name} (input)", "shape": tuple(acts.shape), "format": spec,
                             "rotation": rotation, "rel_mse": float(err.mean()), "worst_row": float(err.max()),
                             "gaussian_gmse": g, "ratio": float(err.mean()) / g if g else float("nan"),
                             "outlier_share": outliers})
    return pd.DataFrame(rows)
