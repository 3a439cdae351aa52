"""Where does the Gaussian assumption break? A format's error on a trained model's own tensors.

For each compressed layer of a checkpoint: the relative MSE of a format on the trained weights (per output
row) and on the layer's input activations recorded on validation text (per token), with and without the
layer's Hadamard rotation, next to the format's Gaussian MSE at the same row length. A ratio near 1 means
the capacity predicted from GMSE applies to that tensor; outlier rows, unrotated activations and sparse
masks show up as ratios well above 1.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from capscale import capacity
from capscale.capacity.structure import Hadamard, fwht

from .data import load_tokens, validation_batches
from .layers import CompressedLinear
from .model import Decoder, ModelConfig
from .train import TrainConfig, load_state


def load_checkpoint(path: "str | Path") -> tuple[Decoder, TrainConfig]:
    """The trained model and its config, from a checkpoint written by `capscale train --checkpoint`."""
    state = load_state(path)
    cfg = TrainConfig.from_flat(**{k: v for k, v in state["settings"].items() if k not in ("device", "compile")})
    model = Decoder(ModelConfig(**state["model_config"]), cfg.compression)
    model.load_state_dict(state["model"])
    return model.eval(), cfg


def _relative_mse_by_row(fmt: capacity.Format, v: torch.Tensor) -> torch.Tensor:
    rows = v.reshape(-1, v.shape[-1]).float()
    return ((fmt(rows) - rows) ** 2).sum(-1) / (rows ** 2).sum(-1).clamp_min(1e-30)


@torch.inference_mode()
def diagnose(checkpoint: "str | Path", spec: str | None = None, eval_tokens: int = 4096,
             samples: int = 1 << 18) -> pd.DataFrame:
    """One row per (layer, tensor, rotation): relative MSE of `spec` (default: the run's own weight format) on the
    trained tensor, mean and worst row, and the Gaussian MSE at the same row length."""
    model, cfg = load_checkpoint(checkpoint)
    spec = spec or (cfg.compression.w_format if cfg.compression.w_fmt is not None else None)
    if spec is None or capacity.is_uncompressed(spec):
        raise capacity.InputError("the run trained uncompressed: name a format to diagnose with --format SPEC")
    fmt = capacity.parse(spec)
    inputs: dict[str, list] = {}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, CompressedLinear)}
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, []).append(args[0]))
             for name, m in layers.items()]
    data = load_tokens(cfg.data, cfg.vocab_size)
    for x, y in validation_batches(data.val, cfg.context, eval_tokens, 8):
        model(x, y)
    for h in hooks:
        h.remove()
    gaussian = {}
    rows = []
    for name, layer in layers.items():
        width = layer.weight.shape[1]
        if width not in gaussian:
            gaussian[width] = capacity.gmse(fmt, samples=samples, row_length=width).gmse
        block = layer.hadamard_block or Hadamard().block_for(width)
        tensors = {"weight": layer.weight.detach(), "activation": torch.cat([t.reshape(-1, width) for t in inputs[name]])}
        for tensor, v in tensors.items():
            for rotated in (False, True):
                err = _relative_mse_by_row(fmt, fwht(v, block) if rotated else v)
                rows.append({"layer": name, "tensor": tensor, "rows": err.numel(), "row_length": width,
                             "rotation": block if rotated else 0, "trained_with": layer.hadamard_block,
                             "rel_mse": float(err.mean()), "worst_row": float(err.max()),
                             "gaussian_gmse": gaussian[width], "ratio": float(err.mean()) / gaussian[width]})
    return pd.DataFrame(rows)
