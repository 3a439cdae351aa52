"""Loading and validating run tables (schema: `capacity.runtable`) into a pandas DataFrame.

Errors name the file, the row (1-based, as a spreadsheet shows it: header is row 1 in CSV, first line
is row 1 in JSON lines), the column and what was expected.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from capscale.capacity import BASELINE, InputError, bits_of, is_uncompressed, spec_gmse
from capscale.capacity.runtable import BACKWARD_MARK, NO_BACKWARD, OPTIONAL, REQUIRED, RunTableError, STATUSES, read_lines, split_label, split_run_label

from .query import select

MIN_RUNS_PER_FORMAT = 2


def parse_mapping(pairs) -> dict:
    """`loss=val_loss,params=n_params` (or a list of such strings) -> {"val_loss": "loss", ...}."""
    mapping = {}
    for item in ([pairs] if isinstance(pairs, str) else pairs or []):
        for pair in filter(None, (p.strip() for p in item.split(","))):
            if "=" not in pair:
                raise RunTableError(f"--map expects schema=column pairs such as loss=val_loss, got '{pair}'")
            ours, theirs = (s.strip() for s in pair.split("=", 1))
            if ours not in REQUIRED + OPTIONAL:
                raise RunTableError(f"--map: '{ours}' is not a run-table column; columns: {', '.join(REQUIRED + OPTIONAL)}")
            mapping[theirs] = ours
    return mapping


def read_table(path: "str | Path") -> pd.DataFrame:
    """The raw table, indexed by the row number a person sees (the line in JSON lines; in CSV the header is row 1)."""
    path = Path(path)
    if not path.exists():
        raise RunTableError(f"{path}: no such file")
    if not path.is_file():
        raise RunTableError(f"{path}: not a file")
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        lines = read_lines(path)
        return pd.DataFrame([r for _, r in lines], index=[n for n, _ in lines])
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as err:
        raise RunTableError(f"{path}: cannot read as CSV ({type(err).__name__}: {str(err).strip()[:200]})") from None
    frame.index = range(2, len(frame) + 2)
    return frame


def load_runs(source: "str | Path | pd.DataFrame", mapping=None, query: str | None = None,
              baseline: str = BASELINE, name: str | None = None, drop_duplicates: bool = False) -> pd.DataFrame:
    """Validated runs: required columns numeric and positive, status normalised, GMSE columns filled. An ok row that
    repeats an earlier one exactly (format, params, tokens, loss, seed) is refused naming it, or with
    `drop_duplicates` dropped and counted in `attrs["dropped_duplicates"]`."""
    if isinstance(source, pd.DataFrame):
        frame, where = source.copy(), name or "<DataFrame>"
        frame.index = range(1, len(frame) + 1)
    else:
        frame = read_table(source)
        where = str(source)
    if frame.empty:
        raise RunTableError(f"{where}: no rows")
    frame = frame.rename(columns=parse_mapping(mapping) if not isinstance(mapping, dict) else mapping)
    if "format" not in frame.columns and "forward" in frame.columns:
        frame["format"] = _labels_from_sides(frame, where)
    elif {"forward", "backward"} & set(frame.columns):
        _check_sides(frame, where)
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise RunTableError(f"{where}: missing column(s) {missing}; found {list(frame.columns)} "
                            "(map other names with --map loss=val_loss,params=n_params)")
    if "status" not in frame.columns:
        frame["status"] = "ok"
    frame["status"] = frame["status"].fillna("ok").astype(str)
    for row, status in frame["status"].items():
        if status not in STATUSES:
            raise RunTableError(f"{where}: row {row}, column 'status': expected one of {STATUSES}, got '{status}'")
    ok = frame["status"] == "ok"
    for row, label in frame.loc[ok, "format"].items():
        if not isinstance(label, str) or not label.strip():
            raise RunTableError(f"{where}: row {row}, column 'format': expected a format label, got {label!r}")
    for col, expected in (("params", "a number >= 1"), ("tokens", "a number >= 1"), ("loss", "a positive number")):
        values = pd.Series([_number(v) for v in frame[col]], index=frame.index, dtype=float)
        valid = np.isfinite(values) & ((values > 0) if col == "loss" else (values >= 1))
        if (ok & ~valid).any():
            row = (ok & ~valid).idxmax()
            raise RunTableError(f"{where}: row {row}, column '{col}': expected {expected}, got {frame.at[row, col]!r}")
        frame[col] = values
    duplicated = frame[ok].duplicated(subset=["format", "params", "tokens", "loss"] +
                                      (["seed"] if "seed" in frame.columns else []), keep="first")
    dropped = 0
    if duplicated.any() and drop_duplicates:
        dropped = int(duplicated.sum())
        frame = frame.drop(index=duplicated[duplicated].index)
    elif duplicated.any():  # failed and diverged records may repeat: a retried run leaves one per attempt
        row = duplicated.idxmax()
        raise RunTableError(f"{where}: row {row} duplicates an earlier ok row (format, params, tokens, loss); "
                            f"{int(duplicated.sum())} such row(s) in all (drop them with --drop-duplicates)")
    if query:
        frame = select(frame, query)
    runs = frame[frame["status"] == "ok"].copy()
    if runs.empty:
        raise RunTableError(f"{where}: no rows with status 'ok' to fit")
    if baseline not in set(runs["format"]):
        raise RunTableError(f"{where}: no baseline rows: format '{baseline}' not found; formats are "
                            f"{sorted(set(runs['format']))} (choose one with --baseline)")
    _fill_gmse(runs, baseline, where)
    skipped = frame[frame["status"] != "ok"]
    runs.attrs.update(source=where, dropped_duplicates=dropped,
                      skipped=skipped[["format", "params", "tokens", "status"]].to_dict("records"))
    return runs


def _side(value, row, column: str, where: str) -> str:
    """One pass's label from a `forward`/`backward` cell: text, an uncompressed name meaning none."""
    if not isinstance(value, str) or not value.strip():
        raise RunTableError(f"{where}: row {row}, column '{column}': expected a format label (text), got {value!r}")
    return value.strip()


def _check_sides(frame: pd.DataFrame, where: str) -> None:
    """`forward`/`backward` columns beside a `format` label: text, and saying what the label says (a column that
    disagrees would silently decide which efficiency a run counts for)."""
    for row in frame.index:
        if "status" in frame.columns and frame.at[row, "status"] not in ("ok", None) and \
                not (isinstance(frame.at[row, "status"], float) and np.isnan(frame.at[row, "status"])):
            continue
        label = frame.at[row, "format"]
        forward, backward = split_run_label(label) if isinstance(label, str) else (None, None)
        for column, from_label in (("forward", forward), ("backward", backward)):
            if column not in frame.columns:
                continue
            value = frame.at[row, column]
            if value is None or isinstance(value, float) and np.isnan(value):
                continue
            value = _side(value, row, column, where)
            same = value == from_label or is_uncompressed(value) and is_uncompressed(from_label) or \
                column == "backward" and is_uncompressed(value) and from_label == NO_BACKWARD
            if label is not None and from_label is not None and not same:
                raise RunTableError(f"{where}: row {row}, column '{column}': {value!r} disagrees with the label "
                                    f"{label!r} (whose {column} part is {from_label!r}); make them agree, or drop "
                                    "one")


def _labels_from_sides(frame: pd.DataFrame, where: str) -> pd.Series:
    """A table without `format` but with `forward` (and `backward`) columns: each run's label, as `run_label` writes
    it; an uncompressed name (bf16, fp32, none) in `backward` is exact gradients, in `forward` the baseline."""
    labels = {}
    for row in frame.index:
        forward = _side(frame.at[row, "forward"], row, "forward", where)
        backward = (_side(frame.at[row, "backward"], row, "backward", where) if "backward" in frame.columns
                    else NO_BACKWARD)
        forward = BASELINE if is_uncompressed(forward) else forward
        labels[row] = forward if is_uncompressed(backward) else forward + BACKWARD_MARK + backward
    frame["forward"] = [split_run_label(v)[0] for v in labels.values()]
    frame["backward"] = [split_run_label(v)[1] for v in labels.values()]
    return pd.Series(labels)


def _number(value) -> float:
    """A cell as a float, NaN where it is not a number (text, lists, objects, booleans)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str, np.number)):
        return float("nan")
    try:
        return float(value)
    except (ValueError, OverflowError):
        return float("nan")


def check_identifiable(runs: pd.DataFrame, where: str = "") -> None:
    """What the law needs before it is fitted: >= 2 model sizes (else the N term is a constant), >= 2
    tokens-per-parameter ratios (else D = r N and the N and D terms cannot be told apart), and >= 2 distinct
    (N, D) points per format (else its efficiency is not identified)."""
    where = where or runs.attrs.get("source", "")
    if runs["loss"].nunique() < 2:
        raise RunTableError(f"{where}: every run has the same loss ({runs['loss'].iloc[0]:.6g}): there is no scaling "
                            "to fit")
    constants = runs["format"].nunique() + 4  # A per format, B, E, alpha, beta
    if len(runs) <= constants:
        raise RunTableError(f"{where}: {len(runs)} runs cannot identify the law's {constants} constants (one A per "
                            f"format, B, E, alpha, beta); give more than {constants} runs")
    if runs["tokens"].nunique() < 2:
        raise RunTableError(f"{where}: all runs have one token budget (D = {runs['tokens'].iloc[0]:.4g}): the D term "
                            "cannot be told from the irreducible loss E; train at least 2 token budgets")
    if runs["params"].nunique() < 2:
        raise RunTableError(f"{where}: all runs have one model size (N = {runs['params'].iloc[0]:.4g}): the law's N "
                            "term and every efficiency are unidentified; train at least 2 sizes")
    if (runs["tokens"] / runs["params"]).round(6).nunique() < 2:
        raise RunTableError(f"{where}: all runs have the same tokens per parameter, so D = r N and the N and D terms "
                            "cannot be separated (alpha, beta and the efficiencies trade off); add another token "
                            "budget (--fix-E only pins E)")
    if runs.attrs.get("bootstrap_resample"):
        # A resample of a table that passed: a format drawn at one point keeps its efficiency identified by the
        # shared constants. Refusing it would fail, and so select against, the replicates of every thinly-run format
        # (on the QuEST study, 130 of 200 refits, for one format with 2 runs).
        return
    points = runs[["format", "params", "tokens"]].drop_duplicates()["format"].value_counts()
    thin = points[points < MIN_RUNS_PER_FORMAT].sort_index()
    if len(thin):
        raise RunTableError(f"{where or runs.attrs.get('source', '')}: format(s) {list(thin.index)} have fewer than "
                            f"{MIN_RUNS_PER_FORMAT} distinct (params, tokens) runs; their efficiency is not identified")


def _spec_or_label(row) -> tuple:
    """(weights spec, activations spec) of a row: explicit columns, else the label (W or W/A)."""
    w = row.get("w_format")
    a = row.get("a_format")
    if is_uncompressed(w) and is_uncompressed(a) and not is_uncompressed(row["format"]):
        w, a = split_label(row["format"])
    return (None if is_uncompressed(w) else str(w)), (None if is_uncompressed(a) else str(a))


GMSE_RANGE = (0.0, 1.5)  # 0: lossless; 1: a format that returns zeros; a little above for formats worse than that
BITS_RANGE = (0.0, 64.0)  # bits per value: above 0 (exclusive), at most 64


def _missing(value) -> bool:
    return value is None or isinstance(value, (float, np.floating)) and np.isnan(value)


def _given(row, where: str, row_id, column: str, fallback: str | None, bounds: tuple, what: str):
    """A numeric override from `column` (else `fallback`): NaN where absent; out of range is an error."""
    for name in (column, fallback):
        raw = row.get(name) if name else None
        if not _missing(raw):
            value, (lo, hi) = _number(raw), bounds
            if not (lo <= value <= hi and (what != "bits" or value > lo)):
                shown = f"({lo:g}, {hi:g}]" if what == "bits" else f"[{lo:g}, {hi:g}]"
                raw = raw.item() if isinstance(raw, np.generic) else raw
                raise RunTableError(f"{where}: row {row_id}, column '{name}': expected {what} in {shown}, got {raw!r}")
            return value
    return float("nan")


def _spec_gmse(spec: str | None) -> tuple[float, str]:
    """(GMSE, why it is unknown): the spec's own, else NaN with the parser's reason (a label capscale cannot
    express fits under laws that need no capacity; nothing it names is ever imported)."""
    try:
        return spec_gmse(spec), ""
    except InputError as err:
        return float("nan"), str(err)


def _spec_bits(spec: str | None) -> float:
    try:
        return bits_of(spec)
    except InputError:
        return float("nan")


def _fill_gmse(runs: pd.DataFrame, baseline: str, where: str) -> None:
    """Each run's weight and activation specs, GMSEs and bits per value (`gmse` and `bits` are the weights'):
    given numbers (range-checked) over the specs' own. Computed once per distinct row of those columns."""
    names = ["w_format", "a_format", "w_gmse", "a_gmse", "w_bits", "a_bits", "capacity_note"]
    inputs = [c for c in ("format", "w_format", "a_format", "gmse", "w_gmse", "a_gmse", "bits", "w_bits", "a_bits")
              if c in runs.columns]
    keys = pd.Series([tuple(map(repr, t)) for t in runs[inputs].itertuples(index=False)], index=runs.index)
    filled = {}
    for row_id, key in keys.items():
        if key in filled:
            continue
        row = runs.loc[row_id]
        w, a = (None, None) if row["format"] == baseline else _spec_or_label(row)  # the baseline is uncompressed
        wg, ag = (_given(row, where, row_id, c, f, GMSE_RANGE, "a GMSE") for c, f in (("w_gmse", "gmse"), ("a_gmse", None)))
        wb, ab = (_given(row, where, row_id, c, f, BITS_RANGE, "bits") for c, f in (("w_bits", "bits"), ("a_bits", None)))
        (wg, w_note), (ag, a_note) = ((g, "") if not np.isnan(g) else _spec_gmse(s) for g, s in ((wg, w), (ag, a)))
        if "/" in str(row["format"]) and a is None and w == split_run_label(row["format"])[0]:
            w_note = (w_note + "; " if w_note else "") + ("the label holds '/' but its halves are not both specs, so "
                                                          "it is read as one label (give w_format/a_format columns "
                                                          "to say which is which)")
        wb, ab = (b if not np.isnan(b) else _spec_bits(s) for b, s in ((wb, w), (ab, a)))
        filled[key] = (w, a, wg, ag, wb, ab, w_note or a_note)
    values = list(zip(*(filled[k] for k in keys)))
    for name, column in zip(names, values):
        runs[name] = list(column)


def require_capacity(info: pd.DataFrame, what: str) -> None:
    """`what` needs every format's GMSE: name the formats that lack it, and why."""
    missing = info[info["w_gmse"].isna() | info["a_gmse"].isna()]
    if len(missing):
        reasons = "; ".join(f"'{f}': {note}" for f, note in missing["capacity_note"].items())
        raise RunTableError(f"{what} needs each format's Gaussian MSE, unknown for {len(missing)} format(s) ({reasons}). "
                            "Give numeric w_gmse/a_gmse columns, or w_format/a_format specs capscale can parse")


FORMAT_COLUMNS = ("w_format", "a_format", "w_gmse", "a_gmse", "w_bits", "a_bits", "capacity_note")


def format_table(runs: pd.DataFrame, what: str = "this analysis") -> pd.DataFrame:
    """One row per format: its specs (None where uncompressed), GMSEs and number of runs. A frame that did not come
    through `load_runs` (labels only: no specs, GMSE or bits columns) is refused naming what `what` needs."""
    missing = [c for c in FORMAT_COLUMNS if c not in runs.columns]
    if missing:
        raise RunTableError(f"{what} needs each format's specs, GMSE and bits per value, and this table has only "
                            f"labels (no {', '.join(missing)} column); read it with capscale.load_runs (it fills them "
                            "from w_format/a_format specs or w_gmse/a_gmse/bits columns), or fit the decoupled, drift or "
                            "qat-error law, which need labels only")
    table = (runs.groupby("format", sort=False)
                 .agg(w_format=("w_format", "first"), a_format=("a_format", "first"), w_gmse=("w_gmse", "first"),
                      a_gmse=("a_gmse", "first"), w_bits=("w_bits", "first"), a_bits=("a_bits", "first"),
                      capacity_note=("capacity_note", "first"), runs=("loss", "size")))
    for col in ("w_format", "a_format"):
        table[col] = table[col].astype(object).where(table[col].notna(), None)
    return table


def token_budgets(runs: pd.DataFrame) -> pd.Series:
    """Each run's token budget per parameter, as a design states it: D/N binned to quarter doublings (sizes round
    their token counts to whole batches, so one budget reads 59.8 at one size and 60.1 at another), each bin named by
    its median ratio rounded to 2 significant digits."""
    ratio = runs["tokens"] / runs["params"]
    bins = np.round(4 * np.log2(ratio))
    names = ratio.groupby(bins).transform("median")
    return names.map(lambda r: float(f"{r:.2g}"))


def run_sides(runs: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """(forward label, backward label) of each run: the `forward` and `backward` columns where a table has them
    (label-only tables), else read from the `format` label (`int4/int4 | bwd int8`; `none`: exact gradients)."""
    split = runs["format"].map(split_run_label)
    forward, backward = split.str[0], split.str[1]
    if "forward" in runs:
        forward = runs["forward"].where(runs["forward"].notna(), forward).astype(str)
    if "backward" in runs:
        backward = runs["backward"].where(runs["backward"].notna(), backward).astype(str)
    backward = backward.map(lambda g: NO_BACKWARD if is_uncompressed(g) else g)  # bf16 gradients are exact ones
    return forward, backward
