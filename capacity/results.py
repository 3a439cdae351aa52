"""The results protocol. Every results object capscale returns (a law fit, a validation, a calibration, a composition
test, paired differences, a drift test, a plan, a frontier, a GMSE measurement or error split) has `summary()`, a
`Summary` a scientist can paste into a paper as text, Markdown or HTML (like statsmodels' summaries), and `as_json()`,
the same content as one strict-JSON object with intervals as `ci: [lo, hi]` beside `value`."""
from __future__ import annotations

from html import escape

import pandas as pd


class Summary:
    """A title, a header of (name, value) lines, a table, notes; `preface`: text kept verbatim before the table (a
    statsmodels summary, say). `str()` is the text."""

    def __init__(self, title: str, header: list[tuple[str, str]], table: pd.DataFrame, notes: list[str] = (),
                 preface: str | None = None):
        self.title, self.header, self.table, self.notes, self.preface = title, list(header), table, list(notes), preface

    def as_text(self) -> str:
        head = "".join(f"\n  {k}: {v}" for k, v in self.header)
        pre = f"\n{self.preface}" if self.preface else ""
        table = f"\n{self.table.to_string(index=False, float_format='{:.4g}'.format)}" if len(self.table) else ""
        notes = "".join(f"\n  {n}" for n in self.notes)
        return f"{self.title}{head}{pre}{table}{notes}"

    def as_markdown(self) -> str:
        head = "".join(f"\n- {k}: {v}" for k, v in self.header)
        pre = f"\n\n```\n{self.preface}\n```" if self.preface else ""
        table = f"\n\n{self.table.to_markdown(index=False, floatfmt='.4g')}" if len(self.table) else ""
        notes = "".join(f"\n- {n}" for n in self.notes)
        return f"**{self.title}**\n{head}{pre}{table}\n{notes}".rstrip()

    def as_html(self) -> str:
        head = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in self.header)
        pre = f"<pre>{escape(self.preface)}</pre>" if self.preface else ""
        table = (self.table.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)
                 if len(self.table) else "")
        notes = "".join(f"<p>{escape(n)}</p>" for n in self.notes)
        return f"<table class='summary'><caption>{escape(self.title)}</caption>{head}</table>{pre}{table}{notes}"

    def __str__(self) -> str:
        return self.as_text()

    def _repr_html_(self) -> str:
        return self.as_html()
