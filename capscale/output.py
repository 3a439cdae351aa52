"""How commands print tables: text for people, JSON records for programs (non-finite numbers as null, so the
JSON is valid). Nothing here imports pandas: `capscale gmse` prints without loading it."""
from __future__ import annotations

import json

from tabulate import tabulate

from capscale.capacity.paths import strict_json


def print_records(records: list[dict], as_json: bool = False, floatfmt: str = ".4g") -> None:
    if as_json:
        print(json.dumps(strict_json(records), indent=1, default=str, allow_nan=False))
    else:
        print(tabulate(records, headers="keys", tablefmt="plain", floatfmt=floatfmt, missingval=""))


def print_table(frame, as_json: bool = False, floatfmt: str = ".4g") -> None:
    """A pandas DataFrame, printed as `print_records` does."""
    print_records(frame.to_dict("records"), as_json, floatfmt)
