"""The run-table schema, shared by the trainer (which writes runs) and the analysis (which fits them).

A run table is CSV or JSON lines, one run per row. Required: `format` (a label), `params` (N,
non-embedding parameters), `tokens` (D), `loss` (final validation loss, nats/token). Optional:
`w_format`, `a_format` (spec strings; a missing w_format means the label is the weights' spec and
activations are uncompressed), `gmse`, `w_gmse`, `a_gmse` (numeric overrides), `status` (only `ok`
rows are fitted), `seed`, and any other metadata. JSON-lines appends are locked and flushed, so
concurrent writers and crashes neither lose nor interleave records.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from .spec import BASELINE, is_uncompressed

REQUIRED = ("format", "params", "tokens", "loss")
OPTIONAL = ("w_format", "a_format", "gmse", "w_gmse", "a_gmse", "status", "seed")
STATUSES = ("ok", "diverged", "failed")


def format_label(w_format: str | None, a_format: str | None) -> str:
    """Readable label of a weights/activations pair: `int4`, `int4/int4` (W/A), `bf16/int4` (activations only)."""
    w = BASELINE if is_uncompressed(w_format) else str(w_format)
    return w if is_uncompressed(a_format) else f"{w}/{a_format}"


def append_record(path: "str | Path", record: dict) -> None:
    """Append one run as a JSON line, under an exclusive lock, flushed to disk before returning."""
    line = json.dumps(record, sort_keys=False, default=str) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_records(path: "str | Path") -> list[dict]:
    """All complete JSON-lines records of a file (a torn last line from a crash is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    if line.endswith("\n"):
                        raise
    return records
