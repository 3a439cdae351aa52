"""How commands print tables: text for people, one JSON object for programs (`emit_json`; non-finite numbers as
null, so the JSON is valid). Nothing here imports pandas: `capscale gmse` prints without loading it."""
from __future__ import annotations

import json

from tabulate import tabulate

from capscale.capacity.paths import strict_json


def print_records(records: list[dict], floatfmt: str = ".4g") -> None:
    """Records as a plain text table (`--json` goes through `emit_json`)."""
    print(tabulate(records, headers="keys", tablefmt="plain", floatfmt=floatfmt, missingval=""))


def print_table(frame, floatfmt: str = ".4g") -> None:
    """A pandas DataFrame, printed as `print_records` does."""
    print_records(frame.to_dict("records"), floatfmt)


# (value column, its interval's ends) in the tables commands print; each becomes {"value": v, "ci": [lo, hi]}
INTERVAL_COLUMNS = [("fitted", "fitted_lo", "fitted_hi"), ("predicted", "pred_lo", "pred_hi"),
                    ("ratio", "ratio_lo", "ratio_hi"), ("loss", "loss_lo", "loss_hi"), ("eff", "eff_lo", "eff_hi"),
                    ("log_loss_diff", "lo", "hi"), ("mean_log_loss_ratio", "lo", "hi"), ("slope", "lo", "hi"),
                    ("eff_change", "eff_lo", "eff_hi"), ("loss", "lo", "hi")]


def with_intervals(record: dict, level: float = 0.95) -> dict:
    """A record whose intervals read one way: `x` with `x_lo`/`x_hi` (or `lo`/`hi`) becomes x: {"value", "ci"};
    a Monte Carlo `gmse` with its `stderr` becomes gmse: {"value", "se", "ci"} (normal, at `level`)."""
    from statistics import NormalDist
    out = dict(record)
    for value, lo, hi in INTERVAL_COLUMNS:
        if value in out and lo in out and hi in out and not isinstance(out[value], dict):
            out[value] = {"value": out[value], "ci": [out.pop(lo), out.pop(hi)]}
    if "gmse" in out and "stderr" in out and not isinstance(out["gmse"], dict):
        se, z = out.pop("stderr"), NormalDist().inv_cdf(0.5 + level / 2)
        g = out["gmse"]
        out["gmse"] = {"value": g, "se": se, "ci": [g - z * se, g + z * se] if se is not None else None}
    return out


def emit_json(command: str, results, level: float | None = None, reason: str | None = None, **extra) -> None:
    """Every `--json` prints one object: {"command", "level", "results", ...}. `results` is a list of records (their
    intervals as {"value", "ci"}) or an object; an empty result is an empty list with the reason, never prose."""
    if isinstance(results, list):
        results = [with_intervals(r, level or 0.95) if isinstance(r, dict) else r for r in results]
    body = {"command": command, "level": level, "results": results, **extra}
    if reason is not None or (isinstance(results, list) and not results):
        body["reason"] = reason or "nothing to report"
    print(json.dumps(strict_json(body), indent=1, default=str, allow_nan=False))
