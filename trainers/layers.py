"""Compressed linear layers and the gradient estimators that let a model train through a format.

The recipe is QuEST's (reference section 5a). A linear layer y = x W^T whose formats quantize rotates
both operands along the input dimension with the same block Hadamard H (H H^T = I, so x H (W H)^T = x W^T)
and quantizes them in the rotated domain, where each row (an output row of W, a token of x) looks Gaussian;
the product is taken there, without rotating back. The forward pass is exactly `fmt(v)`, the Format object
that `capscale.gmse` measures. The backward pass is an estimator's masked identity, per entry:
  ste      gradient everywhere (straight-through);
  clipped  gradient where |v| <= the row's largest |Q(v)| (nothing for clipped values);
  trust    gradient where |Q(v) - v| <= half the grid's largest step at the row's scale (QuEST's trust region:
           c_b / (2^b - 1) row RMS for int<b>, 0.487 RMS for fp4, or 0.3186 with `fp4_trust=as-run`, the radius
           QuEST's published fp4 runs used); `trust=` sets it in row-RMS units instead.
           Formats without a scalar grid (vq, user components) pass the gradient straight through.
A weight format that sparsifies and quantizes trains by default as QuEST's FourEight (`sparse_quantized=quest`):
rotated like any quantized format, pruned in the rotated domain, scaled from the full row, and the estimator's
rule applies to every entry, so a pruned entry (value 0) gets gradient where |v| <= the trust radius.
Otherwise the pruned entries of sparse formats follow `backward_mask`: `masked` (no gradient, the default),
`dense` (straight-through: pruned weights keep learning and can regrow), or `rbbm` (RMS-banded backward
masking: gradient where |v| < min(T_p, T_k) or |v| > max(T_p, T_k), with T_p = row RMS * Phi^-1(0.5 + p)
and T_k the forward's own threshold: the tensor's for unstructured sparsity, each group's for N:M).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from capscale import capacity
from capscale.capacity.quantizers import row_rms
from capscale.capacity.structure import NMSparse, Sparse, hadamard_matrix

from .compression_config import Compression, block_dividing


def compress_with_mask(v: torch.Tensor, fmt: capacity.Format, comp: Compression):
    """(fmt(v), the entries where the gradient passes, or None for everywhere), per the estimator."""
    out = fmt.compress(v)
    q, keep = out.values, out.keep
    radius = comp.trust_radius(fmt)
    if comp.estimator == "ste":
        mask = None
    elif comp.estimator == "clipped":
        mask = v.abs() <= q.abs().amax(-1, keepdim=True)
    elif radius is not None:
        mask = torch.sub(q, v).abs_() <= radius * row_rms(v)
    else:
        mask = None if out.tolerance is None else (q - v).abs() <= out.tolerance
    if keep is None:
        return q, mask
    if comp.quest_sparse_quantized(fmt):  # QuEST's FourEight: the estimator's rule on every entry, pruned ones
        return q, mask                   # (whose value is 0) included
    kept = keep if mask is None else mask & keep  # the quantizer's rule holds for the values it stored
    if comp.backward_mask == "masked":
        return q, kept
    passing = kept | ~keep                          # pruned entries get gradient ...
    if comp.backward_mask == "dense":
        return q, passing
    sparsity = fmt.component(NMSparse) or fmt.component(Sparse)  # ... outside RBBM's band
    t_k, t_p = sparsity.prune_threshold(v, keep), row_rms(v) * comp.rbbm_z
    low, high = torch.minimum(t_k, t_p), torch.maximum(t_k, t_p)
    return q, passing & ((v.abs() < low) | (v.abs() > high))


class _Estimate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, fmt, comp):
        with torch.no_grad():
            q, mask = compress_with_mask(v, fmt, comp)
        ctx.save_for_backward(mask if mask is not None else torch.empty(0))
        ctx.has_mask = mask is not None
        return q

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return (grad * mask if ctx.has_mask else grad), None, None


def through_format(v: torch.Tensor, fmt: capacity.Format | None, comp: Compression) -> torch.Tensor:
    """v through its format in the forward pass, the gradient through the scheme's estimator in the backward."""
    return v if fmt is None else _Estimate.apply(v, fmt, comp)


def _backward_product(a: torch.Tensor, b: torch.Tensor, fa, fb, block: int) -> torch.Tensor:
    """a @ b^T with both operands through their formats along the shared (last, contraction) dimension, rotated
    there by a block Hadamard first when `block` divides it (H H^T = I: the product is unchanged but the scales
    see rotated rows). In float32: under bf16 autocast dL/dY arrives in bf16 beside a float32 W, and the quantized
    operands (a 4-bit level times its scale) are exact in float32, not always in bf16."""
    a, b = a.contiguous().float(), b.contiguous().float()
    block = block_dividing(block, a.shape[-1])
    if block > 1 and (fa is not None or fb is not None):
        hadamard = hadamard_matrix(block).to(a.device)
        a, b = rotate(a, hadamard), rotate(b, hadamard)
    return (a if fa is None else fa(a)) @ (b if fb is None else fb(b)).t()


class _BackwardFormats(torch.autograd.Function):
    """y = x w^T whose two backward products take their operands through the backward formats (dL/dY's, W's
    and X's), each quantized along that product's contraction dimension, as a low-precision backward pass computes
    them: dL/dX = Q_g(dL/dY) Q_w(W) over the outputs, dL/dW = Q_g(dL/dY)^T Q_x(X) over the tokens."""

    @staticmethod
    def forward(ctx, x, w, comp):
        ctx.save_for_backward(x, w)
        ctx.comp = comp
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        (g_dgrad, w_fmt, g_wgrad, x_fmt), block = ctx.comp.bwd_fmts, ctx.comp.bwd_hadamard_block
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # dgrad, (tokens, out) @ (out, in): contraction over the outputs
            grad_x = _backward_product(g2, w.t(), g_dgrad, w_fmt, block).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:  # wgrad, (out, tokens) @ (tokens, in): contraction over the tokens
            grad_w = _backward_product(g2.t(), x.reshape(-1, x.shape[-1]).t(), g_wgrad, x_fmt, block).to(w.dtype)
        return grad_x, grad_w, None


def rotate(v: torch.Tensor, hadamard: torch.Tensor) -> torch.Tensor:
    """Block Hadamard along the last dim, in float32 also under bf16 autocast (the quantizer sees exact values).
    One dense product per block (`hadamard_block` defaults to 128, where it beats the fast transform)."""
    block = hadamard.shape[0]
    with torch.autocast(v.device.type, enabled=False):
        return (v.float().reshape(-1, block) @ hadamard.float()).reshape(v.shape)


class SharedInput:
    """Sibling layers that read the same input (q, k and v; gate and up) rotate and compress it once, as one
    low-precision activation feeding several products. A hit needs the very tensor of the last call, unmodified
    (`_version`), in the same grad mode, asked for by a layer that has not used that result yet: a layer asking
    again is a new forward pass (the same input tensor fed twice), whose graph must not be the last one's. The
    input is held weakly and the result only while the input lives. Under torch.compile the graph's own
    common-subexpression elimination does this instead."""

    def __init__(self):
        self._last = None  # (weak reference to the input, its version and grad mode, the result, the layers that
                           # used it): one object, so a collection running the callback mid-update loses nothing

    def __call__(self, x: torch.Tensor, make, user: nn.Module) -> torch.Tensor:
        if torch.compiler.is_compiling() or x.is_inference():  # inference tensors keep no version counter
            return make(x)
        key, last = (x._version, torch.is_grad_enabled()), self._last
        if last is not None and last[0]() is x and last[1] == key and id(user) not in last[3]:
            last[3].add(id(user))
            return last[2]
        result = make(x)
        self._last = (weakref.ref(x, self._forget), key, result, {id(user)})
        return result

    def _forget(self, source) -> None:
        if self._last is not None and self._last[0] is source:
            self._last = None

    def __getstate__(self):  # pickling a model (torch.save) keeps the sharing, not the last call's tensors
        return {}

    def __setstate__(self, state):
        self.__init__()


class CompressedLinear(nn.Linear):
    """y = A(x H) @ W(W H)^T + b: weights and input activations rotated by a block Hadamard H (when the formats
    call for it) and passed through their formats (each optional). An nn.Linear, with its `weight` (and `bias`)
    parameters and state-dict keys: `from_linear` takes over an existing layer's own tensors, so optimizer state,
    checkpoints, DDP and FSDP see the same parameters. `transposed`: the weight is stored (in, out), as GPT-2's
    Conv1D keeps it."""

    def __init__(self, in_features: int, out_features: int, comp: Compression, bias: bool = False,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._compress_with(comp, transposed=False)

    @classmethod
    def from_linear(cls, layer: nn.Module, comp: Compression) -> "CompressedLinear":
        """A compressed layer over `layer`'s own weight and bias (an nn.Linear, or a Conv1D storing (in, out))."""
        transposed = not isinstance(layer, nn.Linear)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = layer.weight.shape[::-1] if not transposed else layer.weight.shape
        new.weight, new.bias = layer.weight, layer.bias
        new.__dict__["_replaced"] = layer  # not a submodule: what `to_plain` gives back
        new._compress_with(comp, transposed)
        return new

    def _compress_with(self, comp: Compression, transposed: bool):
        self.comp, self.transposed = comp, transposed
        self.hadamard_block = comp.block_for(self.in_features)
        self.__dict__["shared_input"] = SharedInput()  # not a submodule; `compress_` hands siblings one
        if self.hadamard_block:  # a buffer: it follows the module to its device, and torch.compile sees a tensor
            self.register_buffer("hadamard", hadamard_matrix(self.hadamard_block).to(self.weight.device),
                                 persistent=False)

    def to_plain(self) -> nn.Module:
        """The uncompressed layer over the same (trained) weight and bias: the module `from_linear` replaced, or
        an nn.Linear."""
        layer = self.__dict__.get("_replaced") or nn.Linear(self.in_features, self.out_features,
                                                            bias=self.bias is not None, device="meta")
        layer.weight, layer.bias = self.weight, self.bias
        return layer

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, w={self.comp.w_fmt}, a={self.comp.a_fmt}, hadamard={self.hadamard_block}"
                + (", transposed" if self.transposed else ""))

    def _apply(self, fn, *args, **kwargs):
        """After any move or cast (`.to(bf16)`, `.cuda()`, `to_empty` after building on the meta device), the
        rotation is built again, in float32, where the weight now lives: never cast, never left uninitialised."""
        super()._apply(fn, *args, **kwargs)
        if getattr(self, "hadamard_block", 0) and not self.weight.is_meta:
            self.hadamard = hadamard_matrix(self.hadamard_block).to(self.weight.device)
        return self

    def _compress_input(self, x):
        return through_format(rotate(x, self.hadamard) if self.hadamard_block else x.float(), self.comp.a_fmt, self.comp)

    def forward(self, x):
        """Formats quantize in float32 (a bf16 or fp16 model's tensors are upcast first); the product is taken in the
        input's dtype, as the model computes it."""
        dtype = x.dtype
        w = self.weight.t() if self.transposed else self.weight
        if self.hadamard_block:
            w = rotate(w, self.hadamard)
        elif self.comp.w_fmt is not None:
            w = w.float()
        rotate_input = self.hadamard_block and self.comp.rotates_activation_only_with_weights() is not False
        x = self.shared_input(x, self._compress_input, self) if rotate_input or self.comp.a_fmt else x
        w = through_format(w, self.comp.w_fmt, self.comp)
        x, w = x.to(dtype), w.to(dtype)
        if self.comp.bwd_fmts is None:
            return F.linear(x, w, self.bias)
        y = _BackwardFormats.apply(x, w, self.comp)
        return y if self.bias is None else y + self.bias
