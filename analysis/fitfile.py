"""Fit once, reuse everywhere: a decoupled fit and its bootstrap replicates saved as JSON, with the data's
fingerprint, so that validate, predict, compose and report answer in seconds without refitting.

A saved fit is data from anywhere, so loading verifies it before any number is used: its checksum (an edit
after saving), its data fingerprint (a fit of other runs), every key and type, the settings' ranges, and the
numbers themselves: parameters and efficiencies must be the ones its constants give on these runs, with the
objective they reach, and each point estimate must lie within the spread of its own bootstrap replicates.

The checksum is plain SHA-256, which anyone can recompute after an edit; so a fit is verified, not trusted: its
exponents must lie in the range the fitter searches, a local refit started from its constants must find no lower
objective (edited constants are not an optimum), and a sample of its bootstrap replicates (first, middle, last) is
refitted from their resample seeds and must match. What a saved fit guarantees: its point estimates are a local
optimum of the law on exactly these runs, and its intervals come from replicates that these runs reproduce."""
from __future__ import annotations

import hashlib
import json
import math
import platform
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from capscale.capacity import InputError
from capscale.capacity.paths import atomic_write, is_json_with, output_file
from capscale.capacity.provenance import invoked_command, package_version

from .bootstrap import BootstrapResult, refit_replicates
from .laws import DecoupledLaw, make_law
from .solver import EXPONENT_GRID
from .names import MAX_REPLICATES, RESAMPLING_UNITS

FORMAT_VERSION = 3        # 3: replicate indices and unit, verified by refitting; earlier files are refused (refit)
MAX_FILE_BYTES = 64 << 20
LAW_KEYS = {"name", "settings", "params", "eff", "formats", "theta", "objective"}
BOOT_KEYS = {"samples", "n_failed", "level", "seed", "replicates", "unit"}
CHECKED_REPLICATES = 3    # bootstrap replicates refitted on load and compared with the saved ones
REFIT_TOLERANCE = 1e-6    # relative: a saved fit's objective may not be beaten by a refit from its own constants
REPLICATE_TOLERANCE = 1e-4  # relative difference allowed between a saved and a recomputed replicate value
TOP_KEYS = {"capscale_fit", "fingerprint", "n_runs", "law", "bootstrap", "command", "versions", "created", "checksum"}


def fingerprint(runs: pd.DataFrame) -> str:
    """SHA-256 of the fitted rows (format, params, tokens, loss), order-free: what a fit depends on."""
    rows = runs[["format", "params", "tokens", "loss"]].astype({"format": str}).sort_values(
        ["format", "params", "tokens", "loss"])
    return hashlib.sha256(rows.to_csv(index=False, float_format="%.12g").encode()).hexdigest()


def _checksum(content: dict) -> str:
    body = {k: v for k, v in content.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_fit(path: "str | Path", law: DecoupledLaw, boot: BootstrapResult | None, runs: pd.DataFrame,
             seed: int = 0, overwrite: bool = False) -> Path:
    """Write the fit to `path`: a new file, a fit capscale saved before, or (`overwrite`) any file."""
    if not isinstance(law, DecoupledLaw):
        raise InputError(f"the {law.name} law's fit cannot be saved and reused: save a decoupled, drift or qat-error fit")
    path = output_file(path, is_json_with("capscale_fit"), overwrite)
    content = {
        "capscale_fit": FORMAT_VERSION, "fingerprint": fingerprint(runs), "n_runs": len(runs),
        "law": {"name": law.name, "settings": law.bootstrap_params(), "params": law.params_, "eff": law.eff_,
                "formats": law.formats_, "theta": [float(v) for v in law.theta_], "objective": law.objective_},
        "bootstrap": None if boot is None else {"samples": boot.samples.to_dict("list"), "n_failed": boot.n_failed,
                                                 "level": boot.level, "seed": seed,
                                                 "replicates": list(boot.replicates or []), "unit": boot.unit},
        "command": invoked_command(),
        "versions": {p: package_version(p) for p in ("capscale", "numpy", "scipy", "pandas", "statsmodels")}
        | {"python": platform.python_version()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    content["checksum"] = _checksum(content)
    try:
        atomic_write(path, lambda f: f.write(json.dumps(content, indent=1).encode()))
    except OSError as err:
        raise InputError(f"-o {path}: cannot write there ({err.strerror})") from None
    return path


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class _Refuse:
    def __init__(self, path):
        self.path = path

    def __call__(self, ok: bool, why: str) -> None:
        if not ok:
            raise InputError(f"--fit {self.path}: {why}; refit with `capscale fit RUNS -o FILE`")


def _read(path: Path, need: _Refuse) -> dict:
    try:
        need(path.stat().st_size <= MAX_FILE_BYTES, f"larger than {MAX_FILE_BYTES >> 20} MiB: not a saved fit")
        content = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"--fit {path}: no such file") from None
    except (OSError, ValueError, RecursionError) as err:
        raise InputError(f"--fit {path}: not a saved capscale fit ({type(err).__name__})") from None
    need(isinstance(content, dict) and "capscale_fit" in content, "not a saved capscale fit")
    need(content["capscale_fit"] == FORMAT_VERSION, f"saved by another capscale version (format "
         f"{content['capscale_fit']!r}, this one reads {FORMAT_VERSION})")
    need(set(content) == TOP_KEYS, f"unexpected or missing keys {sorted(set(content) ^ TOP_KEYS)}")
    need(content["checksum"] == _checksum(content), "edited after it was saved (its checksum does not match)")
    return content


SAVABLE_LAWS = ("decoupled", "drift", "qat-error")  # the laws with an optimiser vector `theta_` that `restore` reads


def _positive_or_none(v) -> bool:
    return v is None or _real(v) and v > 0


SETTING_CHECKS = {"baseline": lambda v: isinstance(v, str), "delta": lambda v: _real(v) and v > 0,
                  "fix_E": lambda v: v is None or _real(v) and v >= 0, "saturation": _positive_or_none,
                  "reference_ratio": lambda v: _real(v) and v > 0, "reference_params": _positive_or_none,
                  "drift_from": _positive_or_none}


def _law(law_data, runs: pd.DataFrame, need: _Refuse) -> DecoupledLaw:
    need(isinstance(law_data, dict) and set(law_data) == LAW_KEYS and law_data["name"] in SAVABLE_LAWS,
         f"not a fit of a law that can be reused ({', '.join(SAVABLE_LAWS)})")
    empty = make_law(law_data["name"])
    settings = law_data["settings"]
    need(isinstance(settings, dict) and set(settings) == set(empty.get_params()), "bad law settings")
    need(all(SETTING_CHECKS[k](v) for k, v in settings.items()), "bad law settings")
    theta = law_data["theta"]
    need(isinstance(theta, list) and all(_real(v) for v in theta), "its constants are not a list of numbers")
    try:
        law = make_law(law_data["name"], **settings).restore(theta, runs)
    except InputError as err:
        need(False, str(err))
    need(law_data["formats"] == law.formats_, "its formats are not the table's")
    for name in ("params", "eff"):
        saved, given = law_data[name], getattr(law, f"{name}_")
        need(isinstance(saved, dict) and set(saved) == set(given) and all(_real(v) for v in saved.values())
             and all(math.isclose(saved[k], given[k], rel_tol=1e-9, abs_tol=1e-12) for k in given),
             f"its {name} are not the values its constants give")
    need(_real(law_data["objective"]) and math.isclose(law_data["objective"], law.objective_, rel_tol=1e-6,
                                                       abs_tol=1e-12), "its objective is not the one its constants reach")
    _is_an_optimum(law, runs, need)
    return law


def _is_an_optimum(law, runs: pd.DataFrame, need) -> None:
    """The saved constants are a fit: inside the range the fitter searches, and a local refit started from them
    finds no lower objective (edited constants, recomputed checksum and all, are not a minimum)."""
    for name in ("alpha", "beta"):
        value = law.params_[name]
        need(EXPONENT_GRID[0] * 0.5 <= value <= 5.0, f"{name} = {value:.4g} lies outside the range the fitter searches")
    refit = make_law(law.name, **law.bootstrap_params()).fit(runs, start=law.theta_)
    need(refit.objective_ >= law.objective_ * (1 - REFIT_TOLERANCE) - 1e-12,
         f"its constants are not a fit of these runs: refitted from them the objective falls from {law.objective_:.6g} "
         f"to {refit.objective_:.6g}")


def _bootstrap(boot, law: DecoupledLaw, runs: pd.DataFrame, need: _Refuse) -> tuple[BootstrapResult | None, int]:
    if boot is None:
        return None, 0
    need(isinstance(boot, dict) and set(boot) == BOOT_KEYS, "bad bootstrap section")
    samples, values = boot["samples"], law.values()
    need(isinstance(samples, dict) and set(samples) == set(values), "its replicates are not of its fitted values")
    columns = list(samples.values())
    need(all(isinstance(c, list) and all(_real(v) for v in c) for c in columns)
         and len({len(c) for c in columns}) == 1 and len(columns[0]) <= MAX_REPLICATES,
         f"its replicates are not equal-length lists of numbers (at most {MAX_REPLICATES:,})")
    need(_whole(boot["n_failed"]) and _whole(boot["seed"]) and _real(boot["level"]) and 0.5 <= boot["level"] < 1,
         "bad bootstrap settings")
    frame = pd.DataFrame(samples)
    ids = boot["replicates"]
    need(boot["unit"] in RESAMPLING_UNITS and isinstance(ids, list) and len(ids) == len(frame)
         and all(_whole(b) for b in ids) and len(set(ids)) == len(ids), "bad bootstrap replicate indices")
    for name, value in values.items():
        lo, hi = frame[name].min(), frame[name].max()
        slack = 0.5 * (hi - lo) + 1e-9 * abs(value)
        need(not len(frame) or lo - slack <= value <= hi + slack,
             f"{name} = {value:.6g} lies outside its own bootstrap replicates [{lo:.6g}, {hi:.6g}]")
    _replicates_reproduce(law, runs, frame, ids, boot["seed"], boot["unit"], need)
    return BootstrapResult(frame, boot["n_failed"], float(boot["level"]), ids, boot["unit"]), boot["seed"]


def _replicates_reproduce(law, runs, frame: pd.DataFrame, ids: list, seed: int, unit: str, need) -> None:
    """A sample of the saved replicates (first, middle, last) refitted from their resample seeds matches."""
    if not len(frame):
        return
    rows = sorted({0, len(frame) // 2, len(frame) - 1})[:CHECKED_REPLICATES]
    for row, values in zip(rows, refit_replicates(law, runs, seed, [ids[r] for r in rows], unit)):
        need(values is not None and all(math.isclose(values[k], frame[k].iloc[row], rel_tol=REPLICATE_TOLERANCE,
                                                      abs_tol=1e-9) for k in frame.columns),
             f"its bootstrap replicate {ids[row]} is not what refitting that resample gives")


def load_fit(path: "str | Path", runs: pd.DataFrame) -> tuple[DecoupledLaw, BootstrapResult | None, int]:
    """The saved law (its residuals recomputed on `runs`), bootstrap and seed, verified (module docstring);
    refused with one line otherwise."""
    path = Path(path)
    need = _Refuse(path)
    content = _read(path, need)
    if content["fingerprint"] != fingerprint(runs):
        raise InputError(f"--fit {path}: fitted on other data ({content['n_runs']} runs, fingerprint "
                         f"{str(content['fingerprint'])[:12]}...) than the table given ({len(runs)} runs, "
                         f"{fingerprint(runs)[:12]}...); refit with `capscale fit ... -o`")
    law = _law(content["law"], runs, need)
    boot, seed = _bootstrap(content["bootstrap"], law, runs, need)
    return law, boot, seed
