"""capscale: the capacity of compressed number formats for training neural networks.

    import capscale
    capscale.gmse("int4")                                   # Gaussian MSE, bits, rho
    capscale.train(capscale.TrainConfig(capscale.Compression("int4", "int4"), params=20_000))
    capscale.DecoupledLaw().fit(capscale.load_runs("runs.jsonl")).eff_

Subpackages: `capscale.capacity` (formats, GMSE, the rho law), `capscale.trainers` (model, compressed
layers, training, sweeps), `capscale.analysis` (run tables, law fits, bootstrap, reports).
"""
from importlib.metadata import PackageNotFoundError, version

from .analysis.bootstrap import bootstrap
from .analysis.laws import DecoupledLaw, FrantarLaw, KumarLaw, UnifiedLaw, make_law
from .analysis.report import build_report
from .analysis.runs import load_runs
from .analysis.validate import validate
from .capacity import BASELINE, Component, Format, compare, gmse, parse, register, registry, rho
from .trainers.compression import Compression
from .trainers.diagnose import diagnose
from .trainers.train import TrainConfig, train

try:
    __version__ = version("capscale")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"

__all__ = ["BASELINE", "Component", "Compression", "DecoupledLaw", "diagnose", "Format", "FrantarLaw", "KumarLaw", "TrainConfig",
           "UnifiedLaw", "bootstrap", "build_report", "compare", "gmse", "load_runs", "make_law", "parse", "register",
           "registry", "rho", "train", "validate", "__version__"]
