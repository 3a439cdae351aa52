"""Format families, the report's visual grammar: one hue per family (quantized, sparse, sparse+quantized,
weights+activations, vector), a shade of it and a marker per format (the family's own marker first), so the study's
main split (sparse vs quantized) is visible at a glance and formats within a family are told apart, in grey too.
Labels capscale cannot parse ("other") get distinct colours."""
from __future__ import annotations

import colorsys

import numpy as np
import pandas as pd
from matplotlib import colors as mcolors

from capscale.capacity import InputError, is_uncompressed, parse
from capscale.capacity.structure import Hadamard, NMSparse, Sparse
from capscale.capacity.vq import VectorQuantizer

FAMILIES = {  # family: (colour, marker); colour-blind-safe hues (Okabe-Ito)
    "uncompressed": ("#000000", "*"),
    "quantized": ("#0072B2", "o"),
    "sparse": ("#E69F00", "s"),
    "sparse+quantized": ("#CC79A7", "D"),
    "W+A": ("#D55E00", "^"),
    "vector": ("#009E73", "P"),
    "other": ("#777777", "X"),
}


MARKERS = ["o", "s", "D", "^", "v", "P", "X", "<", ">", "h", "p", "*"]  # told apart within a family, also in grey
OTHER_PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000"]


def family(w_format, a_format) -> str:
    """The family of a weights/activations pair of specs (None = uncompressed); 'other' for labels capscale
    cannot parse."""
    if not is_uncompressed(a_format):
        return "W+A"
    if is_uncompressed(w_format):
        return "uncompressed"
    try:
        parts = [p for p in parse(w_format).parts if not isinstance(p, Hadamard)]
    except InputError:
        return "other"
    if any(isinstance(p, VectorQuantizer) for p in parts):
        return "vector"
    sparse = any(isinstance(p, (Sparse, NMSparse)) for p in parts)
    quantized = any(not isinstance(p, (Sparse, NMSparse)) for p in parts)
    return "sparse+quantized" if sparse and quantized else "sparse" if sparse else "quantized"


HUE_SPREAD = 0.18  # of the colour circle a family's shades span around its hue: told apart by hue and lightness


def _shades(base: str, n: int) -> list:
    """n distinguishable shades of one hue: a grid of about sqrt(n) lightness levels (dark to light) by as many
    turns of the hue, so that a family of 14 (QuEST's W+A runs) is not 14 oranges of nearly one lightness."""
    h, lightness, s = colorsys.rgb_to_hls(*mcolors.to_rgb(base))
    if n <= 1:
        return [mcolors.to_hex(mcolors.to_rgb(base))] * n
    if lightness <= 0.05:  # black (uncompressed): greys only
        return [mcolors.to_hex(colorsys.hls_to_rgb(h, 0.05 + 0.55 * i / (n - 1), s)) for i in range(n)]
    levels = int(np.ceil(np.sqrt(n)))
    turns = int(np.ceil(n / levels))
    grid = [(lv, tn) for lv in range(levels) for tn in range(turns)][:n]
    out = []
    for lv, tn in grid:
        light = 0.26 + 0.42 * lv / max(levels - 1, 1)
        turn = (tn / max(turns - 1, 1) - 0.5) * HUE_SPREAD if turns > 1 else 0.0
        out.append(mcolors.to_hex(colorsys.hls_to_rgb((h + turn) % 1.0, light, max(s, 0.6))))
    return out


def format_styles(info: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Per format (rows of `format_table`): family, colour (a shade of the family's) and marker, ordered by
    family then label."""
    fam = pd.Series({f: "uncompressed" if f == baseline else family(r["w_format"], r["a_format"])
                     for f, r in info.iterrows()})
    order = sorted(fam.index, key=lambda f: (list(FAMILIES).index(fam[f]), f != baseline, f))
    rows = []
    for name in FAMILIES:
        members = [f for f in order if fam[f] == name]
        # labels capscale cannot parse have no family to share: distinct colours; within a family, shades
        colours = (OTHER_PALETTE * (len(members) // len(OTHER_PALETTE) + 1))[:len(members)] if name == "other" \
            else _shades(FAMILIES[name][0], len(members))
        first = MARKERS.index(FAMILIES[name][1]) if FAMILIES[name][1] in MARKERS else 0
        for i, (f, colour) in enumerate(zip(members, colours)):  # the family's marker first, then the others in turn
            rows.append({"format": f, "family": name, "color": colour, "marker": MARKERS[(first + i) % len(MARKERS)]})
    return pd.DataFrame(rows).set_index("format")
