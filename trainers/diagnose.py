"""Where does the Gaussian assumption break? A format's error on a trained model's own tensors.

For each compressed layer of a checkpoint: the relative MSE of a format on the trained weights (per output
row) and on the layer's input activations recorded on validation text (per token), with and without the
layer's Hadamard rotation, next to the format's Gaussian MSE at the same row length. A ratio near 1 means
the capacity predicted from GMSE applies to that tensor; outlier rows, unrotated activations and sparse
masks show up as ratios well above 1.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import torch

from capscale import capacity
from capscale.capacity.structure import Hadamard

from .data import load_tokens, validation_batches
from .layers import CompressedLinear
from .memory import GIB, HEADROOM, device_budget
from .compress import compressed_decoder
from .model import Decoder, ModelConfig
from .train import TrainConfig, load_state
from .weights import gaussian_gmse, row_relative_mse

MAX_VOCAB = 65536  # uint16 token ids


def load_checkpoint(path: "str | Path") -> tuple[Decoder, TrainConfig]:
    """The trained model and its config, from a checkpoint written by `capscale train --checkpoint`. The file is
    data: its settings pass the same checks as the command line's, its model must be the one they build and fit
    in memory, and its tensors must have that model's shapes; where it ran and on what data are not read."""
    state = load_state(path)
    settings, saved_model = state["settings"], state["model_config"]
    ignored = ("device", "compile", "data", "checkpoint", "memory")
    try:
        if not isinstance(settings, dict) or not isinstance(saved_model, dict):
            raise capacity.InputError("settings and model_config must be tables")
        cfg = TrainConfig.from_flat(**{k: v for k, v in settings.items() if k not in ignored})
        vocab = saved_model.get("vocab_size")
        if not isinstance(vocab, int) or isinstance(vocab, bool) or not 1 <= vocab <= MAX_VOCAB:
            raise capacity.InputError(f"vocab_size {vocab!r} is not in 1..{MAX_VOCAB}")
        model_cfg = cfg.model_config(vocab)
    except (capacity.InputError, TypeError) as err:
        raise capacity.InputError(f"{path}: its settings are not valid: {err}") from None
    if dataclasses.asdict(model_cfg) != saved_model:
        raise capacity.InputError(f"{path}: its model_config is not the model its settings build")
    need, (available, _) = parameter_bytes(model_cfg), device_budget("cpu")
    if available is not None and need > HEADROOM * available:
        raise capacity.InputError(f"{path}: its model needs {need / GIB:.1f} GiB, more than the "
                                  f"{available / GIB:.1f} GiB available")
    model = compressed_decoder(model_cfg, cfg.compression)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tensors = state["model"]
    if not isinstance(tensors, dict) or {k: getattr(v, "shape", None) for k, v in tensors.items()} != expected:
        raise capacity.InputError(f"{path}: its tensors are not the shapes of the model its settings build")
    model.load_state_dict(tensors)
    return model.eval(), cfg


def is_capscale_checkpoint(path: "str | Path") -> bool:
    """Whether `path` is a checkpoint `capscale train --checkpoint` wrote (a torch file with its settings)."""
    path = Path(path)
    if not path.is_file() or path.suffix == ".safetensors":
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  not loadable as a capscale checkpoint: load_state says why if it is asked
        return path.suffix == ".pt"
    return isinstance(state, dict) and "settings" in state and "model_config" in state


def parameter_bytes(cfg: ModelConfig) -> int:
    """fp32 bytes of a model's parameters (what building it allocates)."""
    return 4 * cfg.n_params


@torch.inference_mode()
def diagnose(checkpoint: "str | Path", spec: "str | list[str] | None" = None, eval_tokens: int = 4096,
             samples: int = 1 << 18, data: "str | Path | None" = None) -> pd.DataFrame:
    """One row per (layer, tensor, format, rotation): relative MSE of each format of `spec` (one spec or several;
    default: the run's own weight format) on the trained tensor, mean and worst row, and the Gaussian MSE at the
    same row length. The model is loaded and its activations recorded once, on `data` (default: the installed
    corpus), the caller's choice, never a path the checkpoint names."""
    model, cfg = load_checkpoint(checkpoint)
    specs = [spec] if isinstance(spec, str) else list(spec or [])
    specs = specs or ([cfg.compression.w_format] if cfg.compression.w_fmt is not None else [])
    if not specs or any(capacity.is_uncompressed(s) for s in specs):
        raise capacity.InputError("the run trained uncompressed: name a format to diagnose with --format SPEC")
    formats = {s: capacity.parse(s) for s in specs}
    inputs: dict[str, list] = {}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, CompressedLinear)}
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, []).append(args[0]))
             for name, m in layers.items()]
    tokens = load_tokens(data, model.cfg.vocab_size)
    if int(tokens.val.max(initial=0)) >= model.cfg.vocab_size:
        raise capacity.InputError(f"{tokens.source}: token ids beyond the model's vocabulary ({model.cfg.vocab_size})")
    for x, y in validation_batches(tokens.val, cfg.context, eval_tokens, 8):
        model(x, y)
    for h in hooks:
        h.remove()
    rows = []
    for name, layer in layers.items():
        width = layer.weight.shape[1]
        block = layer.hadamard_block or Hadamard().block_for(width)
        tensors = {"weight": layer.weight.detach(), "activation": torch.cat([t.reshape(-1, width) for t in inputs[name]])}
        for spec, fmt in formats.items():
            gaussian = gaussian_gmse(spec, width, samples)
            for tensor, v in tensors.items():
                for rotated in (False, True):
                    err = row_relative_mse(fmt, v, block if rotated else 0)
                    rows.append({"layer": name, "tensor": tensor, "format": spec, "rows": err.numel(),
                                 "row_length": width, "rotation": block if rotated else 0,
                                 "trained_with": layer.hadamard_block, "rel_mse": float(err.mean()),
                                 "worst_row": float(err.max()), "gaussian_gmse": gaussian,
                                 "ratio": float(err.mean()) / gaussian})
    return pd.DataFrame(rows)
