"""The run-table schema and its one reader and writer, shared by the trainer (which writes runs) and the
analysis (which fits them).

A run table is CSV or JSON lines, one run per row. Required: `format` (a label), `params` (N,
non-embedding parameters), `tokens` (D), `loss` (final validation loss, nats/token). Optional:
`w_format`, `a_format` (spec strings; a missing w_format means the label is the weights' spec and
activations are uncompressed), `gmse`, `w_gmse`, `a_gmse`, `bits`, `w_bits`, `a_bits` (numeric overrides
of what the specs give; `gmse` and `bits` are the weights'), `status` (only `ok` rows are fitted), `seed`,
and any other metadata.

JSON lines are written by appending under an exclusive lock, flushed to disk, so concurrent writers and
crashes neither lose nor interleave records. A crash mid-append leaves a torn last line: readers skip it
with a warning, and the next append cuts it off (under the lock) before writing. Before training, a run
is claimed (`claim`), so that concurrent sweeps on one table, on one machine or on a shared file system,
never train the same run twice.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import warnings
from pathlib import Path

from .formats import InputError
from .spec import BASELINE, is_uncompressed

REQUIRED = ("format", "params", "tokens", "loss")
OPTIONAL = ("w_format", "a_format", "gmse", "w_gmse", "a_gmse", "bits", "w_bits", "a_bits", "status", "seed")
STATUSES = ("ok", "diverged", "failed")
FINISHED = ("ok", "diverged")  # a run with one of these records is never trained again
CLAIM_STALE_S = 600.0          # a claim from another machine not refreshed for this long belongs to a dead process
CLAIM_REFRESH_S = 60.0


class RunTableError(InputError):
    """A run table that cannot be read or fitted: the message names file, row and column."""


def format_label(w_format: str | None, a_format: str | None) -> str:
    """Readable label of a weights/activations pair: `int4`, `int4/int4` (W/A), `bf16/int4` (activations only)."""
    w = BASELINE if is_uncompressed(w_format) else str(w_format)
    return w if is_uncompressed(a_format) else f"{w}/{a_format}"


def split_label(label: str) -> tuple[str, str | None]:
    """(weights part, activations part or None) of a label: the inverse of `format_label`."""
    w, _, a = str(label).partition("/")
    return w, (a or None)


def _parse_line(path: Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise RunTableError(f"{path}: line {number}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise RunTableError(f"{path}: line {number}: expected a JSON object (one run), got {type(record).__name__}")
    return record


def read_lines(path: "str | Path") -> list[tuple[int, dict]]:
    """(line number, record) for every record of a JSON-lines run table; [] if the file does not exist.

    A torn last line (no final newline and not valid JSON: a write cut short) is skipped with a warning; any
    other line that is not a JSON object is an error naming the file and the line."""
    path = Path(path)
    if not path.exists():
        return []
    if not path.is_file():
        raise RunTableError(f"{path}: not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise RunTableError(f"{path}: not UTF-8 text (byte {err.start}); a run table is CSV or JSON lines") from None
    *complete, tail = text.split("\n")
    records = [(n, _parse_line(path, n, line)) for n, line in enumerate(complete, 1) if line.strip()]
    if tail.strip():
        try:
            records.append((len(complete) + 1, _parse_line(path, len(complete) + 1, tail)))
        except RunTableError:
            warnings.warn(f"{path}: line {len(complete) + 1} is incomplete (a write cut short); skipped",
                          stacklevel=2)
    return records


def read_records(path: "str | Path") -> list[dict]:
    return [record for _, record in read_lines(path)]


def finished_keys(path: "str | Path") -> set:
    """Content keys of the runs that finished (ok or diverged): never trained again."""
    return {r.get("key") for r in read_records(path) if r.get("status") in FINISHED}


def append_record(path: "str | Path", record: dict) -> None:
    """Append one run as a JSON line, under an exclusive lock, flushed to disk before returning. A torn last line
    left by a crash is cut off first; a complete last record that lacks its newline gets one."""
    line = json.dumps(record, sort_keys=False, default=str) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            content = f.read()
            if content and not content.endswith(b"\n"):
                cut = content.rfind(b"\n") + 1
                try:
                    _parse_line(path, 0, content[cut:].decode("utf-8"))
                    f.write(b"\n")
                except (RunTableError, UnicodeDecodeError):
                    f.truncate(cut)
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(file: Path) -> bool:
    try:
        age = time.time() - file.stat().st_mtime
        owner = json.loads(file.read_text() or "{}")
    except FileNotFoundError:
        return True
    except (OSError, ValueError):  # being written this instant, or garbage: judged by its age alone
        return age > CLAIM_STALE_S
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        return not _alive(owner["pid"])
    return age > CLAIM_STALE_S


class Claim:
    """A run claimed for training by this process; refreshed in the background, released when done."""

    def __init__(self, file: Path):
        self.file, self._stop = file, threading.Event()
        self._thread = threading.Thread(target=self._refresh, daemon=True)
        self._thread.start()

    def _refresh(self):
        while not self._stop.wait(CLAIM_REFRESH_S):
            try:
                os.utime(self.file)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        self.file.unlink(missing_ok=True)


def claim(path: "str | Path", key: str) -> Claim | None:
    """Claim run `key` of table `path` for this process, atomically (a hard link in `<table>.claims/`); None if
    another live process holds it. A claim is stale when its process is dead (same machine) or it has not been
    refreshed for CLAIM_STALE_S (another machine sharing the file system): a stale claim is taken over."""
    folder = Path(f"{path}.claims")
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{key}.claim"
    owner = folder / f".{key}.{socket.gethostname()}.{os.getpid()}.tmp"
    owner.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}))
    try:
        return _take(file, owner, folder)
    finally:
        owner.unlink(missing_ok=True)


def _take(file: Path, owner: Path, folder: Path) -> Claim | None:
    """Link the written owner record to the claim's name: exclusive, and never an empty claim (a process killed
    between creating a claim file and writing its owner left one that no one could judge stale)."""
    for _ in range(3):
        try:
            os.link(owner, file)
        except FileExistsError:
            if not _stale(file):
                return None
            with open(folder / ".lock", "a") as lock:  # breakers take turns: each re-judges what it would remove
                fcntl.flock(lock, fcntl.LOCK_EX)
                if _stale(file):
                    file.unlink(missing_ok=True)
            continue
        return Claim(file)
    return None
