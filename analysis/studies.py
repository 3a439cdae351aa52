"""Reference studies shipped with capscale: published training runs read into run tables, and the CPU study.

- `quest`: the 104 quantization-aware runs of QuEST (IST-DASLab/QuEST, MIT license; Llama-style decoders on
  C4, 30M-800M non-embedding parameters). Each run's quantizer classes become specs and label-level facts
  in columns of their own: `rotation` (half: the product in the rotated domain, QuEST's main recipe; full:
  rotated and rotated back; none), `estimator` (trust or clip) and `clip_scale`. The class names what a run
  did; its `w_bits`/`a_bits` fields do not always (the fp4 runs say 16).
  QuEST's weight-only runs rotate only the weight (`rotation` = weight: its NoQuantizer returns the activation as it
  is), and its full- and half-rotation W&A runs compute the same function: the published "full" runs differ from the
  half ones in their token budgets (25/50 against 100 tokens per parameter), not in recipe.
- `t5`: the 48 sparse T5 runs of Frantar et al. (google-research/jaxpruner, Apache-2.0): unstructured
  magnitude sparsity of the weights, `sparse(S)`, against the dense runs.
- `quartet`: the 174 MXFP4 scaling runs of Quartet (IST-DASLab/Quartet, MIT license; Llama-style decoders on C4,
  30M-200M with 430M and 800M baselines, 25 to ~1,600 tokens per parameter): forward-only, backward-only and
  crossed. A label-only table: `forward` and `backward` columns name each pass's quantizer (the paper's names,
  `mxfp4 QuEST` etc.; `BF16` is bf16 forward and exact gradients), so the decoupled law fits one effN per forward
  scheme and one effD per backward scheme. At high tokens per parameter a forward scheme's gap to bf16 grows.
- `cpu`: capscale's own CPU study (`data/cpu_study.toml`), its runs at 60 or more tokens per parameter, fitted with
  E held at 0 (`Study.fit_options`), both for the reasons the README's "The shipped study" gives.

Licenses and provenance are shipped beside the files (`data/published/`, its README) and recorded in each
table's `attrs["provenance"]`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

from capscale import data
from capscale.capacity import BASELINE, InputError
from capscale.capacity.runtable import BACKWARD_MARK, NO_BACKWARD, format_label

from .names import STUDY_NAMES, eff_key
from .verdicts import format_interval

# QuEST quantizer class -> (rotation, estimator, scalar format given the bits); fp4 ignores the bits.
QUEST_CLASSES = {
    "HalfHadamardTrustQuantizer": ("half", "trust", "int{b}"),
    "HadamardTrustQuantizer": ("full", "trust", "int{b}"),
    "TrustQuantizer": ("none", "trust", "int{b}"),
    "HalfHadamardClipQuantizer": ("half", "clip", "int{b}"),
    "HadamardClipQuantizer": ("full", "clip", "int{b}"),
    "ClipQuantizer": ("none", "clip", "int{b}"),
    "HalfHadamardFP4TrustQuantizer": ("half", "trust", "fp4_e2m1"),
    # FourEight: 4:8 sparsity over pairs of the rotated weight, then int4 scaled from the whole row
    "HalfHadamardFourEightTrustQuantizer": ("half", "trust", "4:8(vector=2)+int4(scale_from=row)"),
    "HadamardFourEightTrustQuantizer": ("full", "trust", "4:8(vector=2)+int4(scale_from=row)"),
}
QUEST_MAIN_ROTATION = "half"  # the recipe behind the published efficiencies; other rotations get a label suffix


@dataclass(frozen=True)
class Study:
    name: str
    describe: str
    source: str                          # where the runs come from, with the license
    read: Callable[[], pd.DataFrame]     # its run table
    fit_options: dict = field(default_factory=dict)  # the decoupled law's settings its analysis uses (fix_E)


def _spec(cls: str, bits: int, where: str) -> tuple[str | None, str | None, str | None]:
    """(spec, rotation, estimator) of one side of a QuEST run; (None, None, None) when it is not quantized."""
    if cls == "NoQuantizer":
        return None, None, None
    if cls not in QUEST_CLASSES:
        raise InputError(f"{where}: unknown QuEST quantizer class {cls!r}; known: {sorted(QUEST_CLASSES)}")
    rotation, estimator, spec = QUEST_CLASSES[cls]
    return spec.format(b=int(bits)), rotation, estimator


def quest_runs() -> pd.DataFrame:
    """QuEST's runs as a run table: one format per (weights class and bits, activations class and bits)."""
    path = data.path("published", "quest", "runs_for_scaling.json")
    rows = []
    for i, run in enumerate(json.loads(path.read_text()), start=1):
        where = f"{path}: run {i}"
        w, w_rot, w_est = _spec(run["w_quant"], run["w_bits"], where)
        a, a_rot, a_est = _spec(run["a_quant"], run["a_bits"], where)
        rotation, estimator = w_rot or a_rot, w_est or a_est
        label = format_label(w, a)  # labelled by the quantizer class, as the published efficiencies name them
        if rotation is not None and (rotation != QUEST_MAIN_ROTATION or estimator != "trust"):
            label += f" [{estimator}, {rotation} rotation]" if rotation != "none" else f" [{estimator}, unrotated]"
        if a is None and rotation not in (None, "none"):
            rotation = "weight"  # NoQuantizer activations stay unrotated: y = x Q(W H)^T (reference section 5b)
        rows.append({"format": label, "w_format": w, "a_format": a, "params": run["non_embedding_parameters"],
                     "tokens": run["tokens"], "loss": run["loss"], "rotation": rotation, "estimator": estimator,
                     "clip_scale": run.get("clip_scale"), "quest_w_quant": run["w_quant"],
                     "quest_a_quant": run["a_quant"], "model_size": f"{run['model_size']}M",
                     "lr": run["args"]["lr"], "status": "ok"})
    table = pd.DataFrame(rows)
    table.attrs["provenance"] = _provenance("quest")
    return table


T5_TOKENS_PER_STEP = 65_536
T5_DENSE_PARAMS_PER_SCALE = 24 * 12 * 768 ** 2  # the data set's note: dense parameters = this x scale


def t5_runs() -> pd.DataFrame:
    """The sparse T5 runs: one format per sparsity (dense = the baseline), parameters as dense counts."""
    path = data.path("published", "t5", "t5-data.csv")
    raw = pd.read_csv(path)
    table = pd.DataFrame({
        "format": [BASELINE if s == 0 else f"sparse({s:g})" for s in raw["sparsity"]],
        "w_format": [None if s == 0 else f"sparse({s:g})" for s in raw["sparsity"]],
        "params": (raw["scale"] * T5_DENSE_PARAMS_PER_SCALE).round().astype(int),
        "tokens": (raw["steps"] * T5_TOKENS_PER_STEP).astype(int),
        "loss": raw["val-loss"], "sparsity": raw["sparsity"], "status": "ok"})
    table.attrs["provenance"] = _provenance("t5")
    return table


# Quartet's quantizer names -> capscale labels (every one MXFP4, E2M1 elements in blocks of 32 with E8M0 scales)
QUARTET_SCHEMES = {"QuEST": "mxfp4 QuEST", "AlbertTsengDeterministic": "mxfp4 RTN", "AlbertTsengQuantizer": "mxfp4 SR",
                   "Eden128": "mxfp4 EDEN128", "Eden32": "mxfp4 EDEN32", "EdenOld": "mxfp4 EDEN-old",
                   "QuESTNoQuantScale": "mxfp4 QuEST-no-scale"}
QUARTET_GRID = "size_fwd_bwd_iters_loss"  # the scaling grid; the file's other cells are other methods' re-runs


def quartet_runs() -> pd.DataFrame:
    """Quartet's scaling grid as a label-only run table with `forward` and `backward` columns."""
    path = data.path("published", "quartet", "quartet_runs.csv")
    raw = pd.read_csv(path)
    raw = raw[raw["source"] == QUARTET_GRID]
    unknown = sorted((set(raw["forward"]) | set(raw["backward"])) - set(QUARTET_SCHEMES) - {"BF16"})
    if unknown:
        raise InputError(f"{path}: unknown Quartet quantizer(s) {unknown}; known: {sorted(QUARTET_SCHEMES)}")
    forward = raw["forward"].map(lambda q: BASELINE if q == "BF16" else QUARTET_SCHEMES[q])
    backward = raw["backward"].map(lambda q: NO_BACKWARD if q == "BF16" else QUARTET_SCHEMES[q])
    table = pd.DataFrame({"format": [f if b == NO_BACKWARD else f + BACKWARD_MARK + b for f, b in zip(forward, backward)],
                          "forward": forward.to_numpy(), "backward": backward.to_numpy(),
                          "params": raw["params"].to_numpy(), "tokens": raw["tokens"].to_numpy(),
                          "loss": raw["loss"].to_numpy(), "model_size": raw["model_size"].to_numpy(),
                          "steps": raw["steps"].to_numpy(), "status": "ok"})
    table.attrs["provenance"] = _provenance("quartet")
    return table


def cpu_runs() -> pd.DataFrame:
    """The CPU study's fitted runs: its table less the shortest budget (README, "The shipped study": at 25 tokens
    per parameter the law misses the runs by up to 4% in a pattern over sizes that no longer budget shows)."""
    from .runs import read_table
    table = read_table(data.path(CPU_STUDY_RUNS))
    fitted = table[table["tokens"] >= CPU_STUDY_MIN_TOKENS_PER_PARAM * table["params"]].reset_index(drop=True)
    fitted.attrs["provenance"] = {"source": f"capscale's own sweep, data/{CPU_STUDY_RUNS} (its .meta.json and log "
                                            "beside it)", "license": "the project's"}
    fitted.attrs["selection"] = (f"{len(fitted)} of the table's {len(table)} runs: those at "
                                 f">= {CPU_STUDY_MIN_TOKENS_PER_PARAM} tokens per parameter (the 25 budget is shipped, "
                                 "not fitted; README, 'The shipped study')")
    return fitted


# The shipped CPU study (data/cpu_study.toml): one depth family, 5 widths, 4 budgets (3 fitted), 2 seeds per run.
CPU_STUDY_RUNS = "cpu_study_runs.jsonl"
CPU_STUDY_MIN_TOKENS_PER_PARAM = 60


def _provenance(name: str) -> dict:
    return {"source": STUDIES[name].source, "license_file": str(data.path("published", name, "LICENSE")),
            "readme": str(data.path("published", "README.md"))}


STUDIES = {study.name: study for study in (
    Study("quest", "QuEST's 104 quantization-aware Llama runs on C4, 30M-800M parameters",
          "IST-DASLab/QuEST for_plots/runs_for_scaling.json at c295afda142c03a89d2af04653881beccf459aa1 "
          "(MIT license, data/published/quest/LICENSE)", quest_runs),
    Study("t5", "the 48 sparse T5 runs of Frantar et al. (ICLR 2024)",
          "google-research/jaxpruner jaxpruner/projects/bigsparse/t5-data.csv at "
          "f133ee50f31a03d0152b8b272edb534065152f5d (Apache-2.0, data/published/t5/LICENSE)", t5_runs),
    Study("quartet", "Quartet's 174 MXFP4 scaling runs (forward, backward and crossed), 30M-200M at 25-1,600 tokens "
          "per parameter", "IST-DASLab/Quartet notebooks/plots.ipynb at 5b9d74c6d3709a87bd0881386c8f288ea825c276 (MIT "
          "license, data/published/quartet/LICENSE)", quartet_runs),
    Study("cpu", "capscale's CPU study: 210 runs of 7k-56k-parameter 2-layer models on the torch sources at 60-150 tokens per "
          "parameter, 2 seeds each",
          "data/cpu_study.toml, trained by capscale on the project's 2-core machine", cpu_runs,
          # E held at 0: the runs' profile over E is flat and least at 0, and no efficiency moves along it by more
          # than a tenth of its interval (README, "The shipped study"; the fit-health table prints the profile)
          fit_options={"fix_E": 0.0}))}
assert tuple(STUDIES) == STUDY_NAMES


def study_runs(name: str) -> pd.DataFrame:
    if name not in STUDIES:
        raise InputError(f"unknown study {name!r}; the shipped studies are {', '.join(STUDIES)}")
    return STUDIES[name].read()


def published_efficiencies(name: str) -> pd.DataFrame | None:
    """A study's published efficiencies (format, published_lo, published_hi, note), where it ships them."""
    path = data.path("published", name, "published_efficiencies.csv")
    return pd.read_csv(path) if path.exists() else None


def published_comparison(fit, validation, published: pd.DataFrame) -> pd.DataFrame:
    """Per published format: the fitted efficiency with its interval, the leave-one-format-out capacity
    prediction with its interval, the published value (or range) and how far the fit lies outside it."""
    pred = validation.table.set_index("format") if validation is not None else None
    intervals = fit.conf_int() if fit.has_intervals else None  # once: each call summarises every replicate
    rows = []
    for r in published.itertuples():
        if r.format not in fit.eff:
            continue
        lo, hi = (intervals.loc[eff_key(r.format), ["lo", "hi"]] if intervals is not None and r.format != fit.baseline
                  else (float("nan"), float("nan")))
        value = fit.eff[r.format]
        has_pred = pred is not None and r.format in pred.index
        rows.append({"format": r.format, "fitted": value, "fitted_lo": lo, "fitted_hi": hi,
                     "predicted": pred.at[r.format, "predicted"] if has_pred else float("nan"),
                     "pred_lo": pred.at[r.format, "pred_lo"] if has_pred else float("nan"),
                     "pred_hi": pred.at[r.format, "pred_hi"] if has_pred else float("nan"),
                     "published": r.published_lo if r.published_lo == r.published_hi else f"{r.published_lo}-{r.published_hi}",
                     "off_published": max(r.published_lo - value, value - r.published_hi, 0.0),
                     "published_inside_ci": bool(lo <= r.published_hi and r.published_lo <= hi) if lo == lo else None,
                     "note": r.note})
    return pd.DataFrame(rows)


def published_table(table: pd.DataFrame, level: float) -> pd.DataFrame:
    """`published_comparison` as a reader sees it: values beside their intervals."""
    return pd.DataFrame({"format": table["format"], "published": table["published"], "fitted": table["fitted"],
                         f"{level:.0%} interval": [format_interval(a, b, ".3f") for a, b in zip(table.fitted_lo, table.fitted_hi)],
                         "predicted from capacity": table["predicted"],
                         "prediction interval": [format_interval(a, b, ".3f") for a, b in zip(table.pred_lo, table.pred_hi)],
                         "note": table["note"]})


def published_sentence(table: pd.DataFrame, level: float) -> str:
    worst = table.loc[table["off_published"].idxmax()]
    inside = table["published_inside_ci"].dropna()
    text = (f"capscale's fit gives every one of the {len(table)} published efficiencies within "
            f"{table['off_published'].max():.3f} (largest gap: {worst['format']}, fitted {worst['fitted']:.3f} against "
            f"{worst['published']})")
    if len(inside):
        text += f"; {int(inside.sum())} of {len(inside)} published values lie inside the fitted {level:.0%} interval"
    predicted = table.dropna(subset=["predicted"])
    if len(predicted):
        gap = (predicted["predicted"] - predicted["fitted"]).abs()
        text += (f". Predicted from capacity alone (rho(GMSE) refitted without the format), the same formats are "
                 f"within {gap.max():.3f} of their fitted efficiencies (median {gap.median():.3f})")
    return text + " (table 'Published efficiencies', section 3)."
