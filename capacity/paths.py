"""Where capscale caches what it computes once (codebooks, tokenized corpora): $CAPSCALE_CACHE, else the
user cache directory. Nothing is ever downloaded into it."""
import os
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """Create `path` whole or not at all: `write(file)` fills a temporary binary file beside it, which is then
    renamed over `path`, so a crash or a concurrent reader never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def cache_dir() -> Path:
    if "CAPSCALE_CACHE" in os.environ:
        return Path(os.environ["CAPSCALE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "capscale"
