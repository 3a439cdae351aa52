"""Where capkit caches what it computes once (codebooks, tokenized corpora): $CAPKIT_CACHE, else the
user cache directory. Nothing is ever downloaded into it."""
import os
from pathlib import Path


def cache_dir() -> Path:
    if "CAPKIT_CACHE" in os.environ:
        return Path(os.environ["CAPKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "capkit"
