"""The names the analysis offers (laws, rho forms, bootstrap units), defined once and importable without numpy,
scipy or pandas, so that the command line lists them as choices before loading anything heavy."""
LAW_NAMES = ("decoupled", "unified", "kumar", "frantar", "drift", "qat-error")
TOKEN_LAWS = ("drift", "qat-error")  # laws in which a format's cost depends on tokens per parameter
RHO_FORMS = ("tanh", "logistic", "ratio")
RESAMPLING_UNITS = ("formats", "cells")
STUDY_NAMES = ("quest", "t5", "quartet", "cpu")  # the shipped studies (analysis.studies), in the order help lists them
DEFAULT_STUDY = "quest"  # the claim checked where the papers checked it: published runs at 30M-800M parameters
FRONTIER_FAMILIES = {  # `capscale frontier`'s built-in families: brace ranges over spec parameters
    "int": "int{2..8}(group={32,64,128,row},scale_format={fp16,e8m0})",
    "lloydmax": "lloydmax{2..8}",
    "nf4": "nf4(group={32,64,128,256})",
    "fp": "{fp4_e2m1,fp6_e2m3,fp6_e3m2,fp8_e4m3,fp8_e5m2}",
    "mx": "{mxfp4,mxfp6_e2m3,mxfp6_e3m2,mxfp8_e4m3,mxfp8_e5m2}",
    "nvfp4": "{nvfp4,nvfp4(four_over_six=true),nvfp4(tile=16x16),nvfp4(scale=opt),nvfp4(rounding=stochastic),"
             "rht(block=128)+eden}",  # today's NVFP4 training variants
    "sparse+int": "{1:4,2:4,4:8}+int{2..8}",
    "vq": "vq(dim=2,bits={1,2,3})",
}
MAX_REPLICATES = 100_000  # bootstrap replicates: the most a command runs and a saved fit may hold


class FitWarning(UserWarning):
    """A fit whose numbers should not be read as they stand: a constant at its bound, an unidentified term."""


def eff_key(label: str) -> str:
    """The name of a format's efficiency among a fit's values and bootstrap columns: `eff[int4]`."""
    return f"eff[{label}]"


def eff_d_key(label: str) -> str:
    """The name of a backward configuration's data efficiency among a fit's values: `effD[int8]`."""
    return f"effD[{label}]"
