"""Put a format into any PyTorch model, in place: `compress_(model, "int4/int4")`, as torchao's `quantize_`.

Every matching linear layer (by default each nn.Linear, or GPT-2-style Conv1D, except the output head: the
model's `get_output_embeddings()`, a layer tied to an embedding, or one named lm_head/head/output; the recipe
keeps it in high precision) becomes a CompressedLinear over its
own weight and bias tensors: optimizer state, state dicts (same keys), torch.compile, DDP and FSDP see the
same parameters. Everything a format needs per step (its estimator's masks, sparse masks, rotations) happens
inside the module's forward and backward, so a training loop needs no other capscale call.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from capscale.capacity import InputError
from capscale.capacity.runtable import split_label

from capscale.capacity.provenance import package_version

from .compression_config import Compression
from .layers import CompressedLinear, SharedInput


def hf_conv1d() -> type | None:
    """transformers' own Conv1D type (GPT-2's layer: y = x W + b, W stored (in, out)) where transformers is already
    loaded, as it is for any model it built; None otherwise (capscale never imports it)."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D."""
    if isinstance(module, CompressedLinear):
        return False
    conv1d = hf_conv1d()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


HEAD_NAMES = ("lm_head", "head", "output", "output_layer")  # the usual names of an untied output head
# task heads (Hugging Face's names): a classifier, a score, a question-answering span head, a pooler
TASK_HEAD_NAMES = ("score", "classifier", "qa_outputs", "pooler", "cls", "pre_classifier")


def _heads(model: nn.Module) -> set[int]:
    """ids of the layers the recipe keeps uncompressed: the output embeddings (a Hugging Face model's
    `get_output_embeddings()`), layers whose weight is an embedding's (a tied head), layers named like a head or a
    task head (TASK_HEAD_NAMES, anywhere in their path), and any linear whose output width is the model's label count
    (`config.num_labels`)."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    config = getattr(model, "config", None)
    labels = getattr(config, "num_labels", None) if config is not None and getattr(config, "architectures", None) and \
        any(a.endswith(("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                        "ForMultipleChoice")) for a in config.architectures) else None
    heads = set()
    for name, m in model.named_modules():
        if not _is_linear(m):
            continue
        parts = name.split(".")
        if isinstance(m.weight, nn.parameter.UninitializedParameter):
            continue  # a lazy layer: refused by name when its turn comes
        out_features = m.weight.shape[1] if not isinstance(m, nn.Linear) else m.weight.shape[0]
        if id(m.weight) in tied or parts[-1] in HEAD_NAMES or set(parts) & set(TASK_HEAD_NAMES) or \
                labels is not None and out_features == labels:
            heads.add(id(m))
    output = getattr(model, "get_output_embeddings", lambda: None)()
    return heads | ({id(output)} if isinstance(output, nn.Module) else set())


def _check_widths(layer: "CompressedLinear", comp: Compression, name: str) -> None:
    """Every format of the layer can take its tensors: the weight (out, in), the input (..., in), and the data-
    gradient's operands (..., out); refused naming the layer, before any forward pass."""
    out, inp = layer.out_features, layer.in_features
    checks = [("weights", comp.w_fmt, (out, inp)), ("activations", comp.a_fmt, (1, inp))]
    if comp.bwd_fmts is not None:
        checks += [("dL/dY in dgrad", comp.bwd_fmts[0], (1, out)), ("W in dgrad", comp.bwd_fmts[1], (inp, out))]
    for what, fmt, shape in checks:
        if fmt is None:
            continue
        try:
            fmt.check_shape(shape)
        except InputError as err:
            raise InputError(f"compress_: layer {name} ({out} x {inp}): its {what} format cannot take it ({err}); "
                             "leave it out with filter_fn, or choose a format whose blocks divide it") from None


@dataclass
class CompressedLayer:
    name: str
    shape: tuple          # (out, in)
    w_format: str | None
    a_format: str | None
    hadamard_block: int   # 0: not rotated


class CompressionSummary(list):
    """The layers `compress_` replaced (a list of CompressedLayer), printable; `skipped`: {layer name: why} of every
    linear layer it left alone."""

    def __init__(self, *args):
        super().__init__(*args)
        self.skipped: dict[str, str] = {}

    def __str__(self) -> str:
        lines = [f"{len(self)} linear layer(s) compressed"]
        lines += [f"  {c.name:<40} {str(c.shape):>14}  w={c.w_format}  a={c.a_format}  hadamard={c.hadamard_block}"
                  for c in self]
        if self.skipped:
            lines.append(f"{len(self.skipped)} linear layer(s) left uncompressed")
            lines += [f"  {name:<40} {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _blocks_kept_dense(model: nn.Module, fraction: float) -> dict[int, str]:
    """{id of a linear: why} for the linear layers of the last ceil(fraction x n) blocks of the model's longest
    ModuleList (its stack of blocks), counted from the end; {} for fraction 0 or a model without such a list."""
    if not fraction:
        return {}
    lists = [m for m in ([model] if isinstance(model, nn.ModuleList) else []) + list(model.modules())
             if isinstance(m, nn.ModuleList)]
    if not lists:
        return {}
    blocks = max(lists, key=len)
    kept = math.ceil(fraction * len(blocks))
    if kept >= len(blocks):  # e.g. NVIDIA's recipe (0.16) on a model of one block
        raise InputError(f"keep_dense={fraction:g} keeps the last ceil({fraction:g} x {len(blocks)}) = {kept} of "
                         f"{len(blocks)} blocks in high precision: nothing is left to compress; use a model of more "
                         "blocks")
    why = f"keep_dense={fraction:g}: in the last {kept} of {len(blocks)} blocks, kept in high precision"
    return {id(m): why for block in list(blocks)[len(blocks) - kept:] for m in block.modules() if _is_linear(m)}


def as_compression(compression: "Compression | str") -> Compression:
    """A Compression from itself or a label: `int4` (weights), `int4/int4` (weights/activations), `bf16/int4`."""
    if isinstance(compression, Compression):
        return compression
    if not isinstance(compression, str):
        raise InputError(f"compression: expected a Compression or a label such as 'int4/int4', got {compression!r}")
    w, a = split_label(compression)
    return Compression(w_format=w, a_format=a)


def _cannot_honour(module: nn.Module, name: str) -> str | None:
    """Why `compress_` would change what this layer does without a word (None: it can replace it faithfully)."""
    from torch.nn.utils import parametrize
    where = f"layer {name or '(the model)'}"
    if type(module) is not nn.Linear and type(module) is not hf_conv1d() and \
            type(module).forward is not nn.Linear.forward:
        return (f"{where} is a {type(module).__name__} with its own forward (a LoRA or custom layer): a CompressedLinear "
                "would drop it; leave it out with filter_fn")
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return f"{where} is lazy (its shape is not known yet): run one forward pass before compress_"
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or \
            getattr(module, "_backward_pre_hooks", None):
        return f"{where} has hooks (weight_norm, a profiler, an adapter?), which a replaced layer would not run"
    if parametrize.is_parametrized(module):
        return f"{where} has parametrizations ({', '.join(module.parametrizations)}), which compress_ cannot keep"
    if module.weight.numel() == 0:
        return f"{where} has a zero-width weight {tuple(module.weight.shape)}"
    return None


def compress_(model: nn.Module, compression: "Compression | str | None" = None,
              filter_fn: Callable[[nn.Module, str], bool] | None = None, recipe: str | None = None,
              replace: bool = False) -> nn.Module:
    """Replace, in place, every linear layer of `model` that `filter_fn(module, name)` accepts (default: all but
    the output head and embedding-tied layers) by a CompressedLinear over its own tensors. `recipe`: a named recipe
    (`capscale recipes`) instead of, or filling in, `compression`. Returns the model; `model.capscale_summary` lists
    what was compressed and what was left alone, and why. A layer it cannot replace faithfully (its own forward,
    hooks, parametrizations, lazy or zero-width) is refused naming it; a module shared under several names is one
    compressed module under all of them; an already compressed model is refused unless `replace` (then decompressed
    first)."""
    if compression is None and recipe is None:
        compression = stored_compression(model)  # a model saved after compress_ carries its recipe
        if compression is None:
            raise InputError("compress_: give a compression (a label such as 'int4/int4', or a Compression) or "
                             "recipe=NAME (this model's config carries none)")
    if _is_linear(model) or isinstance(model, CompressedLinear):
        raise InputError("compress_: the model is a single linear layer; put it inside a module (nn.Sequential) so "
                         "that it can be replaced")
    already = [n for n, m in model.named_modules() if isinstance(m, CompressedLinear)]
    if already and not replace:
        raise InputError(f"compress_: the model is already compressed ({len(already)} compressed layer(s), e.g. {already[0]}); "
                         "decompress_ it first, or pass replace=True")
    if already:
        decompress_(model)
    comp = as_compression(compression) if compression is not None else Compression(recipe=recipe)
    if recipe is not None and comp.recipe != recipe:
        comp = dataclasses.replace(comp, recipe=recipe)
    heads = _heads(model)
    accept = filter_fn or (lambda module, name: id(module) not in heads)
    dense = _blocks_kept_dense(model, comp.keep_dense)
    summary = CompressionSummary(getattr(model, "capscale_summary", []))
    siblings: dict[tuple, SharedInput] = {}  # layers of one parent with one input width may read one input
    names: dict[int, list[str]] = {}  # every name of each module (one module may sit under several)
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    for name, module in list(model.named_modules()):
        if not _is_linear(module):
            continue
        if not accept(module, name) or id(module) in dense:
            summary.skipped[name] = dense.get(id(module)) or ("a head (output, task, or tied to an embedding): kept in "
                                                              "high precision" if id(module) in heads else "not chosen by "
                                                              "filter_fn")
            continue
        if isinstance(model.get_submodule(name.rpartition(".")[0]) if "." in name else model, nn.MultiheadAttention):
            summary.skipped[name] = ("nn.MultiheadAttention's out_proj: the attention calls its weight directly, so a "
                                     "replaced layer would never run; left uncompressed")
            continue
        if (why := _cannot_honour(module, name)) is not None:
            raise InputError(f"compress_: {why}")
        layer = CompressedLinear.from_linear(module, comp)
        _check_widths(layer, comp, name)
        parent_name, _, child = name.rpartition(".")
        layer.__dict__["shared_input"] = siblings.setdefault((parent_name, layer.in_features), layer.shared_input)
        for alias in names[id(module)]:  # a shared module: the one compressed layer under each of its names
            alias_parent, _, alias_child = alias.rpartition(".")
            setattr(model.get_submodule(alias_parent) if alias_parent else model, alias_child, layer)
        summary.append(CompressedLayer(name, (layer.out_features, layer.in_features),
                                       None if comp.w_fmt is None else str(comp.w_fmt),
                                       None if comp.a_fmt is None else str(comp.a_fmt), layer.hadamard_block))
    for name, param in model.named_parameters():
        if param.dim() == 3:  # fused expert weights of a mixture of experts: not an nn.Linear, said rather than hidden
            summary.skipped[name] = (f"a 3-D parameter {tuple(param.shape)} (fused mixture-of-experts weights?): not a "
                                     "linear layer, left uncompressed")
    if not summary:
        raise InputError("compress_: no linear layer matched (the default leaves the output head and "
                         "embedding-tied layers alone; pass filter_fn to choose)")
    model.capscale_summary = summary
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):  # a Hugging Face config: save_pretrained stores the recipe
        config.capscale = {"compression": comp.settings(), "capscale_version": package_version()}
    return model


def stored_compression(model: nn.Module) -> Compression | None:
    """The Compression a Hugging Face model's config carries (`compress_` stored it; `save_pretrained` wrote it and
    `from_pretrained` read it back), or None."""
    stored = getattr(getattr(model, "config", None), "capscale", None)
    if not isinstance(stored, dict) or not isinstance(stored.get("compression"), dict):
        return None
    try:
        return Compression(**{k: v for k, v in stored["compression"].items()})
    except (TypeError, InputError) as err:
        raise InputError(f"compress_: the model's config carries a capscale recipe that does not build ({err})") from None


def decompress_(model: nn.Module) -> nn.Module:
    """The inverse of `compress_`: every CompressedLinear back to its plain layer over the same trained tensors. A
    model sharded by FSDP2 (DTensor parameters) is refused with the way to do it: gather a full state dict first."""
    from torch.distributed.tensor import DTensor
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise InputError("decompress_: the model is sharded by FSDP2 (its parameters are DTensors); gather them with "
                         "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
                         "full_state_dict=True)), load that into an unsharded copy built with the same compress_, and "
                         "decompress_ the copy")
    for name, module in list(model.named_modules()):
        if isinstance(module, CompressedLinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.to_plain())
    if hasattr(model, "capscale_summary"):
        del model.capscale_summary
    return model


def compressed_decoder(cfg, comp: "Compression | None" = None) -> nn.Module:
    """capscale's Decoder built plain, then every linear of its blocks compressed (`compress_`, no layer left out:
    embeddings and the head are outside the blocks)."""
    from .model import Decoder
    model = Decoder(cfg)
    compress_(model.blocks, comp or Compression(), filter_fn=lambda module, name: True)
    return model
