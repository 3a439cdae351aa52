"""capscale.capacity: compressed number formats, their Gaussian MSE and the capacity law rho(GMSE)."""
from .errors import InputError, SpecError
from .formats import Component, Format
from .quantizers import GridQuantizer, ScaledQuantizer
from .gmse import MAX_ROW_LENGTH, MEASURE_SHAPE, GMSEResult, compare, gmse, gmse_auto, spec_gmse
from .rho import pair_rho, rho
from .spec import BASELINE, UNCOMPRESSED_BITS, bits_of, is_uncompressed, load_plugin, parse, register, registry

__all__ = ["Component", "Format", "GridQuantizer", "InputError", "ScaledQuantizer", "SpecError", "MAX_ROW_LENGTH", "MEASURE_SHAPE",
           "GMSEResult", "compare", "gmse", "gmse_auto", "spec_gmse", "pair_rho", "rho", "BASELINE",
           "UNCOMPRESSED_BITS", "bits_of", "is_uncompressed", "load_plugin", "parse", "register", "registry"]
