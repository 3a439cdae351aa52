"""Law-free comparison of formats: paired log-loss differences against the baseline at equal (N, D).

When the scaling law is weakly identified (a narrow size range, E unidentified), efficiencies inherit its
uncertainty; the paired loss comparison does not depend on the law, only on runs sharing a design."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from capscale.capacity import BASELINE


def paired_comparison(runs: pd.DataFrame, baseline: str = BASELINE, level: float = 0.95) -> pd.DataFrame:
    """Per format: mean of log(loss_f / loss_baseline) over the (N, D) cells both were trained at, its t-interval,
    and a Wilcoxon signed-rank p-value for 'no difference'. A format sharing fewer than 2 cells with the baseline is a
    row with no estimate and the reason in `note`."""
    from .statistics import MIN_SHARED_CELLS, not_compared_reason
    cells = runs.groupby(["format", "params", "tokens"])["loss"].mean().unstack("format")
    base = np.log(cells[baseline])
    rows, missing = [], []
    for fmt in cells.columns.drop(baseline):
        diff = (np.log(cells[fmt]) - base).dropna()
        if len(diff) < MIN_SHARED_CELLS:
            missing.append({"format": fmt, "cells": len(diff), "note": not_compared_reason(len(diff), baseline)})
            continue
        mean, sem = diff.mean(), diff.std(ddof=1) / np.sqrt(len(diff))
        half = stats.t.ppf(0.5 + level / 2, len(diff) - 1) * sem
        p = stats.wilcoxon(diff).pvalue if len(diff) >= 6 and diff.abs().sum() > 0 else np.nan
        rows.append({"format": fmt, "cells": len(diff), "mean_log_loss_ratio": mean, "lo": mean - half,
                     "hi": mean + half, "worse_in_cells": int((diff > 0).sum()), "wilcoxon_p": p, "note": ""})
    columns = ["format", "cells", "mean_log_loss_ratio", "lo", "hi", "worse_in_cells", "wilcoxon_p", "note"]
    compared = pd.DataFrame(rows, columns=columns).sort_values("mean_log_loss_ratio")
    return pd.concat([compared, pd.DataFrame(missing, columns=columns)], ignore_index=True)
