"""The run-table schema and its one reader and writer, shared by the trainer (which writes runs) and the
analysis (which fits them).

A run table is CSV or JSON lines, one run per row. Required: `format` (a label), `params` (N,
non-embedding parameters), `tokens` (D), `loss` (final validation loss, nats/token). Optional:
`w_format`, `a_format` (spec strings; a missing w_format means the label is the weights' spec and
activations are uncompressed), `gmse`, `w_gmse`, `a_gmse`, `bits`, `w_bits`, `a_bits` (numeric overrides
of what the specs give; `gmse` and `bits` are the weights'), `status` (only `ok` rows are fitted), `seed`,
and any other metadata.

JSON lines are written by appending under an exclusive lock, flushed to disk, so concurrent writers and
crashes neither lose nor interleave records. Only a file recognised as a run table (new, empty, or JSON lines
whose every record carries the required columns) is ever appended to; anything else is refused untouched. A
crash mid-append leaves a torn last line (an unfinished JSON object): readers skip it with a warning, and the
next append moves it aside to `<table>.torn` (under the lock) before writing. Before training, a run
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


def append_record(path: "str | Path", record: dict) -> None:
    """Append one run as a JSON line, under an exclusive lock, flushed to disk before returning. A file that is
    not a run table is refused untouched; a torn last line left by a crash is moved to `<table>.torn` first; a
    complete last record that lacks its newline gets one."""
    from .paths import strict_json
    line = json.dumps(strict_json(record), sort_keys=False, default=str, allow_nan=False) + "\n"  # NaN as null
    path = Path(path)
    require_run_table(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            content = f.read()
            records, torn = _split(path, content)
            _require_records(path, records)
            if torn:
                with open(f"{path}.torn", "ab") as aside:
                    aside.write(torn + b"\n")
                    aside.flush()
                    os.fsync(aside.fileno())
                f.truncate(len(content) - len(torn))
            elif content and not content.endswith(b"\n"):
                f.write(b"\n")
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
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    stat = _proc_stat(pid)  # an exited process its parent has not reaped yet (a zombie) is dead too
    return stat is None or stat[0] != "Z"


def process_start(pid: int) -> str | None:
    """When process `pid` started (boot id and start tick, Linux): a reused pid has another. None elsewhere."""
    stat = _proc_stat(pid)
    try:
        return f"{Path('/proc/sys/kernel/random/boot_id').read_text().strip()}:{stat[19]}" if stat else None
    except (OSError, IndexError):
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None where there are none."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split() or None
    except OSError:
        return None


def set_aside(path: Path, why: str) -> Path:
    """Move a damaged file or folder capscale keeps (a claim, a sweep log, a checkpoint) out of the way, with a
    warning: kept for a look, never deleted."""
    aside = path.with_name(f"{path.name}.damaged-{int(time.time())}-{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:  # another process moved it first
        return aside
    warnings.warn(f"{path}: {why}; moved aside to {aside.name}", stacklevel=3)
    return aside


def _stale(file: Path) -> bool:
    """A claim whose owner is gone: its process dead or replaced by another with the same pid (same machine), or
    not refreshed for CLAIM_STALE_S (any machine)."""
    try:
        age = time.time() - file.lstat().st_mtime
        owner = json.loads(file.read_text() or "{}") if file.is_file() and not file.is_symlink() else None
    except FileNotFoundError:
        return True
    except (OSError, ValueError, RecursionError):  # being written this instant, or garbage: judged by its age alone
        return age > CLAIM_STALE_S
    if not isinstance(owner, dict):
        return True
    if age > CLAIM_STALE_S:
        return True
    pid = owner.get("pid")
    if owner.get("host") == socket.gethostname() and isinstance(pid, int) and not isinstance(pid, bool):
        if not _alive(pid):
            return True
        start = owner.get("start")
        return start is not None and start != process_start(pid)
    return False


def _remove(file: Path) -> None:
    if file.is_dir() and not file.is_symlink():
        set_aside(file, "a claim that is a folder")
    else:
        file.unlink(missing_ok=True)


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
        """Drop the claim, and the claims folder with it when no other claim is left in it (a claim in the
        making holds its owner file there, so the folder is not empty then)."""
        self._stop.set()
        self.file.unlink(missing_ok=True)
        try:
            self.file.parent.rmdir()
        except OSError:
            pass


def held_elsewhere(path: "str | Path", key: str) -> bool:
    """Whether run `key` of table `path` is claimed by another live process (its claim is not stale)."""
    file = Path(f"{path}.claims") / f"{key}.claim"
    return (file.exists() or file.is_symlink()) and not _stale(file)


def claim(path: "str | Path", key: str) -> Claim | None:
    """Claim run `key` of table `path` for this process, atomically (a hard link in `<table>.claims/`); None if
    another live process holds it. A claim is stale when its process is dead or its pid now belongs to a process
    that started later (same machine), or it has not been refreshed for CLAIM_STALE_S (any machine, so also a
    shared file system): a stale claim is taken over; a damaged one (a folder, garbage) is moved aside."""
    folder = Path(f"{path}.claims")
    if folder.is_symlink() or folder.exists() and not folder.is_dir():
        set_aside(folder, "the claims folder is not a folder")
    file = folder / f"{key}.claim"
    owner = folder / f".{key}.{socket.gethostname()}.{os.getpid()}.tmp"
    record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid()),
                         "time": time.time()})
    for attempt in range(3):  # a releasing process removes the folder when it is empty: make it again
        folder.mkdir(parents=True, exist_ok=True)
        try:
            owner.write_text(record)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
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
                    _remove(file)
            continue
        return Claim(file)
    return None
