"""capscale: the capacity of compressed number formats for training neural networks.

    import capscale
    capscale.gmse("int4")                                   # Gaussian MSE, bits, rho
    capscale.train(capscale.TrainConfig(capscale.Compression("int4", "int4"), params=20_000))
    capscale.compress_(my_model, "int4/int4")               # any PyTorch model, trained by your own loop
    fit = capscale.fit("runs.jsonl", bootstrap=200)            # a LawFit: params, eff, conf_int(), summary()
    fit.predict(new_runs, interval=True); fit.validate(); fit.save("study.fit.json"); fit.report("report/")

Subpackages: `capscale.capacity` (formats, GMSE, the rho law), `capscale.trainers` (model, compressed
layers, training, sweeps), `capscale.analysis` (run tables, law fits, bootstrap, reports). The names below
load their subpackage on first use, so importing one part (say `capscale.capacity`) does not import the
others (statsmodels, matplotlib and seaborn come with the analysis).
"""
import importlib
from importlib.metadata import PackageNotFoundError, version

_API = {
    ".capacity": ("BASELINE", "Component", "Format", "compare", "gmse", "parse", "register", "registry", "rho"),
    ".analysis.bootstrap": ("bootstrap",),
    ".analysis.lawfit": ("LawFit", "fit"),
    ".analysis.laws": ("DecoupledLaw", "make_law"),
    ".analysis.formula_laws": ("FrantarLaw", "KumarLaw", "UnifiedLaw"),
    ".analysis.report": ("build_report",),
    ".analysis.runs": ("load_runs",),
    ".analysis.validate": ("validate",),
    ".trainers.compress": ("compress_", "decompress_"),
    ".trainers.compression_config": ("Compression",),
    ".trainers.diagnose": ("diagnose",),
    ".trainers.train": ("TrainConfig", "train"),
}
_SUBPACKAGES = ("capacity", "trainers", "analysis", "data")  # `capscale.data.path("study.toml")` after `import capscale`
_HOME = {name: module for module, names in _API.items() for name in names}

try:
    __version__ = version("capscale")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"

__all__ = sorted(_HOME) + list(_SUBPACKAGES) + ["__version__"]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _HOME:
        raise AttributeError(f"module 'capscale' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name], __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__():
    return __all__
