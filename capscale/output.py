"""How commands print tables: text for people, JSON records for programs."""
from __future__ import annotations

import pandas as pd


def print_table(frame: pd.DataFrame, as_json: bool = False, floatfmt: str = "{:.4g}") -> None:
    print(frame.to_json(orient="records", indent=1) if as_json else
          frame.to_string(index=False, float_format=floatfmt.format))
