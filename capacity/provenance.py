"""Where a result came from: installed versions and the command that ran. Shared by the trainer's run records
and the analysis's saved fits and reports (the one place both may import)."""
from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def package_version(name: str = "capscale") -> str:
    """An installed distribution's version, read from its metadata (nothing is imported)."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def invoked_command() -> str:
    """The command line that is running: `capscale ...` from the command, else `python ...`."""
    program = Path(sys.argv[0])
    if program.name == "capscale" or program.parent.name == "capscale" and program.name == "__main__.py":
        return " ".join(["capscale", *sys.argv[1:]])
    return " ".join(["python", *sys.argv])
