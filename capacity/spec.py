"""Format specs (`int4(group=128,scale=absmax)`, `2:4+int4`, `hadamard+mxfp4`) and the format registry.

A spec is components joined by `+`, applied left to right; a component is `name` or `name(args)`.
Names are registered (`register`) either exactly or as a family pattern (`int<bits>`, `N:M`). Every
factory returns a Component.

A spec never runs code that the user did not choose to load. Formats from other packages arrive by the
user's explicit act: an installed package's `capscale.formats` entry point (a function that registers its
formats), or `load_plugin(MODULE)` / `capscale --plugin MODULE`. `module:Class` in a spec resolves only in
a module loaded that way, and only to a Component subclass, checked before it is called.
"""
from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import os
import sys
import re
from pathlib import Path
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable

import numpy as np
import torch

from . import level_sets
from .errors import SpecError
from .formats import Component, Format, Identity
from .quantizers import GridQuantizer
from .structure import Hadamard, NMSparse, Outliers, Sparse
from .vq import VectorQuantizer
from .fp4 import NVFP4, Eden, RandomHadamard


@dataclass
class Entry:
    name: str            # shown in listings, e.g. "int<b>"
    factory: Callable    # factory(match, *args, **kwargs) for patterns, factory(*args, **kwargs) otherwise
    description: str
    pattern: re.Pattern | None = None
    example: str = ""


_REGISTRY: dict[str, Entry] = {}
_PLUGINS: dict[str, object] = {}  # modules the user loaded explicitly (load_plugin, --plugin)
_ENTRY_POINTS_LOADED = False


def register(name: str, factory: Callable, description: str = "", pattern: str | None = None,
             example: str | None = None, *, check: bool = True) -> None:
    """Register a format component: `parse(name)` then calls `factory(**kwargs)`.

    With `pattern` (a regex over the whole name), the factory is called as factory(match, **kwargs),
    for families such as `int<b>`. The factory must return a `capscale.capacity.Component`. The component is
    checked now, on its example (`check_component`), so that a mistake fails here and not silently in a study
    (the built-ins, checked by the test suite, skip it).
    """
    _REGISTRY[name] = Entry(name, factory, description, re.compile(pattern, re.ASCII) if pattern else None,
                            example or name)
    if check:
        try:
            check_component(example or name)
        except Exception:
            del _REGISTRY[name]
            raise


class _Probe(Component):
    """Stands after a component in a test chain: records whether the component passed the rest of the chain on."""

    name = "probe"

    def apply(self, x, keep, inner):
        self.called = True
        return inner(x, keep)


def check_component(example: str) -> None:
    """The mistakes a user component can make silently: no `name` (its spec would print as `component`, which
    does not parse), a spec that does not parse back to itself, an `apply` that never calls `inner` (every format
    after it in a chain would be skipped while bits and GMSE still count them)."""
    fmt = parse(example)
    for part in fmt.parts:
        if part.name == Component.name:
            raise SpecError(f"'{example}': {type(part).__name__} sets no `name`, so its spec would print as "
                            f"'{Component.name}'; give the class a name (the one it registers under)")
    if str(parse(str(fmt))) != str(fmt):
        raise SpecError(f"'{example}': prints as '{fmt}', which parses back as '{parse(str(fmt))}'; a spec must "
                        "round-trip (check the `spec` of its components and their `defaults`)")
    for part in fmt.parts:
        _require_bits(part, example)
    probe = _Probe()
    shape = max((tuple(p.example_shape) for p in fmt.parts), key=lambda s: int(np.prod(s)))
    try:
        Format([*fmt.parts, probe])(torch.randn(*shape, generator=torch.Generator().manual_seed(0)))
    except SpecError:
        raise
    except Exception as err:  # one line naming the example and the shape, not a traceback from inside the plugin
        raise SpecError(f"'{example}': fails on a {'x'.join(map(str, shape))} Gaussian tensor ({type(err).__name__}: "
                        f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}); declare the shapes it "
                        "supports with example_shape = (rows, columns)") from None
    if not getattr(probe, "called", False):
        raise SpecError(f"'{example}': its apply() never calls inner(x, keep), so the formats after it in a chain "
                        "(2:4+yours+int4) would be skipped; end apply() with `return inner(...)` or pass its result on")


def registry() -> list[Entry]:
    _load_entry_points()
    return list(_REGISTRY.values())


def _require_bits(part: Component, where: str) -> None:
    """A component that stores values must say how many bits (`bits`); only a step that stores nothing of its own
    (`keeps_bits`, a rotation) may inherit them: registered plugins and `module:Class` specs alike."""
    if type(part).bits is Component.bits and not part.keeps_bits:
        raise SpecError(f"'{where}': {type(part).__name__} implements no bits(), so it would count "
                        f"{Format([part]).bits_per_value:g} bits per value and break rho per bit and every memory "
                        "plan; implement bits(self, inner_bits) (storage bits per value, scales included), or set "
                        "keeps_bits = True for a step that stores nothing (a rotation)")


def load_plugin(module: str) -> None:
    """Import a module of the user's own formats (it registers them, or defines Component classes that specs
    then name as `module:Class`). The user's explicit act: nothing in a spec or a table loads a module."""
    cwd = os.getcwd()
    saved = list(sys.path)
    if cwd not in sys.path:  # as `python -m` does: the working directory first (a console script lacks it)
        sys.path.insert(0, cwd)
    try:
        _PLUGINS[module] = importlib.import_module(module)
    except ImportError as err:
        sys.path[:] = saved
        raise SpecError(f"--plugin {module}: cannot import it ({err}). A plugin is imported like any module: from "
                        f"the working directory ({cwd}) or the import path; for a module elsewhere, run with "
                        f"PYTHONPATH=/folder/holding/it, or install its package") from None
    sys.path[:] = saved  # the plugin is loaded; later imports (seaborn, jinja2...) never come from the working directory


def loaded_plugins() -> list[str]:
    """The modules loaded with load_plugin, in order (sweep workers load the same ones)."""
    return list(_PLUGINS)


def _load_entry_points() -> None:
    """Formats of installed packages: each `capscale.formats` entry point is a function that registers them."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in entry_points(group="capscale.formats"):
        if _in_working_directory(ep):
            continue
        ep.load()()


def _in_working_directory(ep) -> bool:
    """Whether an entry point's distribution lies in the working directory (a `*.dist-info` there, found because
    `python -m` puts it on sys.path): not an installed package, so never loaded without the user's --plugin."""
    dist = getattr(ep, "dist", None)
    try:
        where = Path(dist.locate_file("")).resolve() if dist is not None else None
    except (TypeError, ValueError, OSError):
        return True
    return where is None or where == Path(os.getcwd()).resolve()


# ---- uncompressed names and the baseline -----------------------------------------------------------
# One meaning everywhere: `gmse`, `train`, the run table and every law treat these as no compression
# (GMSE 0, capacity 1, nothing applied in training: the trainer computes in its own precision, fp32 on
# CPU and bf16 autocast on CUDA); they differ only in the storage bits counted for them.
UNCOMPRESSED_BITS = {"bf16": 16.0, "fp16": 16.0, "none": 16.0, "fp32": 32.0}
BASELINE = "bf16"  # the default label of the uncompressed baseline in run tables (efficiency 1)


def is_uncompressed(spec) -> bool:
    """No compression: no spec (None, NaN, empty) or one of the UNCOMPRESSED_BITS names."""
    return spec is None or (isinstance(spec, float) and spec != spec) or str(spec).strip() in ("", *UNCOMPRESSED_BITS)


def bits_of(spec) -> float:
    """Storage bits per value of a spec; no spec at all (None, NaN, empty) counts as the baseline's."""
    if is_uncompressed(spec) and str(spec).strip() not in UNCOMPRESSED_BITS:
        return UNCOMPRESSED_BITS[BASELINE]
    return parse(spec).bits_per_value


# ---- parsing ---------------------------------------------------------------------------------------

# A spec is short and plain: ASCII, a few components, names and numbers of sensible length.
MAX_SPEC_LENGTH, MAX_COMPONENTS, MAX_NAME_LENGTH, MAX_NUMBER_LENGTH = 500, 16, 64, 32
_COMPONENT = re.compile(r"^\s*([A-Za-z_][\w.]*(?::[A-Za-z_][\w.]*)?|\d+:\d+)\s*(?:\((.*)\))?\s*$", re.ASCII)
_KEY = re.compile(r"[a-z_]+", re.ASCII)


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split at `sep` outside parentheses, brackets and quotes ("6,4" and [6,4] are one value)."""
    parts, depth, current, quote = [], 0, "", None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        else:
            depth += (ch in "([") - (ch in ")]")
            if depth < 0:
                raise SpecError(f"unbalanced '{ch}' in '{text}'")
            if ch == sep and depth == 0:
                parts.append(current)
                current = ""
                continue
        current += ch
    if quote:
        raise SpecError(f"unclosed quote {quote} in '{text}'")
    if depth:
        raise SpecError(f"unbalanced '(' or '[' in '{text}'")
    return parts + [current]


def _value(text: str):
    """A parameter value: a number, true/false (any case), a quoted string (may hold commas), a [list], or text."""
    text = text.strip()
    if len(text) > MAX_NUMBER_LENGTH:
        raise SpecError(f"parameter value '{text[:20]}...' is longer than {MAX_NUMBER_LENGTH} characters")
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1]
        return [_value(v) for v in _split_top_level(inner, ",")] if inner.strip() else []
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _arguments(text: str | None) -> tuple[list, dict]:
    args, kwargs = [], {}
    if not text or not text.strip():
        return args, kwargs
    for item in _split_top_level(text, ","):
        if "=" in item:
            key, val = (part.strip() for part in item.split("=", 1))
            if not _KEY.fullmatch(key):
                raise SpecError(f"parameter name '{key}' is not a lower-case name")
            if key in kwargs:
                raise SpecError(f"parameter '{key}' is given twice")
            kwargs[key] = _value(val)
        elif kwargs:
            raise SpecError(f"positional argument '{item.strip()}' after keyword arguments")
        else:
            args.append(_value(item))
    return args, kwargs


def _suggest(name: str) -> str:
    """Close registered names (case-insensitive; names the query begins first: fp4 -> fp4_e2m1), and a pointer to
    --plugin where an installed module of that name exists (found, never imported)."""
    names = list(dict.fromkeys([e.example for e in _REGISTRY.values()] + [e.name for e in _REGISTRY.values()]))
    lower = {n.lower(): n for n in names}
    query = name.lower()
    prefixed = sorted((n for n in names if n.lower().startswith(query) and n.lower() != query), key=len)
    close = [lower[c] for c in difflib.get_close_matches(query, list(lower), n=3, cutoff=0.5)]
    exact = [lower[query]] if query in lower else []
    suggestions = list(dict.fromkeys(exact + prefixed[:2] + close))[:3]
    text = f"; did you mean {', '.join(suggestions)}?" if suggestions else "; see `capscale formats`"
    try:
        plugin = importlib.util.find_spec(name.split(":")[0]) is not None if name.isidentifier() else False
    except (ImportError, ValueError):
        plugin = False
    if plugin:
        text += f" (a module named '{name}' is installed: if it holds your formats, load it with --plugin {name})"
    return text


def _call(factory: Callable, where: str, *args, **kwargs) -> Component:
    try:
        component = factory(*args, **kwargs)
    except TypeError as err:
        raise SpecError(f"{where}: bad arguments ({err})") from None
    if not isinstance(component, Component):
        raise SpecError(f"{where}: factory returned {type(component).__name__}, expected a capscale.capacity.Component")
    return component


def parse_component(text: str) -> Component:
    m = _COMPONENT.match(text)
    if m and len(m.group(1)) > MAX_NAME_LENGTH:
        raise SpecError(f"format name '{m.group(1)[:20]}...' is longer than {MAX_NAME_LENGTH} characters")
    if not m:
        raise SpecError(f"cannot parse format component '{text.strip()}'" if text.strip()
                        else "empty format component (a stray '+'?)")
    name, (args, kwargs) = m.group(1), _arguments(m.group(2))
    if name in _REGISTRY and _REGISTRY[name].pattern is None:
        return _call(_REGISTRY[name].factory, name, *args, **kwargs)
    for entry in _REGISTRY.values():
        if entry.pattern is not None and (match := entry.pattern.fullmatch(name)):
            return _call(entry.factory, name, match, *args, **kwargs)
    if ":" in name and not name[0].isdigit():
        return _plugin_component(name, args, kwargs)
    if not _ENTRY_POINTS_LOADED:
        _load_entry_points()
        return parse_component(text)
    raise SpecError(f"unknown format '{name}'{_suggest(name)}")


def _plugin_component(name: str, args, kwargs) -> Component:
    module_name, attr = name.split(":", 1)
    if module_name not in _PLUGINS:
        raise SpecError(f"'{name}': module '{module_name}' is not a loaded plugin; a spec never imports code by "
                        "itself (your own formats load with `capscale --plugin MODULE`)")
    factory = getattr(_PLUGINS[module_name], attr, None)
    if not (isinstance(factory, type) and issubclass(factory, Component)):
        raise SpecError(f"'{name}': not a Component subclass of plugin '{module_name}'")
    component = _call(factory, name, *args, **kwargs)
    _require_bits(component, name)
    if not getattr(component, "spec_override", None):
        inner = ",".join([str(a) for a in args] + [f"{k}={v}" for k, v in kwargs.items()])
        component.spec_override = f"{name}({inner})" if inner else name
    return component


def parse(spec: "str | Format") -> Format:
    """Build the Format for a spec string (a Format passes through unchanged)."""
    if isinstance(spec, Format):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"empty format spec {spec!r}")
    if len(spec) > MAX_SPEC_LENGTH or not spec.isascii():
        raise SpecError(f"a format spec is ASCII text of at most {MAX_SPEC_LENGTH} characters, got {spec[:40]!r}...")
    parts = _split_top_level(spec, "+")
    if len(parts) > MAX_COMPONENTS:
        raise SpecError(f"'{spec[:40]}...': {len(parts)} components, at most {MAX_COMPONENTS}")
    return Format(parse_component(part) for part in parts)


# ---- built-in formats ------------------------------------------------------------------------------

# Scalar grids: QuEST's recipe by default, one scale per row at the Gaussian-optimal multiple of its RMS.
SCALED = {"group": "row", "scale": "rms", "scale_format": None}


def _bits_from(match, low=1, high=8, family="int") -> int:
    bits = int(match.group(1))
    if not low <= bits <= high:
        raise SpecError(f"{match.group(0)}: {family} bits must be between {low} and {high}, got {bits}")
    return bits


def _int(match, grid="midrise", **kw):
    """`grid=midrise` (default): 2^b levels +-0.5, +-1.5, ...; `grid=signed`: the 2^b - 1 integers
    -(2^(b-1) - 1) .. 2^(b-1) - 1, the "symmetric" signed-integer grid with a zero."""
    bits = _bits_from(match)
    if grid not in ("midrise", "signed"):
        raise SpecError(f"int{bits}: grid must be midrise or signed, got {grid!r}")
    defaults = {**SCALED, "grid": "midrise"}
    if grid == "midrise":
        levels = level_sets.uniform_levels(bits)
        return GridQuantizer(f"int{bits}", levels, bits, defaults, uniform=True,
                             rms_scale=level_sets.QUEST_CLIP[bits] / levels.max(), params=kw)
    if bits == 1:
        raise SpecError("int1: the signed grid needs at least 2 bits")
    half = 2 ** (bits - 1) - 1
    return GridQuantizer(f"int{bits}", np.arange(-half, half + 1.0), bits, defaults, params={**kw, "grid": grid})


def _lloydmax(match, **kw):
    bits = _bits_from(match, family="lloydmax")
    return GridQuantizer(f"lloydmax{bits}", level_sets.lloyd_max_levels(bits), bits, dict(SCALED), params=kw)


def _minifloat(kind: str, name: str):
    bits = {"e2m1": 4, "e2m3": 6, "e3m2": 6, "e4m3": 8, "e5m2": 8}[kind]

    def factory(**kw):
        return GridQuantizer(name, level_sets.minifloat_levels(kind), bits, dict(SCALED), cast=level_sets.TORCH_FLOAT8.get(kind),
                             rms_scale=level_sets.QUEST_FP4_SCALE if kind == "e2m1" else None, params=kw)
    return factory


def _mx(kind: str, name: str):
    bits = {"e2m1": 4, "e2m3": 6, "e3m2": 6, "e4m3": 8, "e5m2": 8}[kind]

    def factory(**kw):
        defaults = {"group": 32, "scale": "absmax", "scale_format": "e8m0"}
        return GridQuantizer(name, level_sets.minifloat_levels(kind), bits, defaults,
                             cast=level_sets.TORCH_FLOAT8.get(kind), params=kw)
    return factory


def _nf4(**kw):
    defaults = {"group": 64, "scale": "absmax", "scale_format": "fp32"}
    return GridQuantizer("nf4", level_sets.NF4_CODEBOOK, 4, defaults, params=kw)


def _ternary(**kw):
    return GridQuantizer("ternary", [-1.0, 0.0, 1.0], float(np.log2(3)), dict(SCALED), params=kw)


def _binary(**kw):
    return GridQuantizer("binary", [-1.0, 1.0], 1, {**SCALED, "scale": "absmean"}, params=kw)


def _nm(match, vector=1):
    return NMSparse(int(match.group(1)), int(match.group(2)), vector)


def _builtin(*args, **kwargs):
    register(*args, **kwargs, check=False)


def _register_builtins():
    for name, bits in UNCOMPRESSED_BITS.items():
        _builtin(name, functools.partial(Identity, name, bits),
                 f"uncompressed: GMSE 0, capacity 1, stored in {bits:g} bits; the trainer applies no rounding")
    _builtin("int<b>", _int, "2^b-level symmetric uniform midrise grid, b = 1..8; group=, scale=, grid=signed",
             pattern=r"int(\d+)", example="int4")
    _builtin("lloydmax<b>", _lloydmax, "Lloyd-Max MSE-optimal Gaussian grid with 2^b levels",
             pattern=r"lloydmax(\d+)", example="lloydmax4")
    _builtin("ternary", _ternary, "{-1, 0, 1} x scale (1.58 bits); scale=absmean is BitNet's")
    _builtin("binary", _binary, "sign(x) x mean|x| (1 bit)")
    for kind, name in [("e2m1", "fp4_e2m1"), ("e2m3", "fp6_e2m3"), ("e3m2", "fp6_e3m2"),
                       ("e4m3", "fp8_e4m3"), ("e5m2", "fp8_e5m2")]:
        _builtin(name, _minifloat(kind, name), f"{kind.upper()} minifloat elements with one (optimal) scale")
    for kind, name in [("e2m1", "mxfp4"), ("e2m3", "mxfp6_e2m3"), ("e3m2", "mxfp6_e3m2"),
                       ("e4m3", "mxfp8_e4m3"), ("e5m2", "mxfp8_e5m2")]:
        _builtin(name, _mx(kind, name), f"OCP MX: {kind.upper()} elements, blocks of 32, E8M0 power-of-two scale")
    _builtin("nvfp4", NVFP4, "E2M1 elements, blocks of 16, E4M3 block scale under an FP32 tensor scale; "
             "four_over_six=true, tile=16x16, scale_mult=x")
    _builtin("eden", Eden, "Quartet II's MS-EDEN: NVFP4 nearest rounding, block scales corrected per group of 128 "
             "and rounded stochastically (unbiased after rht): rht(block=128)+eden", example="rht(block=128)+eden")
    _builtin("rht", RandomHadamard, "randomized Hadamard transform (random signs, block Hadamard, redrawn every call) "
             "around what follows: rht(block=16)+nvfp4", example="rht(block=16)+nvfp4")
    _builtin("nf4", _nf4, "NormalFloat-4 codebook, absmax per block (default 64, fp32 scale)")
    _builtin("sparse", Sparse, "unstructured magnitude sparsity at a fraction: sparse(0.5)",
             example="sparse(0.5)")
    _builtin("N:M", _nm, "N:M magnitude sparsity along the last dim: 2:4; over vectors of a length by L2 norm: "
             "4:8(vector=2) (QuEST's pairs)", pattern=r"(\d+):(\d+)", example="2:4")
    _builtin("vq", VectorQuantizer, "vector quantization, k-means Gaussian codebook: vq(dim=2,bits=4)",
             example="vq(dim=2,bits=4)")
    _builtin("hadamard", Hadamard, "block Hadamard rotation around what follows: hadamard+int4",
             example="hadamard+int4")
    _builtin("outliers", Outliers, "keep the largest fraction exactly, compress the rest: outliers(0.01)+int3",
             example="outliers(0.01)+int3")


_register_builtins()
