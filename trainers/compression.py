"""How a model trains over formats: one settings object, parsed once, the single source of the training
command line's compression options and of their columns in a run record.

Adding a setting means adding a field here (with its help text) and using it where it acts; the CLI
option, the run record, the run's content key and the sweep file's [train] table follow from the field.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields

from capscale import capacity
from capscale.capacity import BASELINE, InputError, is_uncompressed
from capscale.capacity.runtable import format_label

ESTIMATORS = ("ste", "clipped", "trust")
BACKWARD_MASKS = ("masked", "dense", "rbbm")


def _option(help: str, **argparse_kwargs) -> dict:
    return {"help": help, **argparse_kwargs}


@dataclass(frozen=True)
class Compression:
    w_format: str = field(default=BASELINE, metadata=_option(
        "weights format spec (default: %(default)s, uncompressed)"))
    a_format: str | None = field(default=None, metadata=_option(
        "input-activations format spec (default: uncompressed)"))
    estimator: str = field(default="trust", metadata=_option(
        "gradient estimator: straight-through, clipped, or QuEST's trust region", choices=ESTIMATORS))
    trust: float | None = field(default=None, metadata=_option(
        "trust radius in RMS units (default: per format)", type=float))
    backward_mask: str = field(default="masked", metadata=_option(
        "gradient of pruned entries in sparse formats", choices=BACKWARD_MASKS))
    rbbm_p: float = field(default=0.2, metadata=_option("RBBM band parameter p", type=float))

    def __post_init__(self):
        # One meaning of "uncompressed": weights default to the baseline label, activations to no spec.
        object.__setattr__(self, "w_format", BASELINE if is_uncompressed(self.w_format) else str(self.w_format))
        object.__setattr__(self, "a_format", None if is_uncompressed(self.a_format) else str(self.a_format))
        if self.estimator not in ESTIMATORS:
            raise InputError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.backward_mask not in BACKWARD_MASKS:
            raise InputError(f"backward mask must be one of {', '.join(BACKWARD_MASKS)}, got {self.backward_mask!r}")
        self.w_fmt, self.a_fmt  # parse now: a bad spec fails before any training

    @functools.cached_property
    def w_fmt(self) -> capacity.Format | None:
        """The weights' Format, parsed once (None: uncompressed)."""
        return None if is_uncompressed(self.w_format) else capacity.parse(self.w_format)

    @functools.cached_property
    def a_fmt(self) -> capacity.Format | None:
        return None if is_uncompressed(self.a_format) else capacity.parse(self.a_format)

    @property
    def label(self) -> str:
        return format_label(self.w_format, self.a_format)

    def settings(self) -> dict:
        """The settings as plain values: what the run's content key hashes."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_record(self) -> dict:
        """The run-record columns of these settings (the schema's `format`, `w_format`, `a_format` and the rest)."""
        return {"format": self.label, **self.settings(), "a_format": self.a_format or "none",
                "w_gmse": capacity.spec_gmse(self.w_format), "a_gmse": capacity.spec_gmse(self.a_format)}

    @classmethod
    def from_record(cls, record: dict) -> "Compression":
        """The settings a run record was trained with (the inverse of `to_record`)."""
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})

    @classmethod
    def add_options(cls, parser) -> None:
        """One command-line option per setting: --w-format, --estimator, ..."""
        for f in fields(cls):
            parser.add_argument("--" + f.name.replace("_", "-"), default=f.default, **f.metadata)

    @classmethod
    def from_options(cls, args) -> "Compression":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    @classmethod
    def names(cls) -> set:
        return {f.name for f in fields(cls)}

    def __getstate__(self):  # parsed Formats are rebuilt where unpickled (sweep workers), not shipped
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __setstate__(self, state):
        self.__dict__.update(state)
