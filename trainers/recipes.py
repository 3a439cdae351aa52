"""Named training recipes: the formats and settings of a published low-precision training scheme, applied by name
(`capscale train --recipe NAME`, a sweep entry's `recipe = NAME`, `capscale.compress_(model, recipe=NAME)`). A
recipe fills the settings a user did not give; the record names every format it set (and the recipe).

What each recipe cannot express in capscale's per-operand formats is said in its `differs`: a random Hadamard
transform here rotates each backward operand with its own signs and back (an unbiased fake quantization of each
operand), where the published kernels rotate both operands of a GEMM with one shared sign vector that cancels in the
product; the backward products re-quantize W and X from their high-precision values, where Quartet II's kernels
re-quantize the forward's already-quantized tensors."""
from __future__ import annotations

from dataclasses import dataclass, field

SR_17_16 = "nvfp4(rounding=stochastic,scale_mult=1.0625)"  # stochastic rounding with 17/16 headroom: nothing clips


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str
    settings: dict = field(default_factory=dict)  # Compression fields
    describe: str = ""
    differs: str = ""


RECIPES = {r.name: r for r in (
    Recipe("quest", "QuEST (Panferov et al. 2025, arXiv 2502.05003; IST-DASLab/QuEST), the recipe behind the "
                    "published efficiencies",
           {"w_format": "int4", "a_format": "int4", "estimator": "trust", "rotate": True, "hadamard_block": 128,
            "sparse_quantized": "quest", "fp4_trust": "as-run"},
           "W4A4: both operands of every block linear rotated by a 128-wide Hadamard, scaled by the row's RMS, rounded "
           "to the Gaussian-optimal int4 grid; trust-region straight-through gradients; exact backward pass",
           "none known on CPU (tests/test_recipe.py checks the quantizers against QuEST's formulas)"),
    Recipe("nvidia-nvfp4", "NVIDIA, 'Pretraining Large Language Models with NVFP4' (arXiv 2509.25149); as "
                           "re-implemented in IST-DASLab/Quartet-II src/models/quantization/schemes/nvidia.py",
           {"w_format": "nvfp4(tile=16x16)", "a_format": "nvfp4", "estimator": "ste", "rotate": False,
            "dgrad_format": SR_17_16, "gw_format": "nvfp4(tile=16x16)",
            "wgrad_format": "rht(block=16)+" + SR_17_16, "gx_format": "rht(block=16)+nvfp4", "keep_dense": 0.16},
           "weights in 16x16 tiles and activations in 1x16 blocks, round to nearest; gradients 1x16 stochastic "
           "rounding (17/16 headroom); a 16-wide random Hadamard on both weight-gradient operands; the weight in the "
           "data-gradient GEMM in its forward tiles; the last 16% of the blocks' linear layers in high precision",
           "the paper keeps about 16% of its linear layers in BF16; which ones depends on the model: here the last "
           "blocks (keep_dense=0.16). Per-operand random rotations (module docstring)."),
    Recipe("quartet2", "Quartet II (Panferov et al. 2026, arXiv 2601.22813; IST-DASLab/Quartet-II "
                       "src/models/quantization/schemes/quartet_2.py)",
           {"w_format": "nvfp4(four_over_six=true)", "a_format": "nvfp4(four_over_six=true)", "estimator": "ste",
            "rotate": False, "dgrad_format": "rht(block=128)+eden(scale_mult=0.988)",
            "wgrad_format": "rht(block=128)+eden(scale_mult=0.988)"},
           "forward: weights and activations 1x16 NVFP4, round to nearest with four-over-six; backward: every operand "
           "of both GEMMs randomly rotated (128) and rounded by MS-EDEN (scale override 17/16 x 0.93)",
           "per-operand random rotations; W and X re-quantized from high precision (module docstring)"),
)}


def recipe_table() -> list[dict]:
    """`capscale recipes`: each recipe with its source, what it does and where capscale's version differs."""
    return [{"recipe": r.name, "source": r.source, "what": r.describe, "differs": r.differs,
             "settings": ", ".join(f"{k}={v}" for k, v in r.settings.items())} for r in RECIPES.values()]
