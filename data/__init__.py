"""Data shipped inside the package: the CPU scaling study, its sweep files and logs, and the reference
tables (published capacity grids, the Chinchilla replication's points). Addressed through
importlib.resources, so it works from a source checkout and from an installed wheel alike."""
from importlib.resources import files
from pathlib import Path


def path(*parts: str) -> Path:
    """File system path of a shipped file, e.g. path("reference", "chinchilla_epoch_240.csv")."""
    return Path(str(files(__name__).joinpath(*parts)))
