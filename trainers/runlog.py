"""The trainer's side of a run table: appending records under an exclusive lock, flushed to disk, so concurrent
writers and crashes neither lose nor interleave records, and claiming runs so that concurrent sweeps (on one
machine or on a shared file system) never train the same run twice. The schema and its reader are
`capacity.runtable`'s; only the trainer writes or claims.

Only a file recognised as a run table (new, empty, or JSON lines whose every record carries the required columns)
is ever appended to. A crash mid-append leaves a torn last line (an unfinished JSON object): readers skip it with a
warning, and the next append moves it aside to `<table>.torn` (under the lock) before writing."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import warnings
from pathlib import Path

from capscale.capacity.runtable import _require_records, _split, require_run_table

CLAIM_STALE_S = 600.0          # a claim from another machine not refreshed for this long belongs to a dead process
CLAIM_REFRESH_S = 60.0


def append_record(path: "str | Path", record: dict) -> None:
    """Append one run as a JSON line, under an exclusive lock, flushed to disk before returning. A file that is
    not a run table is refused untouched; a torn last line left by a crash is moved to `<table>.torn` first; a
    complete last record that lacks its newline gets one."""
    from capscale.capacity.paths import strict_json
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
