"""The run-table schema and its one reader and writer, shared by the trainer (which writes runs) and the
analysis (which fits them).

A run table is CSV or JSON lines, one run per row. Required: `format` (a label), `params` (N,
non-embedding parameters), `tokens` (D), `loss` (final validation loss, nats/token). Optional:
`w_format`, `a_format` (spec strings; a missing w_format means the label is the weights' spec and
activations are uncompressed), `gmse`, `w_gmse`, `a_gmse`, `bits`, `w_bits`, `a_bits` (numeric overrides
of what the specs give; `gmse` and `bits` are the weights'), `status` (only `ok` rows are fitted), `seed`,
and any other metadata.

Writing (appending under a lock) and claiming runs are the trainer's, in `trainers.runlog`: this module holds no
locking. A torn last line (a write cut short) is skipped by the reader with a warning.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from .errors import InputError
from .spec import BASELINE, is_uncompressed

REQUIRED = ("format", "params", "tokens", "loss")
OPTIONAL = ("w_format", "a_format", "gmse", "w_gmse", "a_gmse", "bits", "w_bits", "a_bits", "status", "seed")
STATUSES = ("ok", "diverged", "failed")
FINISHED = ("ok", "diverged")  # a run with one of these records is never trained again


class RunTableError(InputError):
    """A run table that cannot be read or fitted: the message names file, row and column."""


def format_label(w_format: str | None, a_format: str | None) -> str:
    """Readable label of a weights/activations pair: `int4`, `int4/int4` (W/A), `bf16/int4` (activations only)."""
    w = BASELINE if is_uncompressed(w_format) else str(w_format)
    return w if is_uncompressed(a_format) else f"{w}/{a_format}"


BACKWARD_MARK = " | bwd "  # in a label, what follows are the backward pass's formats
NO_BACKWARD = "none"      # the backward label of exact gradients


def backward_label(g_format: str | None = None, gw_format: str | None = None, gx_format: str | None = None,
                   dgrad_format: str | None = None, wgrad_format: str | None = None) -> str:
    """Label of the backward pass's formats (dL/dY, W re-quantized for dL/dX, X re-quantized for dL/dW, and the two
    GEMMs' own: dgrad, wgrad): one spec when they all agree on every operand, `g=..,gw=..,gx=..,dgrad=..,wgrad=..`
    (the ones given) otherwise, `none` for exact gradients."""
    given = {k: v for k, v in (("g", g_format), ("gw", gw_format), ("gx", gx_format), ("dgrad", dgrad_format),
                               ("wgrad", wgrad_format)) if not is_uncompressed(v)}
    if not given:
        return NO_BACKWARD
    if set(given) in ({"g", "gw", "gx"}, {"dgrad", "wgrad"}) and len(set(given.values())) == 1:
        return next(iter(given.values()))
    return ",".join(f"{k}={v}" for k, v in given.items())


def run_label(w_format, a_format, g_format=None, gw_format=None, gx_format=None, dgrad_format=None,
              wgrad_format=None) -> str:
    """A run's format label: the forward pair (`format_label`), then ` | bwd ` and the backward label if any."""
    backward = backward_label(g_format, gw_format, gx_format, dgrad_format, wgrad_format)
    return format_label(w_format, a_format) + ("" if backward == NO_BACKWARD else BACKWARD_MARK + backward)


def split_run_label(label: str) -> tuple[str, str]:
    """(forward label, backward label) of a run label: the inverse of `run_label`."""
    forward, _, backward = str(label).partition(BACKWARD_MARK)
    return forward, backward or NO_BACKWARD


def is_spec(text: str) -> bool:
    """Whether text names a format capscale can build (an uncompressed name counts)."""
    from .spec import parse
    if is_uncompressed(text):
        return True
    try:
        parse(text)
        return True
    except InputError:
        return False


def split_label(label: str) -> tuple[str, str | None]:
    """(weights part, activations part or None) of a label's forward pair: the inverse of `format_label`. A '/'
    splits only where both halves are specs capscale can build: `nvfp4 4/6` stays one label, never weights
    `nvfp4 4` with activations `6`."""
    forward = split_run_label(label)[0]
    w, sep, a = forward.partition("/")
    if not sep:
        return w, None
    return (w, a or None) if is_spec(w) and is_spec(a) else (forward, None)


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key(s) {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _parse_line(path: Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise RunTableError(f"{path}: line {number}: JSON nested too deeply to be a run") from None
    except json.JSONDecodeError as err:
        raise RunTableError(f"{path}: line {number}: not valid JSON ({err.msg})") from None
    except ValueError as err:  # a key given twice: which value is the run's is not for capscale to guess
        raise RunTableError(f"{path}: line {number}: {err}; a run's fields appear once") from None
    if not isinstance(record, dict):
        raise RunTableError(f"{path}: line {number}: expected a JSON object (one run), got {type(record).__name__}")
    return record


def _split(path: Path, content: bytes) -> tuple[list[tuple[int, dict]], bytes]:
    """(the complete records, a torn tail or b""). A last line without its newline is a record if it parses, torn
    if it is an unfinished JSON object; any other line that is not a JSON object names the file and the line."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RunTableError(f"{path}: not UTF-8 text (byte {err.start}); a run table is CSV or JSON lines") from None
    *complete, tail = text.split("\n")
    records = [(n, _parse_line(path, n, line)) for n, line in enumerate(complete, 1) if line.strip()]
    if not tail.strip():
        return records, b""
    number = len(complete) + 1
    try:
        records.append((number, _parse_line(path, number, tail)))
        return records, b""
    except RunTableError:
        if not tail.lstrip().startswith("{"):
            raise
        return records, tail.encode()


def read_lines(path: "str | Path") -> list[tuple[int, dict]]:
    """(line number, record) for every record of a JSON-lines run table; [] if the file does not exist. A torn
    last line (a write cut short) is skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    if not path.is_file():
        raise RunTableError(f"{path}: not a file")
    records, torn = _split(path, path.read_bytes())
    if torn:
        warnings.warn(f"{path}: line {len(records) + 1} is incomplete (a write cut short); skipped", stacklevel=2)
    return records


def _require_records(path: Path, records: list[tuple[int, dict]]) -> None:
    for number, record in records:
        if missing := [c for c in REQUIRED if c not in record]:
            raise RunTableError(f"{path}: line {number} is not a run record (no {missing}): capscale appends only "
                                "to a run table it recognises; give a new file for --runs")


def require_run_table(path: "str | Path") -> None:
    """Refuse, before any work, a file that runs would be appended to but that is not a run table."""
    path = Path(path)
    if path.is_symlink() or path.exists() and not path.is_file():
        raise RunTableError(f"{path}: not a regular file; a run table is a JSON-lines file capscale writes")
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        raise RunTableError(f"{path}: a run table that capscale writes is a .jsonl file")
    if path.exists():
        _require_records(path, _split(path, path.read_bytes())[0])


def read_records(path: "str | Path") -> list[dict]:
    return [record for _, record in read_lines(path)]


def finished_keys(path: "str | Path") -> set:
    """Content keys of the runs that finished (ok or diverged): never trained again."""
    return {r.get("key") for r in read_records(path) if r.get("status") in FINISHED}
