"""How a model trains over formats: one settings object, parsed once, the single source of the training
command line's compression options and of their columns in a run record.

Adding a setting means adding a field here (with its help text) and using it where it acts; the CLI
option, the run record, the run's content key and the sweep file's [train] table follow from the field.
"""
from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass, field, fields

from capscale import capacity
from capscale.capacity import BASELINE, InputError, is_uncompressed
from capscale.capacity.quantizers import ScaledQuantizer
from capscale.capacity.level_sets import quest_fp4_trust_as_run
from capscale.capacity.runtable import backward_label, format_label, run_label
from capscale.capacity.structure import Hadamard, NMSparse, Sparse

from .recorded_before import RECORDED_BEFORE

ESTIMATORS = ("ste", "clipped", "trust")
BACKWARD_MASKS = ("masked", "dense", "rbbm")
SPARSE_QUANTIZED = ("quest", "unrotated")
FP4_TRUST = ("intended", "as-run")
WEIGHT_ONLY_ROTATIONS = ("weight", "both")


def _option(help: str, **argparse_kwargs) -> dict:
    return {"help": help, **argparse_kwargs}


def block_dividing(block: int, width: int) -> int:
    """The largest Hadamard block of at most `block` that divides `width` (both powers of two): 0 for none."""
    return math.gcd(block, width & -width) if block else 0


def _with_row_scale(spec: str) -> str:
    """The spec with its quantizers scaling from the whole row before pruning (`scale_from=row`)."""
    fmt = capacity.parse(spec)
    for part in fmt.parts:
        if isinstance(part, ScaledQuantizer):
            part.params["scale_from"] = "row"
    return str(fmt)


@dataclass(frozen=True)
class Compression:
    w_format: str = field(default=BASELINE, metadata=_option(
        "weights format spec (default: %(default)s, uncompressed)"))
    a_format: str | None = field(default=None, metadata=_option(
        "input-activations format spec (default: uncompressed)"))
    estimator: str = field(default="trust", metadata=_option(
        "gradient estimator: straight-through, clipped, or QuEST's trust region", choices=ESTIMATORS))
    trust: float | None = field(default=None, metadata=_option(
        "trust radius in row-RMS units (default: half the grid's largest step)", type=float))
    backward_mask: str = field(default="masked", metadata=_option(
        "gradient of pruned entries in sparse formats", choices=BACKWARD_MASKS))
    rbbm_p: float = field(default=0.2, metadata=_option("RBBM band parameter p", type=float))
    rotate: bool = field(default=True, metadata=_option(
        "Hadamard-rotate weight and activation of each linear along its input dimension when a format quantizes "
        "(QuEST), unless a format only sparsifies (see --sparse-quantized); scales and trust masks are then taken in "
        "the rotated domain",
        action=argparse.BooleanOptionalAction))
    hadamard_block: int = field(default=128, metadata=_option(
        "largest Hadamard block; a layer uses the largest power of two dividing both it and its input width",
        type=int))
    sparse_quantized: str = field(default="quest", metadata=_option(
        "a weight format that sparsifies and quantizes (2:4+int4, 4:8(vector=2)+int4): `quest` trains it as QuEST's "
        "FourEight, rotating both operands, pruning the rotated weight, scaling from the full row "
        "(int4(scale_from=row), recorded in the format) and giving pruned entries the estimator's gradient (trust: "
        "where |w| <= the trust radius); `unrotated`, as capscale 0.2 did: no rotation, the spec's own scale, pruned "
        "entries per --backward-mask", choices=SPARSE_QUANTIZED))
    fp4_trust: str = field(default="intended", metadata=_option(
        "trust radius of fp4_e2m1: `intended`, half the grid's largest gap (0.487 RMS), or `as-run`, the radius "
        "QuEST's code ran with (half the top gap of its 20-iteration Lloyd-Max levels, 0.3186 RMS), which produced "
        "the published fp4 efficiency", choices=FP4_TRUST))

    weight_only_rotation: str = field(default="weight", metadata=_option(
        "a layer whose weights quantize and whose activations do not: `weight` (QuEST's code: y = x Q(W H)^T, the "
        "activation left unrotated, as its NoQuantizer returns it) or `both` (capscale 0.2: y = (x H) Q(W H)^T, "
        "the product in the rotated domain)", choices=WEIGHT_ONLY_ROTATIONS))
    g_format: str | None = field(default=None, metadata=_option(
        "backward pass: format of the output gradient dL/dY in both backward products, quantized along each "
        "product's contraction dimension (default: exact; rounding=stochastic makes it unbiased)"))
    gw_format: str | None = field(default=None, metadata=_option(
        "backward pass: format of the weights as re-quantized for dL/dX = dL/dY W (along the output dimension)"))
    gx_format: str | None = field(default=None, metadata=_option(
        "backward pass: format of the input activations as re-quantized for dL/dW = dL/dY^T X (along the tokens)"))
    dgrad_format: str | None = field(default=None, metadata=_option(
        "backward pass, per GEMM: format of both operands of dL/dX = dL/dY W (dL/dY and W along the outputs); "
        "--g-format and --gw-format override their operand"))
    wgrad_format: str | None = field(default=None, metadata=_option(
        "backward pass, per GEMM: format of both operands of dL/dW = dL/dY^T X (dL/dY and X along the tokens); "
        "--g-format and --gx-format override their operand"))
    keep_dense: float = field(default=0.0, metadata=_option(
        "fraction of the model's blocks, counted from the last, whose linear layers stay uncompressed (rounded up "
        "to whole blocks): NVIDIA's NVFP4 recipe keeps about 16% of its linear layers in BF16", type=float))
    recipe: str | None = field(default=None, metadata=_option(
        "a named recipe (`capscale recipes`): its formats and settings; options given beside it override them"))
    bwd_hadamard_block: int = field(default=0, metadata=_option(
        "backward pass: block Hadamard rotation of both operands of each backward product along its contraction "
        "dimension (it cancels in the product); 0 for none", type=int))

    BACKWARD = ("g_format", "gw_format", "gx_format", "dgrad_format", "wgrad_format")

    def __post_init__(self):
        if self.recipe is not None:  # a named recipe fills what was not given (left at its default)
            from .recipes import RECIPES
            if self.recipe not in RECIPES:
                raise InputError(f"unknown recipe {self.recipe!r}; the recipes are {', '.join(RECIPES)} "
                                 "(`capscale recipes`)")
            defaults = {f.name: f.default for f in fields(self)}
            for name, value in RECIPES[self.recipe].settings.items():
                if getattr(self, name) == defaults[name]:
                    object.__setattr__(self, name, value)
        # One meaning of "uncompressed": weights default to the baseline label, activations to no spec.
        object.__setattr__(self, "w_format", BASELINE if is_uncompressed(self.w_format) else str(self.w_format))
        object.__setattr__(self, "a_format", None if is_uncompressed(self.a_format) else str(self.a_format))
        for name in self.BACKWARD:
            value = getattr(self, name)
            object.__setattr__(self, name, None if is_uncompressed(value) else str(value))
        if not (isinstance(self.keep_dense, (int, float)) and not isinstance(self.keep_dense, bool)
                and 0 <= self.keep_dense < 1):
            raise InputError(f"keep_dense must be a fraction of the blocks in [0, 1), got {self.keep_dense!r}")
        if not isinstance(self.bwd_hadamard_block, int) or self.bwd_hadamard_block < 0 or \
                self.bwd_hadamard_block & (self.bwd_hadamard_block - 1):
            raise InputError(f"backward Hadamard block must be 0 or a power of two, got {self.bwd_hadamard_block}")
        if self.estimator not in ESTIMATORS:
            raise InputError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.backward_mask not in BACKWARD_MASKS:
            raise InputError(f"backward mask must be one of {', '.join(BACKWARD_MASKS)}, got {self.backward_mask!r}")
        if self.sparse_quantized not in SPARSE_QUANTIZED:
            raise InputError(f"sparse_quantized must be one of {', '.join(SPARSE_QUANTIZED)}, "
                             f"got {self.sparse_quantized!r}")
        if self.weight_only_rotation not in WEIGHT_ONLY_ROTATIONS:
            raise InputError(f"weight_only_rotation must be one of {', '.join(WEIGHT_ONLY_ROTATIONS)}, got "
                             f"{self.weight_only_rotation!r}")
        if self.fp4_trust not in FP4_TRUST:
            raise InputError(f"fp4_trust must be one of {', '.join(FP4_TRUST)}, got {self.fp4_trust!r}")
        for spec in (self.w_format, self.a_format, *self.backward_formats):
            if spec is not None and not isinstance(spec, str):
                raise InputError(f"a format spec is text, got {spec!r}")
        if self.trust is not None and not (isinstance(self.trust, (int, float)) and 0 < self.trust < math.inf):
            raise InputError(f"trust must be a positive number of row RMS, got {self.trust!r}")
        if not (isinstance(self.rbbm_p, (int, float)) and 0 <= self.rbbm_p < 0.5):
            raise InputError(f"rbbm_p must be in [0, 0.5), got {self.rbbm_p!r}")
        if not isinstance(self.hadamard_block, int) or self.hadamard_block < 1 or \
                self.hadamard_block & (self.hadamard_block - 1):
            raise InputError(f"hadamard block must be a power of two, got {self.hadamard_block}")
        if self.quest_sparse_quantized(self.w_fmt):  # the weights' format as it trains: scaled from the full row
            object.__setattr__(self, "w_format", _with_row_scale(self.w_format))
            self.__dict__.pop("w_fmt", None)  # parsed again from the spec as recorded
        self.w_fmt, self.a_fmt, self.bwd_fmts  # parse now: a bad spec fails before any training

    @property
    def backward_formats(self) -> tuple:
        return tuple(getattr(self, name) for name in self.BACKWARD)

    def backward_operands(self) -> tuple:
        """(dL/dY in dgrad, W in dgrad, dL/dY in wgrad, X in wgrad) specs: a per-operand format where given, else its
        GEMM's (--dgrad-format, --wgrad-format), else None (exact)."""
        return (self.g_format or self.dgrad_format, self.gw_format or self.dgrad_format,
                self.g_format or self.wgrad_format, self.gx_format or self.wgrad_format)

    @functools.cached_property
    def bwd_fmts(self) -> tuple | None:
        """The Formats of `backward_operands` (None each where exact); None when all are exact."""
        fmts = tuple(None if spec is None else capacity.parse(spec) for spec in self.backward_operands())
        return None if all(f is None for f in fmts) else fmts

    @staticmethod
    def _sparsifies(fmt) -> bool:
        return fmt is not None and bool(fmt.component(Sparse) or fmt.component(NMSparse))

    @classmethod
    def _sparse_and_quantized(cls, fmt) -> bool:
        return cls._sparsifies(fmt) and fmt.rounds_values()

    @staticmethod
    def _is_fp4(fmt) -> bool:
        return fmt is not None and getattr(fmt.component(ScaledQuantizer), "name", None) == "fp4_e2m1"

    def quest_sparse_quantized(self, fmt) -> bool:
        """Whether this format trains under QuEST's sparse+quantized scheme (see `sparse_quantized`)."""
        return self.sparse_quantized == "quest" and self._sparse_and_quantized(fmt)

    def _parsed(self, spec: str | None) -> tuple[capacity.Format | None, int | None]:
        """(the Format the layer applies, the Hadamard block a leading `hadamard` component asks for). A leading
        rotation becomes the layer's: rotating the other operand too leaves the product exact while the scale
        and the trust mask are taken in the rotated domain (rotating only this one and back would not)."""
        if is_uncompressed(spec):
            return None, None
        fmt = capacity.parse(spec)
        if isinstance(fmt.parts[0], Hadamard) and len(fmt.parts) > 1:
            return capacity.Format(fmt.parts[1:]), fmt.parts[0].params["block"]
        return fmt, None

    @functools.cached_property
    def w_fmt(self) -> capacity.Format | None:
        """The weights' Format, parsed once (None: uncompressed)."""
        return self._parsed(self.w_format)[0]

    @functools.cached_property
    def a_fmt(self) -> capacity.Format | None:
        return self._parsed(self.a_format)[0]

    @functools.cached_property
    def rotation_block(self) -> int:
        """Largest Hadamard block for this pair of formats, 0 for none. Rotation applies when a format quantizes,
        unless a format only sparsifies (its pattern must stay in the weights' own basis) or, under
        `sparse_quantized=unrotated`, any format sparsifies; a leading `hadamard` in a spec asks for its block."""
        asked = [b for b in (self._parsed(self.w_format)[1], self._parsed(self.a_format)[1]) if b]
        if asked:
            return min(asked)
        formats = [f for f in (self.w_fmt, self.a_fmt) if f is not None]
        if any(f.rotates_itself for f in formats):  # a component that applies its own rotation: the recipe adds none
            return 0
        quantizes = [f.rounds_values() for f in formats]  # built-in quantizers and plugins alike (Component.rounds)
        blocked = any(self._sparsifies(f) and (not q or self.sparse_quantized == "unrotated")
                      for f, q in zip(formats, quantizes))
        return self.hadamard_block if self.rotate and any(quantizes) and not blocked else 0

    def rotates_activation_only_with_weights(self) -> bool | None:
        """For a weight-only layer that rotates (None otherwise): whether its activation is rotated too (`both`)."""
        if self.a_fmt is not None or self.w_fmt is None or not self.rotation_block:
            return None
        return self.weight_only_rotation == "both"

    def block_for(self, width: int) -> int:
        """The Hadamard block of a layer with this input width: 0 (none) or a power of two dividing it."""
        return block_dividing(self.rotation_block, width)

    @functools.cached_property
    def rbbm_z(self) -> float:
        """Phi^-1(0.5 + p): RBBM's band edge in RMS units."""
        from scipy import special
        return float(special.ndtri(0.5 + self.rbbm_p))

    @property
    def label(self) -> str:
        return run_label(self.w_format, self.a_format, *self.backward_formats)

    def settings(self) -> dict:
        """The settings as plain values (the run record's columns)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def key_settings(self) -> dict:
        """What the run's content key hashes: the settings, less the newer ones that do not act on these formats or
        are at the behaviour of the runs recorded before them (so those runs keep their keys)."""
        formats = [f for f in (self.w_fmt, self.a_fmt) if f is not None]
        acts = {"sparse_quantized": any(self._sparse_and_quantized(f) for f in formats),
                "weight_only_rotation": self.rotates_activation_only_with_weights() is not None,
                "fp4_trust": self.estimator == "trust" and self.trust is None and any(map(self._is_fp4, formats))}
        return {k: v for k, v in self.settings().items() if k != "recipe"  # a name for settings that are keyed anyway
                and (k not in RECORDED_BEFORE or acts.get(k, True) and v != RECORDED_BEFORE[k])}

    def trust_radius(self, fmt: capacity.Format) -> float | None:
        """The trust radius in row-RMS units for this format, or None for its own (half its largest gap)."""
        if self.trust is not None:
            return self.trust
        if self.fp4_trust == "as-run" and self._is_fp4(fmt):
            return quest_fp4_trust_as_run()
        return None

    def to_record(self) -> dict:
        """The run-record columns of these settings (the schema's `format`, `w_format`, `a_format` and the rest)."""
        return {"format": self.label, **self.settings(), "a_format": self.a_format or "none",
                "w_gmse": capacity.spec_gmse(self.w_format), "a_gmse": capacity.spec_gmse(self.a_format),
                "forward": format_label(self.w_format, self.a_format), "backward": backward_label(*self.backward_formats)}

    @classmethod
    def from_record(cls, record: dict) -> "Compression":
        """The settings a run record was trained with (the inverse of `to_record`); a record older than a setting
        was trained with that setting's behaviour in RECORDED_BEFORE."""
        names = cls.names()
        return cls(**{**{k: v for k, v in RECORDED_BEFORE.items() if k in names},
                      **{k: record[k] for k in names if k in record}})

    @classmethod
    def names(cls) -> set:
        return {f.name for f in fields(cls)}

    def __getstate__(self):  # parsed Formats are rebuilt where unpickled (sweep workers), not shipped
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __setstate__(self, state):
        self.__dict__.update(state)
