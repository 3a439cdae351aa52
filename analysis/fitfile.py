"""Fit once, reuse everywhere: a decoupled fit and its bootstrap replicates saved as JSON, with the data's
fingerprint, so that validate, predict, compose and report answer in seconds without refitting, and refuse a
saved fit of other data."""
from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from capscale.capacity import InputError
from capscale.capacity.provenance import invoked_command, package_version

from .bootstrap import BootstrapResult
from .laws import DecoupledLaw

FORMAT_VERSION = 1


def fingerprint(runs: pd.DataFrame) -> str:
    """SHA-256 of the fitted rows (format, params, tokens, loss), order-free: what a fit depends on."""
    rows = runs[["format", "params", "tokens", "loss"]].astype({"format": str}).sort_values(
        ["format", "params", "tokens", "loss"])
    return hashlib.sha256(rows.to_csv(index=False, float_format="%.12g").encode()).hexdigest()


def save_fit(path: "str | Path", law: DecoupledLaw, boot: BootstrapResult | None, runs: pd.DataFrame,
             seed: int = 0) -> Path:
    if not isinstance(law, DecoupledLaw):
        raise InputError("only the decoupled law's fit can be saved and reused (--law decoupled)")
    path = Path(path)
    content = {
        "capscale_fit": FORMAT_VERSION, "fingerprint": fingerprint(runs), "n_runs": len(runs),
        "law": {"name": law.law, "settings": law.get_params(), "params": law.params_, "eff": law.eff_,
                "formats": law.formats_, "theta": [float(v) for v in law.theta_], "objective": law.objective_},
        "bootstrap": None if boot is None else {"samples": boot.samples.to_dict("list"), "n_failed": boot.n_failed,
                                                 "level": boot.level, "seed": seed},
        "command": invoked_command(),
        "versions": {p: package_version(p) for p in ("capscale", "numpy", "scipy", "pandas", "statsmodels")}
        | {"python": platform.python_version()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path.write_text(json.dumps(content, indent=1))
    return path


def load_fit(path: "str | Path", runs: pd.DataFrame) -> tuple[DecoupledLaw, BootstrapResult | None, int]:
    """The saved law (its residuals recomputed on `runs`), bootstrap and seed; refused if `runs` is not the data it
    fitted."""
    try:
        content = json.loads(Path(path).read_text())
        law_data = content["law"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"--fit {path}: not a saved capscale fit ({type(err).__name__})") from None
    if content.get("capscale_fit") != FORMAT_VERSION or law_data.get("name") != "decoupled":
        raise InputError(f"--fit {path}: not a saved decoupled fit of this capscale version")
    if content.get("fingerprint") != fingerprint(runs):
        raise InputError(f"--fit {path}: fitted on other data ({content.get('n_runs')} runs, fingerprint "
                         f"{str(content.get('fingerprint'))[:12]}...) than the table given ({len(runs)} runs, "
                         f"{fingerprint(runs)[:12]}...); refit with `capscale fit ... -o`")
    law = DecoupledLaw(**law_data["settings"])
    law.formats_, law.params_, law.eff_ = law_data["formats"], law_data["params"], law_data["eff"]
    law.theta_ = np.asarray(law_data["theta"], float)
    law._finish(runs, law_data["objective"])
    boot = content.get("bootstrap")
    if boot is None:
        return law, None, 0
    return (law, BootstrapResult(pd.DataFrame(boot["samples"]), int(boot["n_failed"]), float(boot["level"])),
            int(boot.get("seed", 0)))
