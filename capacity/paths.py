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

from .errors import InputError

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
    tmp = _temporary(Path(path), write, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    try:
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:  # a rename refused (a read-only folder): no temporary file is left behind
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


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


FIGURE_KINDS = ("png", "svg")
FIGURE_MARK = "capscale"  # in a figure's metadata (PNG Software, SVG Creator): a figure capscale may replace


def _written_by_capscale(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return FIGURE_MARK.encode() in f.read(1 << 16)
    except OSError:
        return False


def figure_file(path: "str | Path", option: str = "--figure") -> tuple[Path, str]:
    """(path, kind) of a figure to write exactly at `path`: a name ending in .png or .svg, in an existing folder,
    new or a figure capscale wrote; never a folder, a symlink, a device or FIFO, or a user's file."""
    path = _named(path, option)
    kind = path.suffix.lower().lstrip(".")
    if str(path).endswith(("/", os.sep)) or path.is_dir() and not path.is_symlink():
        raise InputError(f"{option} {path}: is a folder; name a .png or .svg file")
    if kind not in FIGURE_KINDS:
        raise InputError(f"{option} {path}: expected a file name ending in .png or .svg (written exactly there)")
    if path.is_symlink():
        raise InputError(f"{option} {path}: is a symbolic link; capscale never writes through one, name a new file")
    if path.exists() and not path.is_file():
        raise InputError(f"{option} {path}: exists and is not a regular file")
    if path.exists() and not _written_by_capscale(path):
        raise InputError(f"{option} {path}: exists and capscale did not write it; name a new file")
    if not path.parent.is_dir():
        raise InputError(f"{option} {path}: its folder {path.parent} does not exist")
    return path, kind


def save_figure(fig, path: "str | Path", option: str = "--figure", dpi: int = 150) -> Path:
    """`fig` (a matplotlib Figure, or anything with its savefig) written whole at `path` (`figure_file`'s rule),
    marked as capscale's so that a later run may replace it."""
    path, kind = figure_file(path, option)
    metadata = {"Software": FIGURE_MARK} if kind == "png" else {"Creator": FIGURE_MARK}
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=kind, dpi=dpi, bbox_inches="tight", metadata=metadata))
    except OSError as err:
        raise InputError(f"{option} {path}: cannot write there ({err.strerror})") from None
    return path


def regular_file(path: Path, what: str = "file") -> Path:
    """`path` if it is a regular file; a folder, FIFO or device is refused before it is opened (reading a FIFO may
    never end, a device never stop)."""
    if not path.exists():
        raise InputError(f"{path}: no such {what}")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file (a folder, a FIFO or a device?): a {what} is never read from one")
    return path


def read_small_text(path: Path, limit: int, what: str) -> str:
    """The UTF-8 text of a small regular file (a sweep file, a model's config.json), refused in one line when it is
    not a regular file, larger than `limit` bytes, or not UTF-8."""
    size = regular_file(path, what).stat().st_size
    if size > limit:
        raise InputError(f"{path}: {size:,} bytes; a {what} is at most {limit:,}")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.start}); a {what} is UTF-8 text") from None


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
    """$CAPSCALE_CACHE, else the user cache directory's capscale folder; refused in one line if it names a file."""
    if "CAPSCALE_CACHE" in os.environ:
        folder = Path(os.environ["CAPSCALE_CACHE"])
    else:
        folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "capscale"
    if folder.exists() and not folder.is_dir():
        raise InputError(f"CAPSCALE_CACHE {folder}: exists and is not a folder; point it at a folder")
    return folder
