"""The Format abstraction: a compressed representation applied to a torch tensor.

A Format is a chain of components applied left to right (`2:4+int4`: sparsify, then quantize the kept
values). Each component sees the tensor, a `keep` mask of the entries that still carry values (set by
an earlier sparsity step, or None) and `inner`, the rest of the chain, so that wrappers such as a
Hadamard rotation or outlier extraction can act around what follows. Formats act on float tensors of
any shape, on any device; blocks and groups run along the last dimension.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .errors import SpecError

Inner = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
BASELINE_BITS = 16.0  # storage of an uncompressed value (bf16), used where a chain ends without a quantizer


class Compressed(NamedTuple):
    """What a format made of a tensor: the values, and what gradient estimators need to know about them.

    tolerance: per entry, half the largest gap between adjacent levels times the entry's scale, i.e. the
    largest rounding error of an in-range value (None where the chain has no scalar grid); keep: the entries
    a sparsity step kept (None: all)."""
    values: torch.Tensor
    tolerance: torch.Tensor | None
    keep: torch.Tensor | None


def format_value(v) -> str:
    """A parameter value as a spec prints it, so that it parses back to itself: true/false, [a,b], text quoted where it
    holds a character the spec language uses."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if isinstance(v, str) and (set(v) & set(",()[]=+ \"'") or not v):
        return '"' + v.replace('"', "") + '"'
    return str(v)


class Component:
    """One step of a format chain. Subclasses set `name`, `defaults`, and implement `apply`/`bits`.

    What the trainer's recipe reads of a component, the same for built-ins and plugins:
    - `rounds`: whether the step rounds values (a quantizer). None (the default) infers it: a step that gives a
      trust radius (`tolerance`) rounds. Formats that round are rotated by the recipe's Hadamard and trained with
      its estimator, exactly as the built-in quantizers are.
    - `rotates_itself`: the step applies its own rotation, so the recipe adds none for the format.
    - `keeps_bits`: the step stores nothing of its own (a rotation), so inheriting `bits` is right; any other
      registered component must implement `bits` (checked at `register`).
    - `example_shape`: the tensor shape `register` tries the example on (a 16x16-tile format declares (32, 256)).
    """

    name = "component"
    defaults: dict = {}
    rounds: bool | None = None
    rotates_itself = False
    keeps_bits = False
    example_shape: tuple = (4, 256)

    def rounds_values(self) -> bool:
        return self.rounds if self.rounds is not None else type(self).tolerance is not Component.tolerance

    def __init__(self, **params):
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise SpecError(f"{self.name}: unknown parameter(s) {sorted(unknown)}; "
                            f"known: {sorted(self.defaults) or 'none'}")
        self.params = {**self.defaults, **params}

    @property
    def spec(self) -> str:
        if getattr(self, "spec_override", None):  # set for user factories imported as module:callable
            return self.spec_override
        changed = [f"{k}={format_value(v)}" for k, v in self.params.items() if v != self.defaults[k]]
        return f"{self.name}({','.join(changed)})" if changed else self.name

    def apply(self, x: torch.Tensor, keep: torch.Tensor | None, inner: Inner) -> torch.Tensor:
        raise NotImplementedError

    def bits(self, inner_bits: float) -> float:
        """Storage bits per value of this step given the bits of what follows it."""
        return inner_bits

    def check_shape(self, shape: tuple) -> None:
        """Refuse, with a SpecError, a tensor shape this step cannot take (before any training: `compress_` asks
        every layer's). The default takes any."""

    def tolerance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Per entry of x, the largest rounding error an in-range value can have (half the largest gap between
        the values it rounds to, at x's scale): the trust estimator's radius. None (the default): the component
        does not round, and a format whose only rounding step says None trains straight-through."""
        return None

    def exact_mse(self) -> float:
        raise SpecError(f"exact GMSE is not available for '{self.spec}': use Monte Carlo (without --exact; "
                        "exact=False in Python)")


class Format:
    """A compressed number format: `fmt(x)` is x compressed then decompressed (same shape and dtype)."""

    def __init__(self, parts):
        self.parts = tuple(parts)
        if not self.parts:
            raise SpecError("empty format spec")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.compress(x).values

    def compress(self, x: torch.Tensor) -> Compressed:
        """x compressed and decompressed (same shape and dtype), with the tolerance of its last scalar grid and
        the keep mask of its sparsity steps. Computed in float32 whatever the input dtype."""
        from .quantizers import ScaledQuantizer  # built on Component, defined here: imported when used
        seen = {"tolerance": None, "keep": None}

        def run(i: int, t: torch.Tensor, keep, unpruned: torch.Tensor):
            # unpruned: t as it was before the sparsity steps that set `keep` (what `scale_from=row` reads)
            if keep is None:
                unpruned = t
            if i == len(self.parts):
                seen["keep"] = keep
                return t
            part = self.parts[i]
            if isinstance(part, ScaledQuantizer):  # run it here to see its tolerance; apply() does the same
                t, tolerance = part.quantize(t, keep, unpruned)
                seen["tolerance"] = (i, tolerance)
                return run(i + 1, t, keep, unpruned)
            out = part.apply(t, keep, lambda u, k: run(i + 1, u, k, unpruned))
            tolerance = part.tolerance(t, out)
            if tolerance is not None and (seen["tolerance"] is None or seen["tolerance"][0] < i):
                seen["tolerance"] = (i, tolerance)  # the last rounding step of the chain sets the trust radius
            return out
        dtype, x = x.dtype, x.float()
        values = run(0, x, None, x).to(dtype)
        tolerance = seen["tolerance"][1] if seen["tolerance"] is not None else None
        return Compressed(values, tolerance, seen["keep"])

    def check_shape(self, shape: tuple) -> None:
        """A SpecError naming the step when some step of the chain cannot take tensors of `shape`."""
        for part in self.parts:
            part.check_shape(tuple(shape))

    def rounds_values(self) -> bool:
        """Whether some step of the chain rounds values (a quantizer: what the recipe rotates and trusts)."""
        return any(p.rounds_values() for p in self.parts)

    @property
    def rotates_itself(self) -> bool:
        return any(p.rotates_itself for p in self.parts)

    def component(self, kind: type) -> "Component | None":
        """The first component of a kind (a sparsity step, a quantizer), or None."""
        return next((p for p in self.parts if isinstance(p, kind)), None)

    @property
    def bits_per_value(self) -> float:
        bits = BASELINE_BITS
        for part in reversed(self.parts):
            bits = part.bits(bits)
        return bits

    def exact_mse(self) -> float:
        if len(self.parts) != 1:
            raise SpecError(f"exact GMSE is not available for the composite '{self}': use Monte Carlo")
        return self.parts[0].exact_mse()

    def __str__(self) -> str:
        return "+".join(p.spec for p in self.parts)

    def __repr__(self) -> str:
        return f"Format('{self}')"

    def __eq__(self, other) -> bool:
        return isinstance(other, Format) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


class Identity(Component):
    """No compression (`bf16`, `fp16`, `fp32`, `none`): GMSE 0, stored in `storage_bits`."""

    defaults = {}

    def __init__(self, name: str, storage_bits: float):
        super().__init__()
        self.name, self.storage_bits = name, storage_bits

    def apply(self, x, keep, inner):
        return inner(x, keep)

    def bits(self, inner_bits):
        return self.storage_bits

    def exact_mse(self):
        return 0.0
