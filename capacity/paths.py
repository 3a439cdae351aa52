"""Where capscale writes. Outputs never replace what capscale did not write: a report goes into a new or empty
folder, or one holding a previous capscale report (its marker file); a file is created whole (a temporary file
renamed into place, so a crash, a failure or a concurrent reader never sees a partial one) and a symlink in
its place is replaced, never followed. The cache ($CAPSCALE_CACHE, else the user cache directory) holds what
capscale computes once (codebooks, tokenized corpora); nothing is ever downloaded into it."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .formats import InputError

REPORT_MARKER = ".capscale-report"  # in a folder capscale wrote a report into: it may write there again


def _temporary(path: Path, write, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: Path, write, mode: int = 0o644) -> None:
    """Create `path` whole or not at all: `write(file)` fills a temporary binary file beside it, which is then
    renamed over `path`. `mode`: its permissions (before the umask)."""
    os.replace(_temporary(Path(path), write, mode), path)


def write_files(folder: Path, contents: dict[str, bytes]) -> None:
    """Write every file of `contents` into `folder` or none: all are written to temporary files first, then
    renamed into place, so a failure leaves the previous files whole."""
    for name in contents:
        if (folder / name).is_dir() and not (folder / name).is_symlink():
            raise IsADirectoryError(21, "a folder stands where a report file goes", str(folder / name))
    staged = []
    try:
        for name, data in contents.items():
            staged.append((_temporary(folder / name, lambda f, data=data: f.write(data)), folder / name))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in staged:
        os.replace(tmp, path)


def _named(path: "str | Path", option: str) -> Path:
    if not str(path).strip():
        raise InputError(f"{option}: an empty path; name the place to write")
    return Path(path)


def report_folder(folder: "str | Path", overwrite: bool = False, option: str = "-o") -> Path:
    """The report folder, created (and checked writable) now, before any computation that would be lost: a new or
    empty folder, one holding a previous capscale report, or, with `overwrite`, any folder."""
    folder = _named(folder, option)
    if folder.is_symlink() or folder.exists() and not folder.is_dir():
        raise InputError(f"{option} {folder}: exists and is not a folder")
    if folder.is_dir() and not overwrite and not (folder / REPORT_MARKER).is_file() and any(folder.iterdir()):
        raise InputError(f"{option} {folder}: holds files capscale did not write; give a new folder, or --overwrite "
                         "to write the report's files into it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / REPORT_MARKER, lambda f: f.write(b"a capscale report folder\n"))
    except OSError as err:
        raise InputError(f"{option} {folder}: cannot write there ({err.strerror})") from None
    return folder


def output_file(path: "str | Path", recognise, overwrite: bool = False, option: str = "-o") -> Path:
    """A file to write: new, or one that `recognise(text)` says capscale wrote, or any with `overwrite`."""
    path = _named(path, option)
    if path.is_dir():
        raise InputError(f"{option} {path}: is a folder; name a file")
    if (path.exists() or path.is_symlink()) and not overwrite:
        try:
            ours = not path.is_symlink() and recognise(path.read_text())
        except (OSError, UnicodeDecodeError):
            ours = False
        if not ours:
            raise InputError(f"{option} {path}: exists and capscale did not write it; give a new file, or "
                             "--overwrite to replace it")
    return path


def is_json_with(key: str):
    """A `recognise` for output_file: JSON whose top level has `key`."""
    def recognise(text: str) -> bool:
        try:
            content = json.loads(text)
        except (ValueError, RecursionError):
            return False
        return isinstance(content, dict) and key in content
    return recognise


def strict_json(value):
    """`value` with every non-finite float as None (null) and numpy scalars as Python numbers, recursively:
    what json.dumps writes is then valid JSON (no bare NaN or Infinity)."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a numpy or torch scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def cache_dir() -> Path:
    if "CAPSCALE_CACHE" in os.environ:
        return Path(os.environ["CAPSCALE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "capscale"
