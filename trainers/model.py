"""A Llama-style decoder, readable top to bottom: RMSNorm, rotary embeddings, SwiGLU, no biases.

The model is plain nn.Linear layers: `compressed_decoder` (trainers.compress) builds it and then `compress_` makes
every linear of its blocks a CompressedLinear (the same call that puts a format into any model), so weights and
input activations pass through capacity formats; embeddings, norms and the output head stay in high precision. The
non-embedding count excludes the embedding and the head.

Two models in one file, chosen by ModelConfig's fields (`ModelConfig.quest()` sets all of them):
- capscale's small-model defaults: embeddings tied to the head (keeps tiny models' budget in the blocks),
  fan-in init, RMSNorm eps 1e-6, SwiGLU width rounded to the width's power-of-two factor;
- QuEST's Llama (reference section 5b): untied head, N(0, 0.02) init with the residual output projections
  (attention `proj`, MLP `down`) at 0.02 / sqrt(2 n_layer), eps 1e-5, SwiGLU width int(8 d / 3) rounded up
  to a multiple of 256.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def _linear(in_features: int, out_features: int) -> nn.Linear:
    """A bias-free linear whose weight Decoder._init draws: building it consumes no random numbers."""
    return nn.Linear(in_features, out_features, bias=False, device="meta").to_empty(device="cpu")


@dataclass
class ModelConfig:
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32
    vocab_size: int = 256
    context: int = 128
    tie_embeddings: bool = True
    init: str = "fan_in"        # "fan_in": std fan_in^-1/2 (embeddings d^-1/2); "quest": 0.02, residual projections /sqrt(2L)
    norm_eps: float = 1e-6
    mlp_multiple: int = 0       # SwiGLU width rounded up to this multiple; 0: the width's power-of-two factor (<= 128)

    INITS = ("fan_in", "quest")

    @classmethod
    def quest(cls, **shape) -> "ModelConfig":
        """QuEST's Llama at a given shape (n_layer, n_head, n_embd, vocab_size, context)."""
        return cls(**shape, tie_embeddings=False, init="quest", norm_eps=1e-5, mlp_multiple=256)

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU width. QuEST (mlp_multiple > 0): int(8 d / 3) rounded up to the multiple. Default: 8/3 of the
        width rounded up to its largest power-of-two factor (at most 128), so that the down-projection's input
        takes as large a Hadamard block as the rest."""
        if self.mlp_multiple:
            return self.mlp_multiple * math.ceil(int(8 * self.n_embd / 3) / self.mlp_multiple)
        unit = min(128, self.n_embd & -self.n_embd)
        return unit * math.ceil(8 * self.n_embd / 3 / unit)

    # The parameter counts, in one home (the model, the memory plan, the size search and diagnose read these).
    @property
    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each linear of one block: qkv, proj, gate_up, down."""
        d, h = self.n_embd, self.mlp_hidden
        return [(d, 3 * d), (d, d), (d, 2 * h), (h, d)]

    @property
    def non_embedding_params(self) -> int:
        """The N of a scaling law: every block's linears and norms, and the final norm."""
        return self.n_layer * (sum(i * o for i, o in self.linear_shapes) + 2 * self.n_embd) + self.n_embd

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.n_embd * (1 if self.tie_embeddings else 2)

    @property
    def n_params(self) -> int:
        return self.non_embedding_params + self.embedding_params


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(head_dim: int, context: int, base: float = 10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(context).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.qkv = _linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = _linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos[:T], sin[:T]), apply_rotary(k, cos[:T], sin[:T])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = _linear(cfg.n_embd, 2 * cfg.mlp_hidden)
        self.down = _linear(cfg.mlp_hidden, cfg.n_embd)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.n_embd, cfg.norm_eps), Attention(cfg)
        self.mlp_norm, self.mlp = RMSNorm(cfg.n_embd, cfg.norm_eps), SwiGLU(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """A plain decoder of nn.Linear layers; `compressed_decoder` (trainers.compress) puts formats into its blocks with
    the same `compress_` any model takes."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rotary_tables(cfg.n_embd // cfg.n_head, cfg.context)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        if cfg.init not in ModelConfig.INITS:
            raise ValueError(f"init must be one of {ModelConfig.INITS}, got {cfg.init!r}")
        self.apply(self._init)
        if cfg.init == "quest":  # GPT-2's scaled init of the projections that write into the residual stream
            for block in self.blocks:
                for layer in (block.attn.proj, block.mlp.down):
                    nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init(self, module):
        # capscale's default, fan-in scaled matrices and d^-1/2 embeddings: with a fixed 0.02 std, tiny models sit
        # on the unigram plateau for a random number of steps, which dominated run-to-run scatter (0.09 vs 0.006
        # nats). QuEST's 0.02 is what its published learning rates were tuned for.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            fan_in = module.weight.shape[1] if not isinstance(module, nn.Embedding) else self.cfg.n_embd
            nn.init.normal_(module.weight, std=0.02 if self.cfg.init == "quest" else fan_in ** -0.5)

    def decayed_parameters(self, rule: str) -> tuple[list, list]:
        """(weight-decayed, not decayed) parameters. "linear": only the linear weights inside the blocks (QuEST);
        "matrices": every matrix, the embedding and head included (capscale's default)."""
        if rule == "linear":
            decayed = {id(m.weight) for m in self.blocks.modules() if isinstance(m, nn.Linear)}
        else:
            decayed = {id(p) for p in self.parameters() if p.dim() >= 2}
        params = list(self.parameters())
        return [p for p in params if id(p) in decayed], [p for p in params if id(p) not in decayed]

    def hadamard_blocks(self) -> dict:
        """The recipe as it ran: each compressed layer's Hadamard block (0: not rotated), by layer name."""
        first = self.blocks[0]
        layers = {"qkv": first.attn.qkv, "proj": first.attn.proj, "gate_up": first.mlp.gate_up, "down": first.mlp.down}
        return {name: getattr(layer, "hadamard_block", 0) for name, layer in layers.items()}

    def forward(self, idx, targets=None):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token (forward and backward): 6 x (matrix parameters, output head included) plus the
    attention scores, 12 x layers x width x context (PaLM's model-FLOPs convention, used for MFU)."""
    matrices = cfg.non_embedding_params + cfg.vocab_size * cfg.n_embd
    return 6.0 * matrices + 12.0 * cfg.n_layer * cfg.n_embd * cfg.context


def count_non_embedding(n_layer: int, n_embd: int, mlp_multiple: int = 0) -> int:
    """N of a shape before its heads are chosen (heads do not change it)."""
    return ModelConfig(n_layer=n_layer, n_embd=n_embd, n_head=1, mlp_multiple=mlp_multiple).non_embedding_params


WIDTHS = (16, 32, 48, *range(64, 4097, 64))


def config_for_params(target: int, context: int = 128, vocab_size: int = 256, **model) -> ModelConfig:
    """(layers, heads, width) whose non-embedding count is closest to `target` (within 1%), preferring 2+
    layers, then a width/depth ratio near 48 (between 4 and 128). Widths are multiples of 64 (so Hadamard
    blocks of 64-128 fit), or 16, 32, 48 for budgets too small for that; heads of 8 (width < 64), 16
    (width < 256) or 64 dimensions. `model`: the other ModelConfig fields (init, mlp_multiple, ...)."""
    mlp_multiple = model.get("mlp_multiple", 0)
    best = None
    for n_layer in range(1, 33):
        for n_embd in WIDTHS:
            ratio = n_embd / n_layer
            if not 4 <= ratio <= 128:
                continue
            miss = abs(math.log(count_non_embedding(n_layer, n_embd, mlp_multiple) / target))
            key = (round(miss, 2), n_layer < 2, abs(math.log(ratio / 48)))
            if best is None or key < best[0]:
                best = (key, n_layer, n_embd)
    _, n_layer, n_embd = best
    head_dim = 8 if n_embd < 64 else 16 if n_embd < 256 else 64
    return ModelConfig(n_layer=n_layer, n_head=max(1, n_embd // head_dim), n_embd=n_embd,
                       vocab_size=vocab_size, context=context, **model)
